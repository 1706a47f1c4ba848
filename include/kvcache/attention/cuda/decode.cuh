// CUDA decode: one new query per sequence over a ragged batch, flash-decoding style.
//
// Each thread block takes one (sequence, kv-head, token range of split_tokens keys) and serves
// up to eight query heads of the kv-head's group from one read of its K/V rows, so a GQA group
// costs the bytes of one head. Inside the block a row of K or V is read by `lanes` threads with
// 16-byte loads (fp16/bf16 and int8/fp8 codes converted in registers; a quantized row's scale
// multiplies its score for K and its weight for V), each warp holds several rows in flight, and
// every row group keeps its own online-softmax state in base 2; the row groups of a block are
// merged (shuffles, then shared memory) into one partial result per query head, and a second kernel merges
// the token ranges of each sequence. Ranges are fixed by the sequence alone (as on the CPU), so
// a sequence's output does not depend on the rest of the batch.
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

inline constexpr int split_tokens = 512;  // keys per thread block (and per partial result)

// How the threads of a block share the rows of K and V.
template <class Storage, int HeadDim>
struct RowLayout {
  static constexpr int vec = 16 / static_cast<int>(sizeof(Storage));  // elements per 16-byte load
  static constexpr int lanes = HeadDim / vec < 32 ? HeadDim / vec : 32;  // threads reading one row
  static constexpr int elems = HeadDim / lanes;                         // elements per thread
  static constexpr int rows_per_warp = 32 / lanes;
  static constexpr int groups = block_warps * rows_per_warp;  // row groups per block
  static_assert(elems % vec == 0 && 32 % lanes == 0);
};

struct DecodeArgs {
  const float* q;               // [views][q_heads][head_dim], scaled
  float* partial_acc;           // [views][q_heads][splits][head_dim]
  float2* partial_state;        // [views][q_heads][splits]: {max, sum} in base 2
  int q_heads;
  int group;                    // query heads per kv-head
  int head_chunks;              // thread blocks per kv-head (group / Heads, rounded up)
  int splits;                   // gridDim.x: the most token ranges of any view in the launch
  float soft_cap;
};

// The first key a view's decode splits start from (keys before it are invisible).
template <class Storage>
KVCACHE_HOST_DEVICE int first_split_key(const SequenceView<Storage>& view) {
  return view.sink_tokens > 0 ? 0 : view.first_needed(view.length - 1);
}

