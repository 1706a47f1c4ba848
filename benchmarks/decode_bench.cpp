// Decode attention at the Llama-3-8B layer shape, f16 K/V, one sequence of T tokens, one
// thread; and, in the same binary, a plain read of the same number of bytes, so that
// attention GB/s can be quoted as a fraction of what this machine's memory delivers.
#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include "bench_support.hpp"

namespace kvcache::bench {
namespace {

// Each iteration decodes one layer; the cache has enough layers to stream streamed_bytes.
template <class Layout>
struct DecodeSetup {
  using Cache = KVCache<Layout, f16>;
  std::unique_ptr<Cache> cache;
  SeqId seq;
  int tokens = 0;

  static DecodeSetup& get(int tokens) {
    static DecodeSetup setup;
    if (setup.tokens != tokens) {
      setup.cache.reset();
      const std::size_t layer_bytes = static_cast<std::size_t>(tokens) * kv_heads * head_dim * 2 * 2;
      const int layers = static_cast<int>((streamed_bytes + layer_bytes - 1) / layer_bytes);
      setup.cache = std::make_unique<Cache>(ModelShape{layers, q_heads, kv_heads, head_dim},
                                            policy_for<Layout>(tokens));
      setup.seq = setup.cache->open();
      setup.cache->reserve(setup.seq, tokens);
      const auto k = random_values(static_cast<std::size_t>(tokens) * kv_heads * head_dim, 1);
      const auto v = random_values(k.size(), 2);
      for (int layer = 0; layer < layers; ++layer)
        setup.cache->append(layer, setup.seq, std::span<const float>(k), std::span<const float>(v));
      setup.tokens = tokens;
    }
    return setup;
  }
};

template <class Layout>
void BM_decode(benchmark::State& state) {
  const int tokens = static_cast<int>(state.range(0));
  auto& setup = DecodeSetup<Layout>::get(tokens);
  const int layers = setup.cache->shape().layers;
  const auto q = random_values(q_heads * head_dim, 3);
  std::vector<float> out(q.size());
  int layer = 0;
  for (auto _ : state) {
    attention::decode(*setup.cache, layer, std::span<const SeqId>(&setup.seq, 1),
                      std::span<const float>(q), std::span<float>(out));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    layer = layer + 1 == layers ? 0 : layer + 1;
  }
  const std::size_t bytes = static_cast<std::size_t>(tokens) * kv_heads * head_dim * 2 * sizeof(Eigen::half);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  state.counters["layers"] = layers;
}

BENCHMARK_TEMPLATE(BM_decode, Contiguous)->Arg(512)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode, Paged<16>)->Arg(512)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode, SlidingWindow)->Arg(512)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond);

// The reference: one thread reading the same number of bytes per iteration as BM_decode at
// that T, chunk after chunk of a buffer as large as the decode benchmarks stream. Summed as
// floats, which the vector units do far faster than memory delivers them: the memory limit.
void BM_decode_read_bandwidth(benchmark::State& state) {
  const std::size_t chunk_bytes = static_cast<std::size_t>(state.range(0)) * kv_heads * head_dim * 2 * 2;
  const std::size_t chunk = chunk_bytes / sizeof(float);
  const std::size_t chunks = (streamed_bytes + chunk_bytes - 1) / chunk_bytes;
  const std::vector<float> buffer(chunks * chunk, 1.0f);
  std::size_t index = 0;
  for (auto _ : state) {
    const float sum = Eigen::Map<const Eigen::VectorXf>(buffer.data() + index * chunk,
                                                        static_cast<Eigen::Index>(chunk)).sum();
    benchmark::DoNotOptimize(sum);
    index = index + 1 == chunks ? 0 : index + 1;
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * chunk_bytes));
}
BENCHMARK(BM_decode_read_bandwidth)->Arg(512)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvcache::bench
