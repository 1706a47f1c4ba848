// Views: what attention kernels read. They own nothing and are trivially copyable.
//
// A sequence's keys and values are a short list of segments, each a run of consecutive
// positions stored in the head-major layout [kv_head][token][head_dim] (token stride head_dim,
// kv-head stride `head_stride`). Contiguous storage gives one segment, a sliding window up to
// three (sinks, older part of the ring, newer part), paged storage one per block. Softmax
// attention does not depend on key order, so kernels visit segments in memory order and use the
// positions only for the causal and window masks. Quantized element types add one float scale
// per row, [kv_head][token] beside the elements (kv-head stride head_stride / head_dim); float
// types have none (null scale pointers). Group-quantized types (int4) pack two elements per
// storage unit (rows are row_units() units apart), keep K parameters per group of
// group_tokens rows and V parameters per row (dtype/int4.hpp gives both layouts, a kv-head's
// after another's), and hold the newest positions in a full-precision residual segment, as
// residual types (dtype/residual.hpp) do too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "config.hpp"
#include "dtype/concept.hpp"

KVCACHE_BEGIN_NAMESPACE

template <class Storage>
struct Segment {
  const Storage* k = nullptr;     // [kv_heads][count][head_dim], kv-head stride head_stride
  const Storage* v = nullptr;     // same layout as k
  std::size_t head_stride = 0;    // elements from one kv-head's rows to the next
  int first_position = 0;         // position of row 0
  int count = 0;                  // rows, consecutive positions
  const float* k_scale = nullptr;  // [kv_heads][count] per-row scales of k; null: none
  const float* v_scale = nullptr;  // same layout, of v
  // (group-quantized types: k_scale points at the parameters of the group holding row 0,
  // v_scale at those of row 0.)
};

template <class Storage>
struct SequenceView {
  // Segments stored explicitly (contiguous and sliding-window storage), in memory order.
  static constexpr int max_direct_segments = 3;
  Segment<Storage> direct[max_direct_segments] = {};
  int direct_count = 0;

  // Paged storage: block i holds positions [i * block_tokens, (i + 1) * block_tokens). A pool
  // keeps each kv-head's rows of every page together, so that a sequence whose blocks follow
  // one another is one run of memory per kv-head.
  const Storage* k_pool = nullptr;        // [kv_heads][pool_pages][block_tokens][head_dim]
  const Storage* v_pool = nullptr;        // same layout as k_pool
  const float* k_scale_pool = nullptr;    // [kv_heads][pool_pages][block_tokens]; null: no scales
  const float* v_scale_pool = nullptr;    // same layout, of v
  const std::int32_t* block_ids = nullptr;  // [block_count] block of each run of positions
  int block_count = 0;
  int block_tokens = 0;

  int kv_heads = 0;
  int head_dim = 0;
  int pool_pages = 0;    // pages of the pool the rows are in (its kv-head stride, in pages)
  int length = 0;        // the sequence holds positions [0, length) (some may be evicted)
  // Masks: a query at position p sees keys at positions <= p; with window > 0 only those in
  // (p - window, p] and the sinks [0, sink_tokens).
  int window = 0;
  int sink_tokens = 0;
  int first_held = 0;    // positions in [sink_tokens, first_held) are no longer stored
  bool hadamard = false;  // rows are stored rotated by the Hadamard matrix (dtype/hadamard.hpp)
  // [kv_heads][head_dim] subtracted from every key before it was stored (the cache's key
  // offset of this layer, KVCache's constructor); null: none. Scores are shift-invariant under
  // softmax, so kernels may ignore it unless they soft-cap logits.
  const float* key_offset = nullptr;
  // Group-quantized types (int4): rows per K parameter group.
  int group_tokens = 0;
  // Group-quantized and residual types: positions [length - residual.count, length) in full
  // precision, [kv_heads][their group's tokens][head_dim] (not in the segments above).
  Segment<float> residual = {};

  // Storage units from one row to the next.
  KVCACHE_HOST_DEVICE int row_units() const { return head_dim / elements_per_unit<Storage>; }

  KVCACHE_HOST_DEVICE int segment_count() const { return direct_count + block_count; }

  // @pre 0 <= i < segment_count()
  KVCACHE_HOST_DEVICE Segment<Storage> segment(int i) const {
    if (i < direct_count) return direct[i];
    const int block = i - direct_count;
    const std::size_t page = static_cast<std::size_t>(block_ids[block]);
    const std::size_t page_rows = static_cast<std::size_t>(block_tokens) * row_units();
    const std::size_t head_stride = static_cast<std::size_t>(pool_pages) * page_rows;
    const std::size_t offset = page * page_rows;  // its kv-head 0
    const int first = block * block_tokens;
    const int stored = length - residual.count;
    const int count = stored - first < block_tokens ? stored - first : block_tokens;
    std::size_t k_params = page * block_tokens, v_params = page * block_tokens;  // a scale per row
    if (group_tokens > 0) {
      k_params = page * (block_tokens / group_tokens) * 2 * head_dim;
      v_params = page * block_tokens * 2;
    }
    return {k_pool + offset, v_pool + offset, head_stride, first, count,
            k_scale_pool == nullptr ? nullptr : k_scale_pool + k_params,
            v_scale_pool == nullptr ? nullptr : v_scale_pool + v_params};
  }

  // The first non-sink position that a query at `query` sees.
  KVCACHE_HOST_DEVICE int first_needed(int query) const {
    if (window == 0) return 0;
    const int start = query - window + 1;
    return start > sink_tokens ? start : sink_tokens;
  }
};

static_assert(std::is_trivially_copyable_v<Segment<float>>);
static_assert(std::is_trivially_copyable_v<SequenceView<float>>);

KVCACHE_END_NAMESPACE
