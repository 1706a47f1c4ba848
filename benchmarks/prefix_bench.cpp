// Prefix caching and the block pool: match_prefix + share of a cached 4,096-token prompt (per
// token), the block hash alone, and block allocation through eviction of cached prefixes.
//   kvcache_bench --benchmark_filter='Prefix|BlockPool'
#include <benchmark/benchmark.h>

#include <numeric>

#include "bench_support.hpp"

namespace kvcache::bench {
namespace {

constexpr int prompt_tokens = 4096;

std::vector<std::int32_t> prompt_ids(int count, int first = 1) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(count));
  std::iota(ids.begin(), ids.end(), first);
  return ids;
}

// Seconds per token, from the iteration time (printed as a time: "2.1ns").
benchmark::Counter per_token(int tokens) {
  return benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// A new sequence shares the 4,096 cached positions of its prompt (256 blocks: hash, verify,
// reference), then ends (the blocks go back to the cached set).
void Prefix_match_share_release(benchmark::State& state) {
  KVCache<Paged<16>, f16> cache({1, q_heads, kv_heads, head_dim}, {.num_blocks = 512, .max_sequences = 4});
  const auto ids = prompt_ids(prompt_tokens + 1);  // the last token is always computed
  const SeqId writer = cache.open();
  cache.reserve(writer, prompt_tokens);
  const auto rows = random_values(static_cast<std::size_t>(prompt_tokens) * kv_heads * head_dim);
  cache.append(0, writer, rows, rows);
  cache.publish_prefix(writer, std::span(ids).first(prompt_tokens));
  cache.release(writer);
  for (auto _ : state) {
    const SeqId seq = cache.open();
    benchmark::DoNotOptimize(cache.match_prefix(seq, ids));
    cache.release(seq);
  }
  if (cache.pool_stats().prefix_hit_tokens != static_cast<std::uint64_t>(prompt_tokens) * state.iterations())
    state.SkipWithError("the prompt was not matched in full");
  state.counters["time_per_token"] = per_token(prompt_tokens);
  state.counters["tokens"] = prompt_tokens;
}
BENCHMARK(Prefix_match_share_release);

// The chained block hash alone, for the same prompt.
void Prefix_hash_chain(benchmark::State& state) {
  const auto ids = prompt_ids(prompt_tokens);
  const BlockHash root = prefix_root<f16>({32, q_heads, kv_heads, head_dim}, 16, 0);
  for (auto _ : state) {
    BlockHash hash = root;
    for (std::size_t first = 0; first < ids.size(); first += 16) hash = hash_block(hash, std::span(ids).subspan(first, 16));
    benchmark::DoNotOptimize(hash);
  }
  state.counters["time_per_token"] = per_token(prompt_tokens);
}
BENCHMARK(Prefix_hash_chain);

// A 4,096-token reservation when every block is a cached prefix: each allocation evicts one
// (least recently used first); then the sequence ends and its blocks are free.
void BlockPool_reserve_through_eviction(benchmark::State& state) {
  constexpr int blocks = prompt_tokens / 16;
  KVCache<Paged<16>, f16> cache({1, 1, 1, 16}, {.num_blocks = blocks, .max_sequences = 4});
  const SeqId writer = cache.open();
  cache.reserve(writer, prompt_tokens);
  const std::vector<float> rows(static_cast<std::size_t>(prompt_tokens) * 16, 0.5f);
  cache.append(0, writer, rows, rows);
  cache.release(writer);
  int first_id = 0;
  for (auto _ : state) {
    state.PauseTiming();  // fill the pool with cached prefixes again
    const SeqId filler = cache.open();
    cache.reserve(filler, prompt_tokens);
    cache.append(0, filler, rows, rows);
    cache.publish_prefix(filler, prompt_ids(prompt_tokens, first_id += prompt_tokens));
    cache.release(filler);
    state.ResumeTiming();
    const SeqId seq = cache.open();
    cache.reserve(seq, prompt_tokens);
    cache.release(seq);
  }
  if (cache.pool_stats().evictions < static_cast<std::uint64_t>(blocks) * state.iterations())
    state.SkipWithError("the reservations did not evict");
  state.SetItemsProcessed(state.iterations() * 2 * blocks);
  state.SetLabel("items = block allocations (each evicting) and frees");
}
BENCHMARK(BlockPool_reserve_through_eviction);

}  // namespace
}  // namespace kvcache::bench
