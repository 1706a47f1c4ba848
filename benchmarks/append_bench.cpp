// Writing K/V into the cache: one token per layer (decode) and a 512-token prompt (prefill),
// reported as bytes of K/V handed to append per second (as f16, whatever the cache stores). The
// quantized types include choosing each row's scale (dtype/scale_search.hpp).
#include <benchmark/benchmark.h>

#include "bench_support.hpp"

namespace kvcache::bench {
namespace {

template <class Layout, class DType>
void BM_append(benchmark::State& state) {
  const int tokens_per_append = static_cast<int>(state.range(0));
  const int capacity = 8192;
  KVCache<Layout, DType> cache({1, q_heads, kv_heads, head_dim}, policy_for<Layout>(capacity));
  const auto k = random_values(static_cast<std::size_t>(tokens_per_append) * kv_heads * head_dim, 1);
  const auto v = random_values(k.size(), 2);
  SeqId seq = cache.open();
  for (auto _ : state) {
    if (!cache.can_reserve(seq, tokens_per_append)) {
      state.PauseTiming();
      cache.release(seq);
      seq = cache.open();
      state.ResumeTiming();
    }
    cache.reserve(seq, tokens_per_append);
    cache.append(0, seq, std::span<const float>(k), std::span<const float>(v));
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * 2 * k.size() * sizeof(Eigen::half)));
  state.SetItemsProcessed(state.iterations() * tokens_per_append);
}

BENCHMARK_TEMPLATE(BM_append, Contiguous, f16)->Arg(1)->Arg(512);
BENCHMARK_TEMPLATE(BM_append, Paged<16>, f16)->Arg(1)->Arg(512);
BENCHMARK_TEMPLATE(BM_append, SlidingWindow, f16)->Arg(1)->Arg(512);
BENCHMARK_TEMPLATE(BM_append, Contiguous, int8)->Arg(1)->Arg(512);
BENCHMARK_TEMPLATE(BM_append, Contiguous, fp8_e4m3)->Arg(1)->Arg(512);

}  // namespace
}  // namespace kvcache::bench