template <class Storage, int HeadDim, int Heads>
__global__ void __launch_bounds__(block_threads) decode_kernel(const ViewBatch<Storage> batch, const DecodeArgs args) {
  using Layout = RowLayout<Storage, HeadDim>;
  constexpr int in_flight = 2;  // consecutive rows each row group loads before computing
  __shared__ __align__(16) unsigned char view_bytes[sizeof(SequenceView<Storage>)];
  __shared__ float shared_max[block_warps][Heads];
  __shared__ float shared_sum[block_warps][Heads];
  __shared__ float shared_acc[block_warps][Heads][HeadDim];
  auto& view = *reinterpret_cast<SequenceView<Storage>*>(view_bytes);
  if (threadIdx.x == 0) view = batch.views[blockIdx.z];
  __syncthreads();

  const int split = static_cast<int>(blockIdx.x);
  const int chunk = static_cast<int>(blockIdx.y) % args.head_chunks;
  const int kv_head = static_cast<int>(blockIdx.y) / args.head_chunks;
  const int heads = min(Heads, args.group - chunk * Heads);
  const std::size_t first_row = static_cast<std::size_t>(blockIdx.z) * args.q_heads + kv_head * args.group + chunk * Heads;
  const int query = view.length - 1;
  const int lo = first_split_key(view) + split * split_tokens;
  if (lo > query) {  // a shorter sequence than the launch's longest: no range here
    if (static_cast<int>(threadIdx.x) < heads)
      args.partial_state[(first_row + threadIdx.x) * args.splits + split] = make_float2(-INFINITY, 0.0f);
    return;
  }
  const int hi = min(lo + split_tokens, query + 1);
  const int recent_begin = view.first_needed(query);
  const int sinks_end = view.window == 0 ? 0 : min(min(view.sink_tokens, recent_begin), query + 1);

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int row_group = lane / Layout::lanes, sub = lane % Layout::lanes;

  float q[Heads][Layout::elems];
  float running_max[Heads], running_sum[Heads], acc[Heads][Layout::elems];
#pragma unroll
  for (int h = 0; h < Heads; ++h) {
    running_max[h] = -INFINITY;
    running_sum[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < Layout::elems; ++e) {
      q[h][e] = h < heads ? args.q[(first_row + h) * HeadDim + sub * Layout::elems + e] : 0.0f;
      acc[h][e] = 0.0f;
    }
  }
  // Soft-capped logits of a cache with key offsets: the stored keys' scores lack q . offset,
  // which the cap, unlike softmax, does not cancel (uniform over the block).
  float shift[Heads];
#pragma unroll
  for (int h = 0; h < Heads; ++h) {
    shift[h] = 0.0f;
    if (args.soft_cap > 0.0f && view.key_offset != nullptr) {
      const float* offset = view.key_offset + static_cast<std::size_t>(kv_head) * HeadDim + sub * Layout::elems;
#pragma unroll
      for (int e = 0; e < Layout::elems; ++e) shift[h] = fmaf(q[h][e], offset[e], shift[h]);
#pragma unroll
      for (int lanes = Layout::lanes / 2; lanes > 0; lanes /= 2) shift[h] += __shfl_xor_sync(0xffffffffu, shift[h], lanes);
    }
  }

  auto run = [&](int begin, int end) {
    // Every lane of a warp runs the same iterations: a row's lanes combine scores by shuffles.
    for (int base = begin + warp * Layout::rows_per_warp * in_flight; base < end; base += Layout::groups * in_flight) {
      float k[in_flight][Layout::elems], v[in_flight][Layout::elems];
      float k_scale[in_flight], v_scale[in_flight];
      bool valid[in_flight];
#pragma unroll
      for (int u = 0; u < in_flight; ++u) {
        const int position = base + row_group * in_flight + u;
        valid[u] = position < end;
        if (valid[u]) {
          const RowPair<Storage> rows = locate_row(view, kv_head, position);
          load_floats<Layout::elems>(rows.k + sub * Layout::elems, k[u]);
          load_floats<Layout::elems>(rows.v + sub * Layout::elems, v[u]);
          k_scale[u] = rows.k_scale;
          v_scale[u] = rows.v_scale;
        } else {
#pragma unroll
          for (int e = 0; e < Layout::elems; ++e) k[u][e] = v[u][e] = 0.0f;
          k_scale[u] = v_scale[u] = 0.0f;
        }
      }
#pragma unroll
      for (int h = 0; h < Heads; ++h) {
        if (h >= heads) break;  // uniform over the block
        float score[in_flight];
        float tile_max = -INFINITY;
#pragma unroll
        for (int u = 0; u < in_flight; ++u) {
          float dot = 0.0f;
#pragma unroll
          for (int e = 0; e < Layout::elems; ++e) dot = fmaf(q[h][e], k[u][e], dot);
#pragma unroll
          for (int offset = Layout::lanes / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
          if constexpr (is_code<Storage>) dot *= k_scale[u];
          score[u] = valid[u] ? to_log2_logit(dot + shift[h], args.soft_cap) : -INFINITY;
          tile_max = fmaxf(tile_max, score[u]);
        }
        if (tile_max == -INFINITY) continue;  // this row group is past the range's end
        const float new_max = fmaxf(running_max[h], tile_max);
        const float factor = exp2f(running_max[h] - new_max);  // 0 while the state is empty
        float weight[in_flight], weight_sum = 0.0f;
#pragma unroll
        for (int u = 0; u < in_flight; ++u) {
          weight[u] = exp2f(score[u] - new_max);
          weight_sum += weight[u];
        }
        running_sum[h] = running_sum[h] * factor + weight_sum;
        running_max[h] = new_max;
#pragma unroll
        for (int e = 0; e < Layout::elems; ++e) {
          float value = acc[h][e] * factor;
#pragma unroll
          for (int u = 0; u < in_flight; ++u)
            value = fmaf(is_code<Storage> ? weight[u] * v_scale[u] : weight[u], v[u][e], value);
          acc[h][e] = value;
        }
      }
    }
  };
  run(lo, min(hi, sinks_end));
  run(max(lo, recent_begin), hi);

  // Merge the row groups' states, first within each warp (lanes holding the same slice of
  // head_dim in different row groups, by shuffles), then the warps' in shared memory: one
  // partial result per query head for this token range.
#pragma unroll
  for (int h = 0; h < Heads; ++h) {
    if (h >= heads) break;  // uniform over the block
#pragma unroll
    for (int offset = Layout::lanes; offset < 32; offset *= 2) {
      const float other_max = __shfl_xor_sync(0xffffffffu, running_max[h], offset);
      const float other_sum = __shfl_xor_sync(0xffffffffu, running_sum[h], offset);
      const float merged = fmaxf(running_max[h], other_max);
      const float own_factor = running_max[h] == -INFINITY ? 0.0f : exp2f(running_max[h] - merged);
      const float other_factor = other_max == -INFINITY ? 0.0f : exp2f(other_max - merged);
      running_sum[h] = running_sum[h] * own_factor + other_sum * other_factor;
      running_max[h] = merged;
#pragma unroll
      for (int e = 0; e < Layout::elems; ++e) {
        const float other_acc = __shfl_xor_sync(0xffffffffu, acc[h][e], offset);
        acc[h][e] = acc[h][e] * own_factor + other_acc * other_factor;
      }
    }
    if (row_group == 0) {
      if (sub == 0) {
        shared_max[warp][h] = running_max[h];
        shared_sum[warp][h] = running_sum[h];
      }
#pragma unroll
      for (int e = 0; e < Layout::elems; ++e) shared_acc[warp][h][sub * Layout::elems + e] = acc[h][e];
    }
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < heads * HeadDim; i += block_threads) {
    const int h = i / HeadDim, d = i % HeadDim;
    float merged_max = -INFINITY;
    for (int g = 0; g < block_warps; ++g) merged_max = fmaxf(merged_max, shared_max[g][h]);
    float sum = 0.0f, value = 0.0f;
    if (merged_max != -INFINITY)
      for (int g = 0; g < block_warps; ++g) {
        if (shared_max[g][h] == -INFINITY) continue;
        const float weight = exp2f(shared_max[g][h] - merged_max);
        sum = fmaf(shared_sum[g][h], weight, sum);
        value = fmaf(shared_acc[g][h][d], weight, value);
      }
    const std::size_t at = (first_row + h) * args.splits + split;
    args.partial_acc[at * HeadDim + d] = value;
    if (d == 0) args.partial_state[at] = make_float2(merged_max, sum);
  }
}

// One thread block per (view, query head): merges its token ranges and writes the output row.
template <int HeadDim, class O>
__global__ void __launch_bounds__(block_threads) merge_splits(const float* partial_acc, const float2* partial_state,
                                                              int splits, O* out) {
  const std::size_t row = blockIdx.x;
  const float2* state = partial_state + row * splits;
  float merged_max = -INFINITY;
  for (int s = 0; s < splits; ++s) merged_max = fmaxf(merged_max, state[s].x);
  float sum = 0.0f;
  for (int s = 0; s < splits; ++s)
    if (state[s].x != -INFINITY) sum = fmaf(state[s].y, exp2f(state[s].x - merged_max), sum);
  const float inverse = 1.0f / sum;
  for (int d = static_cast<int>(threadIdx.x); d < HeadDim; d += block_threads) {
    float value = 0.0f;
    for (int s = 0; s < splits; ++s)
      if (state[s].x != -INFINITY)
        value = fmaf(partial_acc[(row * splits + s) * HeadDim + d], exp2f(state[s].x - merged_max), value);
    out[row * HeadDim + d] = from_float<O>(value * inverse);
  }
}

// Calls f with std::integral_constant<int, heads per block>: the smallest of 1, 2, 4, 8 that
// covers the group (larger groups take several blocks per kv-head).
template <class F>
void dispatch_group(int group, F&& f) {
  if (group >= 8) return f(std::integral_constant<int, 8>{});
  if (group >= 3) return f(std::integral_constant<int, 4>{});
  if (group == 2) return f(std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 1>{});
}

}  // namespace detail

