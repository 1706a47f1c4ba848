// Paged bookkeeping: block allocate/free, and whole-sequence reserve/release through the cache.
#include <benchmark/benchmark.h>

#include "bench_support.hpp"

namespace kvcache::bench {
namespace {

void BM_block_pool_allocate_free(benchmark::State& state) {
  BlockPool pool(4096);
  std::vector<std::int32_t> held(64);
  for (auto _ : state) {
    for (auto& block : held) block = pool.allocate();
    for (auto block : held) pool.release(block);
    benchmark::DoNotOptimize(held.data());
  }
  state.SetItemsProcessed(state.iterations() * 2 * static_cast<std::int64_t>(held.size()));
  state.SetLabel("items = allocate or free operations");
}
BENCHMARK(BM_block_pool_allocate_free);

// A 4096-token sequence: reserve 256 blocks, fork it (sharing), release both.
void BM_paged_reserve_fork_release(benchmark::State& state) {
  KVCache<Paged<16>, f16> cache({1, q_heads, kv_heads, head_dim}, {.num_blocks = 512, .max_sequences = 4});
  for (auto _ : state) {
    const SeqId seq = cache.open();
    cache.reserve(seq, 4096);
    const SeqId child = cache.fork(seq);
    cache.release(child);
    cache.release(seq);
  }
  state.SetItemsProcessed(state.iterations() * 256 * 3);
  state.SetLabel("items = block operations (allocate, share, free)");
}
BENCHMARK(BM_paged_reserve_fork_release);

}  // namespace
}  // namespace kvcache::bench
