// CPU attention kernels over SequenceView, on Eigen.
//
// For one kv-head the query heads of its group are processed together: each key and value row
// is read once, converted to float once, and used by every query head of the group. Scores are
// taken a tile of rows at a time, then folded into an online softmax (fp32 state), so the cost
// of rescaling the accumulators is paid once per tile, not once per row. Nothing allocates:
// the per-call buffers live on the stack.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "../dtype/float.hpp"
#include "../shape.hpp"
#include "../view.hpp"
#include "online_softmax.hpp"
#include "params.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace attention::cpu {

namespace detail {

inline constexpr int heads_per_pass = 8;  // query heads sharing one read of K/V
inline constexpr int tile_rows = 16;      // key rows scored before one softmax update

// Attention of `heads` query heads of one group, at position `query`, over kv-head `kv_head`.
// q: [heads][head_dim] already multiplied by the scale; out: [heads][head_dim].
template <int HeadDim, class Storage>
void attend_group(const SequenceView<Storage>& view, int kv_head, int query, const float* q,
                  int heads, float soft_cap, float* out) {
  constexpr int Extent = HeadDim == 0 ? Eigen::Dynamic : HeadDim;
  constexpr int Capacity = HeadDim == 0 ? ModelShape::max_head_dim : HeadDim;
  using Row = Eigen::Matrix<float, Extent, 1>;
  using StoredRow = Eigen::Matrix<Storage, Extent, 1>;
  const int head_dim = HeadDim == 0 ? view.head_dim : HeadDim;

  alignas(64) float acc_data[heads_per_pass][Capacity];  // [heads][head_dim]
  alignas(64) float row_data[Capacity];                  // [head_dim] one K or V row as float
  float scores[heads_per_pass][tile_rows];               // [heads][rows] of the current tile
  OnlineSoftmax softmax[heads_per_pass];
  for (int h = 0; h < heads; ++h) Eigen::Map<Row>(acc_data[h], head_dim).setZero();
  Eigen::Map<Row> row(row_data, head_dim);

  // Visible keys: [0, sinks_end) and [recent_begin, query], both clipped to each segment.
  const int recent_begin = view.first_needed(query);
  const int sinks_end = view.window == 0 ? 0 : std::min({view.sink_tokens, recent_begin, query + 1});

  auto run_rows = [&](const Segment<Storage>& segment, int begin, int end) {
    const std::size_t head_offset = static_cast<std::size_t>(kv_head) * segment.head_stride;
    const Storage* k_rows = segment.k + head_offset;  // [count][head_dim]
    const Storage* v_rows = segment.v + head_offset;  // [count][head_dim]
    for (int tile = begin; tile < end; tile += tile_rows) {
      const int rows = std::min(tile_rows, end - tile);
      for (int r = 0; r < rows; ++r) {
        const std::size_t at = static_cast<std::size_t>(tile - segment.first_position + r) * head_dim;
        row = Eigen::Map<const StoredRow>(k_rows + at, head_dim).template cast<float>();
        for (int h = 0; h < heads; ++h) {
          float score = Eigen::Map<const Row>(q + static_cast<std::size_t>(h) * head_dim, head_dim).dot(row);
          if (soft_cap > 0.0f) score = soft_cap * std::tanh(score / soft_cap);
          scores[h][r] = score;
        }
      }
      for (int h = 0; h < heads; ++h) {
        const float tile_max = *std::max_element(scores[h], scores[h] + rows);
        const float factor = softmax[h].raise_max(tile_max);
        if (factor != 1.0f) Eigen::Map<Row>(acc_data[h], head_dim) *= factor;
        for (int r = 0; r < rows; ++r) {
          scores[h][r] = std::exp(scores[h][r] - softmax[h].max);
          softmax[h].sum += scores[h][r];
        }
      }
      for (int r = 0; r < rows; ++r) {
        const std::size_t at = static_cast<std::size_t>(tile - segment.first_position + r) * head_dim;
        row = Eigen::Map<const StoredRow>(v_rows + at, head_dim).template cast<float>();
        for (int h = 0; h < heads; ++h) Eigen::Map<Row>(acc_data[h], head_dim) += scores[h][r] * row;
      }
    }
  };

  for (int i = 0; i < view.segment_count(); ++i) {
    const Segment<Storage> segment = view.segment(i);
    const int first = segment.first_position;
    const int last = first + segment.count;  // exclusive
    run_rows(segment, first, std::min(last, sinks_end));
    run_rows(segment, std::max(first, recent_begin), std::min(last, query + 1));
  }

  for (int h = 0; h < heads; ++h) {
    // The query's own key is always visible, so sum >= 1.
    Eigen::Map<Row>(out + static_cast<std::size_t>(h) * head_dim, head_dim) =
        Eigen::Map<Row>(acc_data[h], head_dim) / softmax[h].sum;
  }
}

}  // namespace detail

// Attention for `queries` query tokens of one sequence, at positions [length - queries, length)
// of the view, causal against every earlier visible position.
//   q:   [queries][q_heads][head_dim] of float, Eigen::half or Eigen::bfloat16
//   out: [queries][q_heads][head_dim], any of those types
// @pre 1 <= queries <= view.length; q_heads a multiple of view.kv_heads; every position the
//      queries see is held (view.first_needed(length - queries) >= view.first_held).
// Query head h uses kv-head h / (q_heads / kv_heads).
template <class Storage, class Q, class O>
void prefill(const SequenceView<Storage>& view, int q_heads, int queries, const Q* q, O* out,
             const AttentionParams& params) {
  const int head_dim = view.head_dim;
  const int group = q_heads / view.kv_heads;
  const float scale = params.scale.value_or(1.0f / std::sqrt(static_cast<float>(head_dim)));
  dispatch_head_dim(head_dim, [&](auto head_dim_constant) {
    constexpr int HeadDim = decltype(head_dim_constant)::value;
    constexpr int Capacity = HeadDim == 0 ? ModelShape::max_head_dim : HeadDim;
    alignas(64) float q_scaled[detail::heads_per_pass * Capacity];   // [heads][head_dim]
    alignas(64) float result[detail::heads_per_pass * Capacity];     // [heads][head_dim]
    for (int i = 0; i < queries; ++i) {
      const int position = view.length - queries + i;
      for (int kv_head = 0; kv_head < view.kv_heads; ++kv_head) {
        for (int first = 0; first < group; first += detail::heads_per_pass) {
          const int heads = std::min(detail::heads_per_pass, group - first);
          const std::size_t base =
              (static_cast<std::size_t>(i) * q_heads + kv_head * group + first) * head_dim;
          for (int e = 0; e < heads * head_dim; ++e) q_scaled[e] = scale * to_float(q[base + e]);
          detail::attend_group<HeadDim>(view, kv_head, position, q_scaled, heads, params.soft_cap,
                                        result);
          for (int e = 0; e < heads * head_dim; ++e) out[base + e] = from_float<O>(result[e]);
        }
      }
    }
  });
}

// Attention of the newest position of the view: q and out are [q_heads][head_dim].
template <class Storage, class Q, class O>
void decode(const SequenceView<Storage>& view, int q_heads, const Q* q, O* out,
            const AttentionParams& params) {
  prefill(view, q_heads, 1, q, out, params);
}

}  // namespace attention::cpu

KVCACHE_END_NAMESPACE
