// GPU decode against the device's own copy bandwidth, measured in the same process.
//
// Shape: one Llama-3-8B layer (32 query heads, 8 kv-heads, head_dim 128), bf16 K/V in
// Paged<16>, batch {1, 16, 64} x T {1k, 4k, 16k, 32k} tokens per sequence. Each iteration runs
// decode for the whole batch in the next of `layers` layers, with enough layers that the K/V
// read per round exceeds the L2 cache several times (a layer's K/V is cold when decode reads it,
// as in a real forward pass). Times come from CUDA events around each call (manual time).
//
// Counters: bytes_per_second = K/V bytes read / time; copy_fraction = that over the
// device-to-device copy rate (bytes read + bytes written per second, the best of ten 1 GiB
// copies) measured by DeviceCopy in this binary. benchmarks/cuda/sdpa_peer.py runs this binary
// and PyTorch's scaled_dot_product_attention on the same shapes and prints both.
#include <benchmark/benchmark.h>

#include <kvcache/kvcache.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace kvcache::bench {
namespace {

using benchmark::Counter;

constexpr ModelShape layer_shape{.layers = 1, .q_heads = 32, .kv_heads = 8, .head_dim = 128};
constexpr std::size_t cold_bytes = std::size_t{1} << 30;  // K/V read per round of layers: 20x an H100's L2

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(status));
    std::exit(1);
  }
}

// Milliseconds of f() on the default stream, by CUDA events.
template <class F>
float milliseconds(F&& f) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  check(cudaEventRecord(start), "cudaEventRecord");
  f();
  check(cudaEventRecord(stop), "cudaEventRecord");
  check(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0.0f;
  check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms;
}

// Bytes read plus bytes written per second by cudaMemcpy of 1 GiB, device to device: the best
// of ten, measured once per process.
double copy_bytes_per_second() {
  static const double rate = [] {
    const std::size_t bytes = std::size_t{1} << 30;
    void *from = nullptr, *to = nullptr;
    check(cudaMalloc(&from, bytes), "cudaMalloc");
    check(cudaMalloc(&to, bytes), "cudaMalloc");
    check(cudaMemset(from, 1, bytes), "cudaMemset");
    float best = 1e30f;
    for (int i = 0; i < 10; ++i)
      best = std::min(best, milliseconds([&] { check(cudaMemcpy(to, from, bytes, cudaMemcpyDeviceToDevice), "copy"); }));
    cudaFree(from);
    cudaFree(to);
    return 2.0 * static_cast<double>(bytes) / (best * 1e-3);
  }();
  return rate;
}

void DeviceCopy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{1} << 30;
  void *from = nullptr, *to = nullptr;
  check(cudaMalloc(&from, bytes), "cudaMalloc");
  check(cudaMalloc(&to, bytes), "cudaMalloc");
  for (auto _ : state)
    state.SetIterationTime(1e-3 * milliseconds([&] { check(cudaMemcpy(to, from, bytes, cudaMemcpyDeviceToDevice), "copy"); }));
  cudaFree(from);
  cudaFree(to);
  state.counters["bytes_per_second"] = Counter(2.0 * static_cast<double>(bytes), Counter::kIsIterationInvariantRate);
  state.counters["best_bytes_per_second"] = copy_bytes_per_second();
}
BENCHMARK(DeviceCopy)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);

void Decode(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const int tokens = static_cast<int>(state.range(1));
  const std::size_t kv_row = static_cast<std::size_t>(layer_shape.kv_heads) * layer_shape.head_dim;
  const std::size_t layer_bytes = static_cast<std::size_t>(batch) * tokens * kv_row * 2 * sizeof(Eigen::bfloat16);
  const int layers = static_cast<int>(std::clamp<std::size_t>((cold_bytes + layer_bytes - 1) / layer_bytes, 1, 256));
  ModelShape shape = layer_shape;
  shape.layers = layers;

  using Cache = KVCache<Paged<16>, bf16, backend::cuda>;
  const int blocks = batch * Paged<16>::blocks_for(tokens);
  Cache cache(shape, Paged<16>{.num_blocks = blocks, .max_sequences = batch, .max_tokens = tokens});

  // Random K/V for `tokens` positions, appended to every sequence and layer.
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  std::vector<float> host(static_cast<std::size_t>(tokens) * kv_row);
  for (float& value : host) value = normal(rng);
  float* values = nullptr;
  check(cudaMalloc(&values, host.size() * sizeof(float)), "cudaMalloc");
  check(cudaMemcpy(values, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice), "upload");
  std::vector<SeqId> seqs;
  for (int s = 0; s < batch; ++s) {
    const SeqId seq = cache.open();
    cache.reserve(seq, tokens);
    for (int layer = 0; layer < layers; ++layer)
      cache.append(layer, seq, std::span<const float>(values, host.size()), std::span<const float>(values, host.size()));
    seqs.push_back(seq);
  }
  const std::size_t q_size = static_cast<std::size_t>(batch) * layer_shape.q_heads * layer_shape.head_dim;
  Eigen::bfloat16 *q = nullptr, *out = nullptr;
  check(cudaMalloc(&q, q_size * sizeof(Eigen::bfloat16)), "cudaMalloc");
  check(cudaMalloc(&out, q_size * sizeof(Eigen::bfloat16)), "cudaMalloc");
  check(cudaMemset(q, 0, q_size * sizeof(Eigen::bfloat16)), "cudaMemset");
  check(cudaDeviceSynchronize(), "setup");

  int layer = 0;
  double seconds = 0;  // all iterations'
  for (auto _ : state) {
    const double iteration = 1e-3 * milliseconds([&] {
      attention::decode(cache, layer, std::span<const SeqId>(seqs), std::span<const Eigen::bfloat16>(q, q_size),
                        std::span<Eigen::bfloat16>(out, q_size));
    });
    state.SetIterationTime(iteration);
    seconds += iteration;
    layer = (layer + 1) % layers;
  }
  check(cudaGetLastError(), "decode");
  cudaFree(values);
  cudaFree(q);
  cudaFree(out);

  const double copy_rate = copy_bytes_per_second();
  state.counters["batch"] = batch;
  state.counters["tokens"] = tokens;
  state.counters["layers"] = layers;
  state.counters["bytes_per_second"] = Counter(static_cast<double>(layer_bytes), Counter::kIsIterationInvariantRate);
  // A plain number (as a rate counter it would print with a "/s")
  state.counters["copy_fraction"] =
      static_cast<double>(layer_bytes) / copy_rate / (seconds / static_cast<double>(state.iterations()));
  state.counters["copy_bytes_per_second"] = copy_rate;
}
BENCHMARK(Decode)
    ->ArgNames({"batch", "T"})
    ->ArgsProduct({{1, 16, 64}, {1024, 4096, 16384, 32768}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.2);

}  // namespace
}  // namespace kvcache::bench

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to measure\n");
    return 77;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
