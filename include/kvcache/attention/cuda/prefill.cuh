// CUDA prefill: new query tokens of one or more sequences (chunked prefill, continuous
// batching), causal against the cache and themselves, in one launch per 64 sequences.
//
// A thread block takes up to 32 query rows (consecutive queries x the query heads of one
// kv-head's group) and walks the keys they see in tiles of 32 rows staged in shared memory:
// each warp owns up to eight query rows; for a row, lane i scores key i of the tile, the warp
// folds the tile into the row's online softmax, and the weights are broadcast by shuffles while
// each lane accumulates its own slice of head_dim. The causal and window masks only bite on
// the tiles at the diagonal and at the window's edge; keys no query of the block sees are never
// loaded.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>

#include "../params.hpp"
#include "common.cuh"

KVCACHE_BEGIN_NAMESPACE

namespace attention::cuda {

namespace detail {

inline constexpr int prefill_rows = 32;  // query rows per thread block
inline constexpr int key_tile = 32;      // key rows staged per step: one per lane

struct PrefillArgs {
  const float* q;        // [all queries of the call][q_heads][head_dim], scaled
  int q_heads;
  int group;
  int heads;             // query heads per block
  int head_chunks;       // blocks per kv-head
  int queries_per_block;
  float soft_cap;
};

// The queries of each view of a launch: view i's are at positions [length - queries[i], length)
// and are rows [first_query[i], + queries[i]) of the call's q and out.
struct PrefillQueries {
  int queries[views_per_launch];
  int first_query[views_per_launch];
};

// Shared memory of one block: q rows as fp32, then the K tile (rows padded by 4 bytes so that
// lanes reading the same column of different rows hit different banks), then the V tile, then
// the K and V scales of the tile's rows (quantized types; 1 for the others).
template <class Storage, int HeadDim>
struct PrefillTiles {
  static constexpr int k_stride = HeadDim + 4 / static_cast<int>(sizeof(Storage));  // elements
  static constexpr std::size_t q_bytes = sizeof(float) * prefill_rows * HeadDim;
  static constexpr std::size_t k_bytes = sizeof(Storage) * key_tile * k_stride;
  static constexpr std::size_t v_bytes = sizeof(Storage) * key_tile * HeadDim;
  static constexpr std::size_t scale_bytes = sizeof(float) * key_tile;
  static constexpr std::size_t bytes = q_bytes + k_bytes + v_bytes + 2 * scale_bytes;
  static_assert(q_bytes % 16 == 0 && k_bytes % 16 == 0 && v_bytes % 16 == 0, "tiles stay 16-byte aligned");
};

template <class Storage, int HeadDim, class O>
__global__ void __launch_bounds__(block_threads) prefill_kernel(const ViewBatch<Storage> batch,
                                                                const PrefillQueries calls, const PrefillArgs args,
                                                                O* out) {
  using Tiles = PrefillTiles<Storage, HeadDim>;
  constexpr int rows_per_warp = prefill_rows / block_warps;
  constexpr int per_lane = HeadDim / 32;  // output elements each lane accumulates
  constexpr int chunks_per_row = HeadDim * static_cast<int>(sizeof(Storage)) / 16;
  unsigned char* shared = backend::cuda_detail::dynamic_shared_memory();
  float* q_tile = reinterpret_cast<float*>(shared);
  Storage* k_tile = reinterpret_cast<Storage*>(shared + Tiles::q_bytes);
  Storage* v_tile = reinterpret_cast<Storage*>(shared + Tiles::q_bytes + Tiles::k_bytes);
  float* k_scale_tile = reinterpret_cast<float*>(shared + Tiles::q_bytes + Tiles::k_bytes + Tiles::v_bytes);
  float* v_scale_tile = k_scale_tile + key_tile;
  const int sequence = static_cast<int>(blockIdx.z);
  const int all_queries = calls.queries[sequence];
  const int first_query = static_cast<int>(blockIdx.x) * args.queries_per_block;
  if (first_query >= all_queries) return;  // a sequence with fewer queries than the launch's most
  __shared__ __align__(16) unsigned char view_bytes[sizeof(SequenceView<Storage>)];
  auto& view = *reinterpret_cast<SequenceView<Storage>*>(view_bytes);
  if (threadIdx.x == 0) view = batch.views[sequence];

  const int chunk = static_cast<int>(blockIdx.y) % args.head_chunks;
  const int kv_head = static_cast<int>(blockIdx.y) / args.head_chunks;
  const int first_head = kv_head * args.group + chunk * args.heads;
  const int heads = min(args.heads, args.group - chunk * args.heads);
  const int queries = min(args.queries_per_block, all_queries - first_query);
  const int rows = queries * heads;  // row r: query r / heads, head r % heads
  const std::size_t first_row = static_cast<std::size_t>(calls.first_query[sequence]) + first_query;
  for (int i = static_cast<int>(threadIdx.x); i < rows * HeadDim; i += block_threads) {
    const int r = i / HeadDim, d = i % HeadDim;
    q_tile[i] = args.q[((first_row + r / heads) * args.q_heads + first_head + r % heads) * HeadDim + d];
  }
  __syncthreads();
  const int first_position = view.length - all_queries + first_query;
  const int last_position = first_position + queries - 1;

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float running_max[rows_per_warp], running_sum[rows_per_warp], acc[rows_per_warp][per_lane];
#pragma unroll
  for (int j = 0; j < rows_per_warp; ++j) {
    running_max[j] = -INFINITY;
    running_sum[j] = 0.0f;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) acc[j][e] = 0.0f;
  }

