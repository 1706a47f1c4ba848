// attention::decode and attention::prefill over a cache: validation at the edge, then the
// backend's kernel, chosen at compile time from the cache's Backend tag. For backend::cuda, q
// and out are device memory, the kernels are queued on `stream`, and the calling file must be
// compiled by nvcc (attention/cuda/*.cuh).
//
// Works with any cache type that offers shape(), view(layer, seq) and backend_type (KVCache
// does); this header does not include the cache, and the cache does not include kernels.
#pragma once

#include <concepts>
#include <cstddef>
#include <ranges>
#include <span>
#include <utility>
#include <vector>

#include "../backend/cpu.hpp"
#include "../error.hpp"
#include "../sequence.hpp"
#include "../shape.hpp"
#include "../view.hpp"
#include "cpu.hpp"
#include "params.hpp"

#if KVCACHE_CUDA_KERNELS
#include "cuda/decode.cuh"
#include "cuda/prefill.cuh"
#endif

KVCACHE_BEGIN_NAMESPACE

namespace attention {

namespace detail {

template <class View>
void check_view(const View& view, int queries, SeqId seq, int layer, const char* operation) {
  if (queries < 1 || queries > view.length)
    kvcache::detail::fail(errc::out_of_range, operation, "(layer ", layer, ", ", seq, "): ",
                          queries, " queries but the layer holds ", view.length,
                          " positions; append the queries' K/V first");
  const int query = view.length - queries;
  if (view.first_needed(query) < view.first_held)
    kvcache::detail::fail(errc::position_overwritten, operation, "(layer ", layer, ", ", seq,
                          "): the query at position ", query, " sees position ",
                          view.first_needed(query), ", but the window's ring holds only from ",
                          view.first_held, "; prefill in chunks of at most slack_tokens + 1");
}

template <class Cache>
void check_sizes(const Cache& cache, std::size_t queries, std::size_t q_size, std::size_t out_size,
                 const char* operation) {
  const std::size_t expected =
      queries * static_cast<std::size_t>(cache.shape().q_heads) * cache.shape().head_dim;
  if (q_size != expected || out_size != expected)
    kvcache::detail::fail(errc::shape_mismatch, operation, ": q has ", q_size, " and out ",
                          out_size, " elements; both must be ", queries,
                          " queries * q_heads * head_dim = ", expected);
}

#if KVCACHE_CUDA_KERNELS
template <class Cache>
inline constexpr bool runs_on_cuda = std::same_as<typename Cache::backend_type, backend::cuda>;
#else
template <class Cache>
inline constexpr bool runs_on_cuda = false;
#endif

template <class Cache>
inline constexpr bool no_kernels_for = !std::same_as<typename Cache::backend_type, backend::cpu> && !runs_on_cuda<Cache>;

}  // namespace detail

// One new query token for each sequence of a batch (ragged lengths welcome).
//   q, out: contiguous ranges of [seqs.size()][q_heads][head_dim] float, Eigen::half or
//           Eigen::bfloat16; sequence i's query sits at position length(seqs[i], layer) - 1,
//           whose K/V must already be appended.
template <class Cache, std::ranges::contiguous_range QRange, std::ranges::contiguous_range ORange>
void decode(const Cache& cache, int layer, std::span<const SeqId> seqs, const QRange& q,
            ORange&& out, const AttentionParams& params = {}, [[maybe_unused]] typename Cache::stream_type stream = {}) {
  detail::check_sizes(cache, seqs.size(), std::ranges::size(q), std::ranges::size(out), "decode");
  using View = decltype(cache.view(layer, seqs[0]));
  thread_local std::vector<View> views;  // grows to the largest batch, then never allocates
  views.clear();
  for (SeqId seq : seqs) {
    views.push_back(cache.view(layer, seq));
    detail::check_view(views.back(), 1, seq, layer, "decode");
  }
  static_assert(!detail::no_kernels_for<Cache>,
                "no attention kernels for this backend here (backend::cuda: compile this file with nvcc)");
  if constexpr (std::same_as<typename Cache::backend_type, backend::cpu>) {
    cpu::decode(std::span<const View>(views), cache.shape().q_heads, std::ranges::data(q), std::ranges::data(out),
                params);
  }
#if KVCACHE_CUDA_KERNELS
  if constexpr (detail::runs_on_cuda<Cache>)
    cuda::decode(std::span<const View>(views), cache.shape().q_heads, std::ranges::data(q), std::ranges::data(out),
                 params, stream);
#endif
}

// decode() for a batch of one.
template <class Cache, std::ranges::contiguous_range QRange, std::ranges::contiguous_range ORange>
void decode(const Cache& cache, int layer, SeqId seq, const QRange& q, ORange&& out,
            const AttentionParams& params = {}, typename Cache::stream_type stream = {}) {
  decode(cache, layer, std::span<const SeqId>(&seq, 1), q, std::forward<ORange>(out), params, stream);
}

// Chunked prefill of several sequences in one call (continuous batching): seqs[i] has
// queries[i] >= 1 new tokens, appended already, so they sit at its last queries[i] positions;
// each is causal against the cache and itself.
//   q, out: contiguous ranges of [queries[0] + queries[1] + ...][q_heads][head_dim], the
//           sequences' rows one after another in the order of seqs
// The CPU runs the sequences one after another (each over every thread); CUDA launches once
// per 64 sequences.
template <class Cache, std::ranges::contiguous_range QRange, std::ranges::contiguous_range ORange>
void prefill(const Cache& cache, int layer, std::span<const SeqId> seqs, std::span<const int> queries,
             const QRange& q, ORange&& out, const AttentionParams& params = {},
             [[maybe_unused]] typename Cache::stream_type stream = {}) {
  if (seqs.size() != queries.size())
    kvcache::detail::fail(errc::shape_mismatch, "prefill: ", seqs.size(), " sequences but ", queries.size(),
                          " query counts; give one count per sequence");
  using View = decltype(cache.view(layer, seqs[0]));
  thread_local std::vector<View> views;  // grows to the largest batch, then never allocates
  views.clear();
  std::size_t all_queries = 0;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    views.push_back(cache.view(layer, seqs[i]));
    detail::check_view(views.back(), queries[i], seqs[i], layer, "prefill");
    all_queries += static_cast<std::size_t>(queries[i]);
  }
  detail::check_sizes(cache, all_queries, std::ranges::size(q), std::ranges::size(out), "prefill");
  static_assert(!detail::no_kernels_for<Cache>,
                "no attention kernels for this backend here (backend::cuda: compile this file with nvcc)");
  if constexpr (std::same_as<typename Cache::backend_type, backend::cpu>) {
    const std::size_t per_query = static_cast<std::size_t>(cache.shape().q_heads) * cache.shape().head_dim;
    std::size_t offset = 0;
    for (std::size_t i = 0; i < views.size(); ++i) {
      cpu::prefill(views[i], cache.shape().q_heads, queries[i], std::ranges::data(q) + offset,
                   std::ranges::data(out) + offset, params);
      offset += static_cast<std::size_t>(queries[i]) * per_query;
    }
  }
#if KVCACHE_CUDA_KERNELS
  if constexpr (detail::runs_on_cuda<Cache>)
    cuda::prefill(std::span<const View>(views), cache.shape().q_heads, queries, std::ranges::data(q),
                  std::ranges::data(out), params, stream);
#endif
}

// n query tokens of one sequence (a prompt or a chunk of one), causal against the cache and
// themselves. Their K/V must already be appended, so they sit at the last n positions.
//   q, out: contiguous ranges of [n][q_heads][head_dim]
template <class Cache, std::ranges::contiguous_range QRange, std::ranges::contiguous_range ORange>
void prefill(const Cache& cache, int layer, SeqId seq, const QRange& q, ORange&& out,
             const AttentionParams& params = {}, typename Cache::stream_type stream = {}) {
  const std::size_t per_query = static_cast<std::size_t>(cache.shape().q_heads) * cache.shape().head_dim;
  const std::size_t queries = std::ranges::size(q) / per_query;
  detail::check_sizes(cache, queries, std::ranges::size(q), std::ranges::size(out), "prefill");
  const int count = static_cast<int>(queries);
  prefill(cache, layer, std::span<const SeqId>(&seq, 1), std::span<const int>(&count, 1), q,
          std::forward<ORange>(out), params, stream);
}

}  // namespace attention

KVCACHE_END_NAMESPACE