// Attention of the newest position of each view, on `stream`.
//   q, out: device memory, [views.size()][q_heads][head_dim] of float, Eigen::half or
//           Eigen::bfloat16. Views hold device pointers (a backend::cuda cache's view()).
// @pre as cpu::decode; head_dim is 64, 128 or 256 (else Error{invalid_configuration}); no
//      Hadamard-rotated rows.
template <class Storage, class Q, class O>
void decode(std::span<const SequenceView<Storage>> views, int q_heads, const Q* q, O* out,
            const AttentionParams& params, cudaStream_t stream) {
  using namespace detail;
  if (views.empty()) return;
  const int head_dim = views[0].head_dim, kv_heads = views[0].kv_heads, group = q_heads / kv_heads;
  const float scale = params.scale.value_or(1.0f / std::sqrt(static_cast<float>(head_dim)));
  dispatch_head_dim(head_dim, [&](auto head_dim_constant) {
    constexpr int HeadDim = decltype(head_dim_constant)::value;
    dispatch_group(group, [&](auto heads_constant) {
      constexpr int Heads = decltype(heads_constant)::value;
      const int head_chunks = (group + Heads - 1) / Heads;
      for (std::size_t first = 0; first < views.size(); first += views_per_launch) {
        const int count = static_cast<int>(std::min<std::size_t>(views_per_launch, views.size() - first));
        ViewBatch<Storage> batch;
        int splits = 1;
        for (int i = 0; i < count; ++i) {
          batch.views[i] = views[first + i];
          const int keys = batch.views[i].length - first_split_key(batch.views[i]);
          splits = std::max(splits, (keys + split_tokens - 1) / split_tokens);
        }
        const std::size_t rows = static_cast<std::size_t>(count) * q_heads;
        float* scratch = workspace().floats(rows * HeadDim + rows * splits * (HeadDim + 2));
        float* q_scaled = scratch;
        float* partial_acc = q_scaled + rows * HeadDim;
        auto* partial_state = reinterpret_cast<float2*>(partial_acc + rows * splits * HeadDim);
        const std::size_t offset = first * q_heads * HeadDim;
        launch_prepare_queries(q + offset, scale, rows * HeadDim, q_scaled, stream);
        const DecodeArgs args{q_scaled, partial_acc, partial_state, q_heads, group, head_chunks, splits, params.soft_cap};
        launch(decode_kernel<Storage, HeadDim, Heads>,
               dim3(static_cast<unsigned>(splits), static_cast<unsigned>(kv_heads * head_chunks),
                    static_cast<unsigned>(count)),
               dim3(block_threads), 0, stream, "decode kernel launch", batch, args);
        launch(merge_splits<HeadDim, O>, dim3(static_cast<unsigned>(rows)), dim3(block_threads), 0, stream,
               "decode merge kernel launch", static_cast<const float*>(partial_acc),
               static_cast<const float2*>(partial_state), splits, out + offset);
      }
    });
  });
}

}  // namespace attention::cuda

KVCACHE_END_NAMESPACE