  // Soft-capped logits of a cache with key offsets: the stored keys' scores lack q . offset,
  // which the cap, unlike softmax, does not cancel (uniform over each warp).
  float shift[rows_per_warp];
#pragma unroll
  for (int j = 0; j < rows_per_warp; ++j) {
    const int r = warp + block_warps * j;
    shift[j] = 0.0f;
    if (args.soft_cap > 0.0f && view.key_offset != nullptr && r < rows) {
      const float* offset = view.key_offset + static_cast<std::size_t>(kv_head) * HeadDim;
      for (int d = lane; d < HeadDim; d += 32) shift[j] = fmaf(q_tile[r * HeadDim + d], offset[d], shift[j]);
#pragma unroll
      for (int lanes = 16; lanes > 0; lanes /= 2) shift[j] += __shfl_xor_sync(0xffffffffu, shift[j], lanes);
    }
  }

  auto run = [&](int begin, int end) {
    for (int tile = begin; tile < end; tile += key_tile) {
      const int count = min(key_tile, end - tile);
      __syncthreads();  // the previous tile is consumed
      for (int c = static_cast<int>(threadIdx.x); c < count * chunks_per_row; c += block_threads) {
        const int t = c / chunks_per_row, part = c % chunks_per_row;
        const RowPair<Storage> row = locate_row(view, kv_head, tile + t);
        const uint4 k_bits = __ldg(reinterpret_cast<const uint4*>(row.k) + part);
        const uint4 v_bits = __ldg(reinterpret_cast<const uint4*>(row.v) + part);
        auto* k_words = reinterpret_cast<unsigned*>(k_tile + t * Tiles::k_stride) + part * 4;
        k_words[0] = k_bits.x;
        k_words[1] = k_bits.y;
        k_words[2] = k_bits.z;
        k_words[3] = k_bits.w;
        reinterpret_cast<uint4*>(v_tile + t * HeadDim)[part] = v_bits;
        if (part == 0) {
          k_scale_tile[t] = row.k_scale;
          v_scale_tile[t] = row.v_scale;
        }
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < rows_per_warp; ++j) {
        const int r = warp + block_warps * j;
        if (r >= rows) break;  // uniform over the warp
        const int position = first_position + r / heads;
        const int key = tile + lane;
        const bool visible = lane < count && key <= position &&
                             (key >= view.first_needed(position) || key < view.sink_tokens);
        float score = -INFINITY;
        if (visible) {
          const float* q_row = q_tile + r * HeadDim;
          const Storage* k_row = k_tile + lane * Tiles::k_stride;
          float dot = 0.0f;
#pragma unroll 16
          for (int d = 0; d < HeadDim; ++d) dot = fmaf(q_row[d], to_float(k_row[d]), dot);
          score = to_log2_logit(dot * k_scale_tile[lane] + shift[j], args.soft_cap);
        }
        float tile_max = score;
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
        if (tile_max == -INFINITY) continue;  // no key of this tile is visible to the row
        const float new_max = fmaxf(running_max[j], tile_max);
        const float factor = exp2f(running_max[j] - new_max);
        const float weight = exp2f(score - new_max);
        float weight_sum = weight;
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) weight_sum += __shfl_xor_sync(0xffffffffu, weight_sum, offset);
        running_sum[j] = running_sum[j] * factor + weight_sum;
        running_max[j] = new_max;
#pragma unroll
        for (int e = 0; e < per_lane; ++e) acc[j][e] *= factor;
        for (int t = 0; t < count; ++t) {
          const float w = __shfl_sync(0xffffffffu, weight, t) * v_scale_tile[t];
#pragma unroll
          for (int e = 0; e < per_lane; ++e) acc[j][e] = fmaf(w, to_float(v_tile[t * HeadDim + lane + 32 * e]), acc[j][e]);
        }
      }
    }
  };
  // Keys the block's queries see: the sinks before the window, then from the first query's
  // window start to the last query (rows mask the rest).
  const int recent_begin = view.first_needed(first_position);
  run(0, view.window == 0 ? 0 : min(min(view.sink_tokens, recent_begin), last_position + 1));
  run(recent_begin, last_position + 1);

#pragma unroll
  for (int j = 0; j < rows_per_warp; ++j) {
    const int r = warp + block_warps * j;
    if (r >= rows) break;
    const float inverse = 1.0f / running_sum[j];
    O* target = out + ((first_row + r / heads) * args.q_heads + first_head + r % heads) * HeadDim;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) target[lane + 32 * e] = from_float<O>(acc[j][e] * inverse);
  }
}

}  // namespace detail

