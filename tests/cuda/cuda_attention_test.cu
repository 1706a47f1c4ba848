// backend::cuda against backend::cpu on the same inputs: two caches of the same policy, element
// type (f32, f16, bf16, int8, fp8) and shape receive the same operations (ragged appends in random chunks, forks,
// truncation, release, prefix sharing); after every step the stored rows must be bit-equal, and
// decode over the ragged batch and chunked prefill must give the CPU kernel's outputs within
// fp32 rounding (the CPU kernels are checked against the fp64 oracle in tests/attention).
//
// Exits 77 (ctest: skipped) when no CUDA device is present: building this file is then the check.
#include <gtest/gtest.h>

#include <kvcache/kvcache.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace kvcache::testing {
namespace {

void cuda_ok(cudaError_t status) { ASSERT_EQ(status, cudaSuccess) << cudaGetErrorString(status); }

// Device memory holding a copy of a host vector (or zeros), freed at scope end.
template <class T>
class DeviceVector {
 public:
  explicit DeviceVector(std::size_t count) : count_(count) {
    backend::cuda::check(cudaMalloc(&data_, std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMalloc (test)");
    backend::cuda::check(cudaMemset(data_, 0, count * sizeof(T)), "cudaMemset (test)");
  }
  explicit DeviceVector(const std::vector<T>& host) : DeviceVector(host.size()) {
    backend::cuda::check(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  DeviceVector(const DeviceVector&) = delete;
  DeviceVector& operator=(const DeviceVector&) = delete;
  ~DeviceVector() { cudaFree(data_); }

  // Every byte 0xFF: NaN in every float type, so an element a kernel fails to write fails the test.
  void poison() { backend::cuda::check(cudaMemset(data_, 0xFF, count_ * sizeof(T)), "cudaMemset (test)"); }

  std::span<const T> span() const { return {data_, count_}; }
  std::span<T> span() { return {data_, count_}; }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    backend::cuda::check(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return host;
  }

 private:
  T* data_ = nullptr;
  std::size_t count_;
};

std::vector<float> random_values(std::mt19937& rng, std::size_t count, float spread = 1.0f) {
  std::normal_distribution<float> normal(0.0f, spread);
  std::vector<float> values(count);
  for (float& value : values) value = normal(rng);
  return values;
}

template <class Layout>
Layout make_layout();
template <>
Paged<16> make_layout<Paged<16>>() { return {.num_blocks = 800, .max_sequences = 80}; }
template <>
Contiguous make_layout<Contiguous>() { return {.max_sequences = 80, .max_tokens = 1400}; }
template <>
SlidingWindow make_layout<SlidingWindow>() {
  return {.max_sequences = 80, .window = 300, .sink_tokens = 4, .slack_tokens = 40};
}

// The CPU and the CUDA cache of one configuration, driven in lockstep.
template <class Layout, class DType>
struct Twin {
  using HostCache = KVCache<Layout, DType>;
  using DeviceCache = KVCache<Layout, DType, backend::cuda>;
  using Storage = typename DType::storage_type;

  ModelShape shape;
  HostCache host;
  DeviceCache device;
  std::vector<SeqId> seqs;  // the same handles in both caches

  explicit Twin(const ModelShape& model, const Layout& layout = make_layout<Layout>(),
                std::span<const float> key_offsets = {})
      : shape(model), host(model, layout, key_offsets), device(model, layout, key_offsets) {}

  // The two backends agree up to float rounding, and up to the CPU's rounding of queries and
  // weights where it dots integer codes (attention::cpu::uses_integer_dot_products; the bound of
  // tests/support/oracle.hpp).
  double agreement() const { return attention::cpu::uses_integer_dot_products<Storage>(shape.head_dim) ? 5e-4 : 2e-5; }

  std::size_t kv_row() const { return static_cast<std::size_t>(shape.kv_heads) * shape.head_dim; }
  std::size_t q_row() const { return static_cast<std::size_t>(shape.q_heads) * shape.head_dim; }

  SeqId open() {
    const SeqId seq = host.open();
    EXPECT_EQ(device.open(), seq);
    seqs.push_back(seq);
    return seq;
  }

  // Appends n random positions to every layer of seq.
  void append(std::mt19937& rng, SeqId seq, int n) {
    host.reserve(seq, n);
    device.reserve(seq, n);
    for (int layer = 0; layer < shape.layers; ++layer) {
      const auto k = random_values(rng, n * kv_row()), v = random_values(rng, n * kv_row());
      host.append(layer, seq, k, v);
      const DeviceVector<float> k_device(k), v_device(v);
      device.append(layer, seq, k_device.span(), v_device.span());
    }
    cuda_ok(cudaDeviceSynchronize());
  }

  // One decode step's token for every open sequence, by a batch append (one kernel per layer).
  void append_step(std::mt19937& rng) {
    for (SeqId seq : seqs) {
      host.reserve(seq, 1);
      device.reserve(seq, 1);
    }
    for (int layer = 0; layer < shape.layers; ++layer) {
      const auto k = random_values(rng, seqs.size() * kv_row()), v = random_values(rng, seqs.size() * kv_row());
      host.append(layer, std::span<const SeqId>(seqs), k, v);
      const DeviceVector<float> k_device(k), v_device(v);
      device.append(layer, std::span<const SeqId>(seqs), k_device.span(), v_device.span());
    }
    cuda_ok(cudaDeviceSynchronize());
  }

  // Every stored row of every open sequence is bit-equal in the two caches.
  void expect_same_rows() const {
    for (SeqId seq : seqs)
      for (int layer = 0; layer < shape.layers; ++layer) {
        const auto host_view = host.view(layer, seq);
        auto device_view = device.view(layer, seq);
        device_view.block_ids = host_view.block_ids;  // the bookkeeping is the same: read ids on the host
        ASSERT_EQ(host_view.segment_count(), device_view.segment_count());
        for (int i = 0; i < host_view.segment_count(); ++i) {
          const Segment<Storage> h = host_view.segment(i), d = device_view.segment(i);
          ASSERT_EQ(h.first_position, d.first_position);
          ASSERT_EQ(h.count, d.count);
          const std::size_t elements = static_cast<std::size_t>(h.count) * shape.head_dim;
          std::vector<Storage> rows(elements);
          for (int head = 0; head < shape.kv_heads; ++head)
            for (int kind = 0; kind < 2; ++kind) {
              const Storage* on_host = (kind == 0 ? h.k : h.v) + head * h.head_stride;
              const Storage* on_device = (kind == 0 ? d.k : d.v) + head * d.head_stride;
              cuda_ok(cudaMemcpy(rows.data(), on_device, elements * sizeof(Storage), cudaMemcpyDeviceToHost));
              ASSERT_EQ(0, std::memcmp(rows.data(), on_host, elements * sizeof(Storage)))
                  << "layer " << layer << " " << seq << " segment " << i << " head " << head << (kind ? " V" : " K");
              if constexpr (QuantizedElement<DType>) {  // and the rows' scales
                const std::size_t offset = head * (h.head_stride / shape.head_dim);
                std::vector<float> scales(static_cast<std::size_t>(h.count));
                cuda_ok(cudaMemcpy(scales.data(), (kind == 0 ? d.k_scale : d.v_scale) + offset,
                                   scales.size() * sizeof(float), cudaMemcpyDeviceToHost));
                ASSERT_EQ(0, std::memcmp(scales.data(), (kind == 0 ? h.k_scale : h.v_scale) + offset,
                                         scales.size() * sizeof(float)))
                    << "scales of layer " << layer << " " << seq << " segment " << i << " head " << head;
              }
            }
        }
      }
  }

  // Decode of the batch `batch` in layer `layer` on both backends.
  template <class Out = float>
  void expect_same_decode(std::mt19937& rng, int layer, const std::vector<SeqId>& batch,
                          const AttentionParams& params = {}, std::optional<double> tolerance = {}) {
    const auto q = random_values(rng, batch.size() * q_row());
    std::vector<float> expected(q.size());
    attention::decode(host, layer, std::span<const SeqId>(batch), q, expected, params);
    const DeviceVector<float> q_device(q);
    DeviceVector<Out> out_device(q.size());
    out_device.poison();
    attention::decode(device, layer, std::span<const SeqId>(batch), q_device.span(), out_device.span(), params);
    cuda_ok(cudaDeviceSynchronize());
    expect_close(expected, out_device.download(), tolerance.value_or(agreement()), "decode");
  }

  // Appends n positions to seq and runs chunked prefill of them in layer 0 on both backends.
  void expect_same_prefill(std::mt19937& rng, SeqId seq, int n, const AttentionParams& params = {}) {
    append(rng, seq, n);
    const auto q = random_values(rng, n * q_row());
    std::vector<float> expected(q.size());
    attention::prefill(host, 0, seq, q, expected, params);
    const DeviceVector<float> q_device(q);
    DeviceVector<float> out_device(q.size());
    out_device.poison();
    attention::prefill(device, 0, seq, q_device.span(), out_device.span(), params);
    cuda_ok(cudaDeviceSynchronize());
    expect_close(expected, out_device.download(), agreement(), "prefill");
  }

  // Appends counts[i] positions to batch[i] and runs one batched prefill of them in layer 0.
  void expect_same_batched_prefill(std::mt19937& rng, const std::vector<SeqId>& batch, const std::vector<int>& counts) {
    int all = 0;
    for (std::size_t i = 0; i < batch.size(); ++i) {
      append(rng, batch[i], counts[i]);
      all += counts[i];
    }
    const auto q = random_values(rng, all * q_row());
    std::vector<float> expected(q.size());
    attention::prefill(host, 0, std::span<const SeqId>(batch), std::span<const int>(counts), q, expected);
    const DeviceVector<float> q_device(q);
    DeviceVector<float> out_device(q.size());
    out_device.poison();
    attention::prefill(device, 0, std::span<const SeqId>(batch), std::span<const int>(counts), q_device.span(),
                       out_device.span());
    cuda_ok(cudaDeviceSynchronize());
    expect_close(expected, out_device.download(), agreement(), "batched prefill");
  }

  template <class Out>
  static void expect_close(const std::vector<float>& expected, const std::vector<Out>& actual, double tolerance,
                           const char* what) {
    ASSERT_EQ(expected.size(), actual.size());
    double worst = 0.0;
    std::size_t worst_at = 0;
    for (std::size_t i = 0; i < expected.size(); ++i) {
      const double error = std::fabs(static_cast<double>(to_float(actual[i])) - expected[i]) /
                           std::max(1.0, std::fabs(static_cast<double>(expected[i])));
      if (!(error <= worst)) {  // NaN counts as the worst
        worst = std::isnan(error) ? INFINITY : error;
        worst_at = i;
      }
    }
    EXPECT_LE(worst, tolerance) << what << ": element " << worst_at << " expected " << expected[worst_at]
                                << " got " << to_float(actual[worst_at]);
  }
};

template <class Layout, class DType>
struct Config {
  using layout = Layout;
  using dtype = DType;
};

#if defined(KVCACHE_CUDA_EMULATOR)  // slow: each policy and each element type at least once
using Configs = ::testing::Types<Config<Paged<16>, f32>, Config<Paged<16>, bf16>, Config<Contiguous, f16>,
                                 Config<SlidingWindow, bf16>, Config<Paged<16>, int8>, Config<Contiguous, fp8_e4m3>,
                                 Config<SlidingWindow, fp8_e5m2>>;
#else
using Configs = ::testing::Types<Config<Paged<16>, f32>, Config<Paged<16>, f16>, Config<Paged<16>, bf16>,
                                 Config<Contiguous, f16>, Config<Contiguous, f32>, Config<SlidingWindow, bf16>,
                                 Config<SlidingWindow, f32>, Config<Paged<16>, int8>, Config<Paged<16>, fp8_e4m3>,
                                 Config<Contiguous, fp8_e4m3>, Config<SlidingWindow, fp8_e5m2>>;
#endif

struct ConfigName {  // CudaBackendTest/paged_bf16.RaggedDecodeMatchesCpu
  template <class C>
  static std::string GetName(int) {
    return std::string(C::layout::name) + "_" + std::string(C::dtype::name);
  }
};

template <class C>
class CudaBackendTest : public ::testing::Test {};
TYPED_TEST_SUITE(CudaBackendTest, Configs, ConfigName);

struct HeadLayout {
  int q_heads, kv_heads, head_dim;
};
// MHA, GQA (group 4, the Llama-3 shape's), MQA with a group over one block's eight heads, and
// head_dim 64 / 128 / 256.
constexpr HeadLayout head_layouts[] = {{4, 4, 64}, {8, 2, 128}, {20, 1, 64}, {6, 2, 256}};

// Ragged sequences (some past one split of 512 keys, lengths straddling block edges), then
// decode over the batch after each round of appends, forks and truncation.
TYPED_TEST(CudaBackendTest, RaggedDecodeMatchesCpu) {
  using C = TypeParam;
  for (const HeadLayout& heads : head_layouts) {
    SCOPED_TRACE("q_heads " + std::to_string(heads.q_heads) + " kv_heads " + std::to_string(heads.kv_heads) +
                 " head_dim " + std::to_string(heads.head_dim));
    std::mt19937 rng(1234 + heads.head_dim);
    Twin<typename C::layout, typename C::dtype> twin({.layers = 2, .q_heads = heads.q_heads,
                                                      .kv_heads = heads.kv_heads, .head_dim = heads.head_dim});
    const int lengths[] = {1, 15, 16, 17, 300, 513, 1100};
    for (int length : lengths) twin.append(rng, twin.open(), length);
    twin.expect_same_rows();
    for (int layer = 0; layer < 2; ++layer) twin.expect_same_decode(rng, layer, twin.seqs);

    // A fork shares (paged) or copies rows; both then grow apart. Truncation rolls one back.
    const SeqId child = twin.host.fork(twin.seqs[5]);
    EXPECT_EQ(twin.device.fork(twin.seqs[5]), child);
    twin.seqs.push_back(child);
    twin.append(rng, child, 7);
    twin.append(rng, twin.seqs[5], 3);
    const int rolled_back = twin.host.length(twin.seqs[6]) - 30;  // within the window's slack
    twin.host.truncate(twin.seqs[6], rolled_back);
    twin.device.truncate(twin.seqs[6], rolled_back);
    twin.append(rng, twin.seqs[6], 20);
    twin.host.release(twin.seqs[2]);
    twin.device.release(twin.seqs[2]);
    twin.seqs.erase(twin.seqs.begin() + 2);
    for (int step = 0; step < 3; ++step) twin.append_step(rng);
    twin.expect_same_rows();
    twin.expect_same_decode(rng, 1, twin.seqs);
    twin.expect_same_decode(rng, 0, {twin.seqs[4]}, {.scale = {}, .soft_cap = 5.0f});
    twin.template expect_same_decode<Eigen::bfloat16>(rng, 0, twin.seqs, {}, 8e-3);  // one bf16 rounding of the output
  }
}

// Chunked prefill: a prompt in chunks of different sizes, each chunk's queries against the cache
// and themselves.
TYPED_TEST(CudaBackendTest, ChunkedPrefillMatchesCpu) {
  using C = TypeParam;
  for (const HeadLayout& heads : head_layouts) {
    SCOPED_TRACE("q_heads " + std::to_string(heads.q_heads) + " head_dim " + std::to_string(heads.head_dim));
    std::mt19937 rng(99 + heads.q_heads);
    Twin<typename C::layout, typename C::dtype> twin({.layers = 1, .q_heads = heads.q_heads,
                                                      .kv_heads = heads.kv_heads, .head_dim = heads.head_dim});
    const SeqId seq = twin.open();
    for (int chunk : {1, 33, 40, 7, 41})  // the window's slack allows chunks of at most 41
      twin.expect_same_prefill(rng, seq, chunk);
    twin.append(rng, seq, 400);  // past the sliding window
    twin.expect_same_prefill(rng, seq, 41, {.scale = {}, .soft_cap = 3.0f});
    twin.expect_same_rows();
  }
}

// More sequences than one launch takes (views travel in kernel parameters, 64 per launch).
TEST(CudaBackend, BatchLargerThanOneLaunch) {
  std::mt19937 rng(7);
  Twin<Paged<16>, bf16> twin({.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 128});
  std::uniform_int_distribution<int> length(1, 90);
  for (int i = 0; i < 70; ++i) twin.append(rng, twin.open(), length(rng));
  twin.expect_same_decode(rng, 0, twin.seqs);
}

// Chunked prefill of many sequences in one call: ragged chunks over ragged cached lengths, and
// more sequences than one launch takes.
TEST(CudaBackend, BatchedPrefillMatchesCpu) {
  std::mt19937 rng(17);
  Twin<Paged<16>, f16> twin({.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64});
  std::vector<int> counts;
  for (int i = 0; i < 70; ++i) {
    twin.append(rng, twin.open(), 1 + i % 23);
    counts.push_back(i < 3 ? 1 + 20 * i : 1 + i % 3);
  }
  twin.expect_same_batched_prefill(rng, twin.seqs, counts);
}

// Shared prefix blocks are read through the device copy of the block tables; copy-on-write
// copies device bytes.
TEST(CudaBackend, PrefixSharingAndCopyOnWrite) {
  std::mt19937 rng(11);
  Twin<Paged<16>, f16> twin({.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64});
  const SeqId first = twin.open();
  twin.append(rng, first, 100);
  std::vector<std::int32_t> tokens(120);
  for (int i = 0; i < 120; ++i) tokens[static_cast<std::size_t>(i)] = i * 7 + 1;
  twin.host.publish_prefix(first, std::span<const std::int32_t>(tokens).first(100));
  twin.device.publish_prefix(first, std::span<const std::int32_t>(tokens).first(100));
  const SeqId second = twin.open();
  EXPECT_EQ(twin.host.match_prefix(second, tokens), 96);
  EXPECT_EQ(twin.device.match_prefix(second, tokens), 96);
  twin.append(rng, second, 24);
  twin.host.truncate(second, 90);  // back into a shared block: the next reserve copies it
  twin.device.truncate(second, 90);
  twin.append(rng, second, 5);
  twin.expect_same_rows();
  twin.expect_same_decode(rng, 1, twin.seqs);
}

// Odd sizes everywhere: the scale region of a quantized cache is not a multiple of 16 bytes,
// and rows must still be 16-byte aligned for the kernels' loads.
TEST(CudaBackend, QuantizedRowsOfOddShapes) {
  std::mt19937 rng(13);
  Twin<Contiguous, int8> twin({.layers = 3, .q_heads = 3, .kv_heads = 1, .head_dim = 64},
                              Contiguous{.max_sequences = 3, .max_tokens = 37});
  for (int length : {37, 5, 20}) twin.append(rng, twin.open(), length);
  twin.expect_same_rows();
  twin.expect_same_decode(rng, 2, twin.seqs);
}

// Key offsets: the append kernel subtracts the same offsets (uploaded by the constructor) as
// the CPU does, so the stored rows and the attention agree; soft-capped attention too, where
// both add each score's q . offset back before the cap.
TEST(CudaBackend, KeyOffsetsAreSubtractedLikeOnTheCpu) {
  std::mt19937 rng(19);
  const ModelShape shape{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  const std::vector<float> offsets = random_values(rng, 2 * 2 * 64, 20.0f);
  Twin<Paged<16>, int8> quantized(shape, make_layout<Paged<16>>(), offsets);
  Twin<Contiguous, f16> halves(shape, make_layout<Contiguous>(), offsets);
  for (int length : {1, 40}) {
    quantized.append(rng, quantized.open(), length);
    halves.append(rng, halves.open(), length);
  }
  quantized.append_step(rng);
  halves.append_step(rng);
  quantized.expect_same_rows();
  halves.expect_same_rows();
  quantized.expect_same_decode(rng, 1, quantized.seqs);
  halves.expect_same_decode(rng, 0, halves.seqs);
  const AttentionParams capped{.scale = {}, .soft_cap = 30.0f};  // the offsets move scores by ~20
  quantized.expect_same_decode(rng, 1, quantized.seqs, capped);
  halves.expect_same_decode(rng, 0, halves.seqs, capped);
  halves.expect_same_prefill(rng, halves.seqs[1], 7, capped);
}

TEST(CudaBackend, UnsupportedHeadDimIsAClearError) {
  KVCache<Paged<16>, f16, backend::cuda> cache({.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 40},
                                              {.num_blocks = 4, .max_sequences = 2});
  const SeqId seq = cache.open();
  cache.reserve(seq, 1);
  const DeviceVector<float> kv(40), q(80);
  DeviceVector<float> out(80);
  cache.append(0, seq, kv.span(), kv.span());
  try {
    attention::decode(cache, 0, seq, q.span(), out.span());
    FAIL() << "head_dim 40 accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), errc::invalid_configuration);
    EXPECT_NE(std::string(error.what()).find("head_dim = 40"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace kvcache::testing

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped (this binary compiled, which is the build check)\n");
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
