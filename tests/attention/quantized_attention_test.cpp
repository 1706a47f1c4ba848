// Quantized caches (int8, fp8 E4M3/E5M2 with a scale per row, optionally Hadamard-rotated):
// the cache stores exactly what the element type's row quantization gives, allocates exactly
// what the memory math says, and attention over it equals the fp64 oracle run on the
// dequantized values up to the kernel's own rounding: the kernel adds no error beyond
// quantization.
#include <kvcache/kvcache.hpp>

#include "../support/oracle.hpp"

namespace kvcache::testing {
namespace {

template <class C>
class QuantizedAttentionTest : public ::testing::Test {};
using QuantizedConfigs = ::testing::Types<
    Config<Contiguous, int8>, Config<Paged<16>, int8>, Config<SlidingWindow, int8>,
    Config<Contiguous, fp8_e4m3>, Config<Paged<16>, fp8_e4m3>, Config<SlidingWindow, fp8_e4m3>,
    Config<Contiguous, fp8_e5m2>, Config<Paged<16>, fp8_e5m2>, Config<SlidingWindow, fp8_e5m2>,
    Config<Contiguous, int8_hadamard>, Config<Paged<16>, fp8_e4m3_hadamard>>;
TYPED_TEST_SUITE(QuantizedAttentionTest, QuantizedConfigs, ConfigName);

TYPED_TEST(QuantizedAttentionTest, AllocatesExactlyWhatTheMemoryMathPredicts) {
  using C = TypeParam;
  const ModelShape shape{3, 8, 2, 32};
  const auto layout = make_layout<typename C::Layout>();
  const KVCache<typename C::Layout, typename C::DType> cache(shape, layout);
  const std::size_t tokens = static_cast<std::size_t>(layout.page_count()) * layout.page_tokens();
  EXPECT_EQ(bytes_per_token<typename C::DType>(shape), 2u * 3 * 2 * (32 + 4));  // a float scale per row
  EXPECT_EQ(cache.stats().bytes_capacity, bytes_for_tokens<typename C::DType>(shape, tokens));
}

// Decode of ragged sequences and chunked prefill, MHA / GQA / MQA, fast and portable head sizes.
TYPED_TEST(QuantizedAttentionTest, AttentionEqualsTheOracleOnDequantizedValues) {
  using C = TypeParam;
  using DType = typename C::DType;
  std::mt19937 rng(21);
  for (const ModelShape& shape : oracle_shapes()) {
    if (is_hadamard_rotated<DType> && shape.head_dim == 40) {  // the rotation needs a power of two
      EXPECT_THROW((KVCache<typename C::Layout, DType>(shape, make_layout<typename C::Layout>())), Error);
      continue;
    }
    const auto layout = make_layout<typename C::Layout>();
    KVCache<typename C::Layout, DType> cache(shape, layout);
    const std::size_t kv_row = static_cast<std::size_t>(shape.kv_heads) * shape.head_dim;
    std::vector<SeqId> seqs;
    std::vector<Rows> k, v;
    const int lengths[] = {1, 17, 40, 64};
    for (int length : lengths) {
      seqs.push_back(cache.open());
      // Rows of very different magnitudes: per-row scales must keep each one's precision.
      k.push_back(random_values(rng, length * kv_row, seqs.size() % 2 ? 1.0f : 30.0f));
      v.push_back(random_values(rng, length * kv_row, seqs.size() % 2 ? 0.01f : 3.0f));
      cache.reserve(seqs.back(), length);
      cache.append(0, seqs.back(), k.back(), v.back());
    }
    std::vector<Rows> k_stored, v_stored;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      k_stored.push_back(stored<DType>(k[i], shape.head_dim));
      v_stored.push_back(stored<DType>(v[i], shape.head_dim));
    }
    expect_attention_equals_oracle(cache, seqs, lengths, k_stored, v_stored, mask_of(layout), rng,
                                  kernel_bound<typename DType::storage_type>(shape.head_dim));
  }
}

// Copy-on-write copies the scales with the codes: a forked paged sequence reads the same values.
TEST(QuantizedCache, ForkedSequencesKeepTheirScales) {
  const ModelShape shape{2, 4, 2, 64};
  KVCache<Paged<16>, int8> cache(shape, {.num_blocks = 16, .max_sequences = 4});
  std::mt19937 rng(5);
  const SeqId parent = cache.open();
  const auto rows = random_values(rng, 20 * 2 * 64, 5.0f);
  cache.reserve(parent, 20);
  for (int layer = 0; layer < 2; ++layer) cache.append(layer, parent, rows, rows);
  const SeqId child = cache.fork(parent);
  cache.reserve(child, 1);  // copies the shared last block, scales included
  const auto q = random_values(rng, 4 * 64);
  std::vector<float> a(q.size()), b(q.size());
  attention::decode(cache, 1, parent, q, a);
  attention::decode(cache, 1, child, q, b);
  EXPECT_EQ(a, b);
}

}  // namespace
}  // namespace kvcache::testing