// Attention for the last queries[i] positions of views[i], causal, on `stream`.
//   q, out: device memory, [sum of queries][q_heads][head_dim] of float, Eigen::half or
//           Eigen::bfloat16, the views' rows one after another
// @pre as cpu::prefill for each view; head_dim is 64, 128 or 256 (else
//      Error{invalid_configuration}); no Hadamard-rotated rows.
template <class Storage, class Q, class O>
void prefill(std::span<const SequenceView<Storage>> views, int q_heads, std::span<const int> queries, const Q* q,
             O* out, const AttentionParams& params, cudaStream_t stream) {
  using namespace detail;
  if (views.empty()) return;
  const int head_dim = views[0].head_dim, kv_heads = views[0].kv_heads;
  const int group = q_heads / kv_heads;
  const int heads = std::min(group, prefill_rows);
  const int head_chunks = (group + heads - 1) / heads;
  const int queries_per_block = prefill_rows / heads;
  const float scale = params.scale.value_or(1.0f / std::sqrt(static_cast<float>(head_dim)));
  dispatch_head_dim(head_dim, [&](auto head_dim_constant) {
    constexpr int HeadDim = decltype(head_dim_constant)::value;
    std::size_t all_queries = 0;
    for (int n : queries) all_queries += static_cast<std::size_t>(n);
    const std::size_t elements = all_queries * q_heads * HeadDim;
    float* q_scaled = workspace().floats(elements);
    launch_prepare_queries(q, scale, elements, q_scaled, stream);
    auto* kernel = prefill_kernel<Storage, HeadDim, O>;
    constexpr std::size_t shared_bytes = PrefillTiles<Storage, HeadDim>::bytes;
    if constexpr (shared_bytes > 48 * 1024)
      backend::cuda::check(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(shared_bytes)),
                           "cudaFuncSetAttribute (prefill shared memory)");
    const PrefillArgs args{q_scaled, q_heads, group, heads, head_chunks, queries_per_block, params.soft_cap};
    int first_query = 0;
    for (std::size_t first = 0; first < views.size(); first += views_per_launch) {
      const int count = static_cast<int>(std::min<std::size_t>(views_per_launch, views.size() - first));
      ViewBatch<Storage> batch;
      PrefillQueries calls;
      int tiles = 1;
      for (int i = 0; i < count; ++i) {
        batch.views[i] = views[first + i];
        calls.queries[i] = queries[first + i];
        calls.first_query[i] = first_query;
        first_query += calls.queries[i];
        tiles = std::max(tiles, (calls.queries[i] + queries_per_block - 1) / queries_per_block);
      }
      launch(kernel,
             dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(kv_heads * head_chunks),
                  static_cast<unsigned>(count)),
             dim3(block_threads), shared_bytes, stream, "prefill kernel launch", batch, calls, args, out);
    }
  });
}

}  // namespace attention::cuda

KVCACHE_END_NAMESPACE
