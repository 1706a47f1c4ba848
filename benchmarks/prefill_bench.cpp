// Chunked prefill against the FMA peak measured in the same run: a chunk of queries attends
// the cached tokens before it and itself (causal), for one Llama-3-8B layer.
//   kvcache_bench --benchmark_filter=Prefill
#include <benchmark/benchmark.h>

#include "bench_support.hpp"
#include "roofline.hpp"

namespace kvcache::bench {
namespace {

template <class DType>
void Prefill(benchmark::State& state) {
  const int chunk = static_cast<int>(state.range(0)), cached = static_cast<int>(state.range(1));
  const int threads = static_cast<int>(state.range(2));
  const Roofline& ceiling = roofline(threads);
  const int tokens = cached + chunk;
  KVCache<Contiguous, DType> cache({1, q_heads, kv_heads, head_dim}, {.max_sequences = 1, .max_tokens = tokens});
  const SeqId seq = cache.open();
  cache.reserve(seq, tokens);
  const auto kv = random_values(static_cast<std::size_t>(tokens) * kv_heads * head_dim, 1);
  cache.append(0, seq, kv, kv);
  const auto q = random_values(static_cast<std::size_t>(chunk) * q_heads * head_dim, 2);
  std::vector<float> out(q.size());
  const double seconds = seconds_per_iteration(state, [&] {
    attention::prefill(cache, 0, seq, q, out);
    benchmark::DoNotOptimize(out.data());
  });
  // Query i sees cached + i + 1 keys; each key costs 2 FMAs (q.k and p.v) per head and dimension.
  const double keys = static_cast<double>(chunk) * cached + static_cast<double>(chunk) * (chunk + 1) / 2;
  const double flops = 4.0 * keys * q_heads * head_dim;
  using benchmark::Counter;
  state.counters["threads"] = threads;
  state.counters["flops_per_second"] = Counter(flops, Counter::kIsIterationInvariantRate);
  state.counters["fma_peak_fraction"] = flops / ceiling.flops_per_second / seconds;
}
BENCHMARK_TEMPLATE(Prefill, f16)->Args({512, 4096, 1})->Args({512, 4096, 2})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(Prefill, bf16)->Args({512, 4096, 1})->Args({512, 4096, 2})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(Prefill, f32)->Args({512, 4096, 1})->Args({512, 4096, 2})->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace kvcache::bench
