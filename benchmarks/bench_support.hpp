// Shared by the benchmarks: the Llama-3-8B layer shape and caches big enough to stream from
// memory rather than from the last-level cache.
#pragma once

#include <benchmark/benchmark.h>
#include <kvcache/kvcache.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <random>
#include <vector>

namespace kvcache::bench {

// One layer of Llama-3-8B: 32 query heads, 8 kv-heads of 128 (GQA, groups of 4).
inline constexpr int q_heads = 32;
inline constexpr int kv_heads = 8;
inline constexpr int head_dim = 128;

// The benchmarks are built with head_dim 128's fast kernels only (KVCACHE_FAST_HEAD_DIMS in
// benchmarks/CMakeLists.txt): a shape of another head size would time the portable path.
static_assert(attention::has_fast_kernels(head_dim));

inline std::vector<float> random_values(std::size_t count, unsigned seed = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> values(count);
  for (float& value : values) value = normal(rng);
  return values;
}

// Runs `step` once per benchmark iteration and returns the wall-clock seconds per iteration.
// Counters that divide by the time (fractions of a ceiling, nanoseconds per row) are computed
// from it as plain numbers: as Google Benchmark rate counters they would print with a "/s".
template <class Step>
double seconds_per_iteration(benchmark::State& state, Step&& step) {
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) step();
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  return state.iterations() > 0 ? elapsed.count() / static_cast<double>(state.iterations()) : 0.0;
}

template <class Layout>
inline constexpr bool is_paged = false;
template <int BlockTokens, class Eviction>
inline constexpr bool is_paged<Paged<BlockTokens, Eviction>> = true;

// A policy holding `sequences` sequences of `tokens` positions.
template <class Layout>
Layout policy_for(int tokens, int sequences = 1) {
  if constexpr (std::same_as<Layout, Contiguous>)
    return {.max_sequences = sequences, .max_tokens = tokens};
  else if constexpr (is_paged<Layout>)
    return {.num_blocks = sequences * Layout::blocks_for(tokens), .max_sequences = sequences};
  else
    return {.max_sequences = sequences, .window = tokens};
}

}  // namespace kvcache::bench
