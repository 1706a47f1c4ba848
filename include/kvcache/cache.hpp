// KVCache<Layout, DType, Backend>: the keys and values of every layer for a set of sequences.
//
//   Layout   how positions map to memory: Contiguous, Paged<BlockTokens>, SlidingWindow
//   DType    how one element is stored: f32, f16, bf16; int8, fp8_e4m3, fp8_e5m2 (+ a scale per row),
//            int8_residual, fp8_e4m3_residual (the same, the newest tokens in full precision);
//            int4 (keys per channel, values per token, the newest tokens in full precision)
//   Backend  where the bytes live: backend::cpu, or backend::cuda (backend/cuda.hpp: device
//            memory, host bookkeeping; append and attention take device pointers and a stream)
//
// The step of an engine:
//
//   scheduler, once per step:  cache.reserve(seq, new_tokens)    // the one call that can run out
//   each layer l:              cache.append(l, seq, k, v)          // positions [length, +new)
//                              attention::decode / prefill(cache, l, ...)
//   when a request ends:       cache.release(seq)
//
// All memory is allocated in the constructor; reserve, append, view and stats never allocate
// (the attention kernels keep per-thread scratch that only grows). Every public call validates its arguments first and throws kvcache::Error
// without changing anything, so after a failed call the cache is exactly as it was.
//
// Each layer keeps its own length: append(l, ...) extends layer l only, so attention in layer l
// sees the new tokens of layer l before later layers have been computed. length(seq) is the
// number of positions every layer holds.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <ranges>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "backend/cpu.hpp"
#include "dtype/float.hpp"
#include "dtype/fp8.hpp"
#include "dtype/hadamard.hpp"
#include "dtype/int4.hpp"
#include "dtype/int8.hpp"
#include "error.hpp"
#include "prefix/block_hash.hpp"
#include "prefix/events.hpp"
#include "sequence.hpp"
#include "shape.hpp"
#include "stats.hpp"
#include "storage/concept.hpp"
#include "storage/device_block_tables.hpp"
#include "view.hpp"

KVCACHE_BEGIN_NAMESPACE

template <StoragePolicy Layout, CacheElement DType, Backend B = backend::cpu>
class KVCache {
 public:
  using layout_type = Layout;
  using dtype = DType;
  using backend_type = B;
  using storage_type = typename DType::storage_type;
  using view_type = SequenceView<storage_type>;
  using stream_type = typename B::stream_type;

  static_assert(B::host_accessible || !is_hadamard_rotated<DType>,
                "Hadamard-rotated types are CPU-only so far: the CUDA kernels do not rotate q");
  static_assert(B::host_accessible || !GroupQuantizedElement<DType>,
                "int4 is CPU-only so far: there are no CUDA kernels for it");
  static_assert(B::host_accessible || !ResidualQuantizedElement<DType>,
                "residual types are CPU-only so far: the CUDA kernels do not read full-precision rows");

  // Allocates all storage. Throws Error{invalid_configuration} for a bad shape or policy.
  //
  // key_offsets, [layers][kv_heads][head_dim] or empty: a per-channel offset subtracted from
  // every key before it is stored (and rounded). Attention does not change, since a query's
  // scores all move by the same q . offset, which softmax cancels; but rounding does: trained
  // models' keys carry large per-channel means (in the slowly rotating RoPE pairs), and a
  // quantized type rounds what is left of a key after its channel means far more finely. The
  // mean of each channel over some calibration text is a good offset (examples/kv_accuracy
  // shows how much it saves). Views hold the stored keys, key minus offset, and key_offset (a
  // layer's offset, in the backend's memory). Soft-capped logits (AttentionParams::soft_cap)
  // are not shift-invariant: attention adds q . offset back to each score before capping.
  // Throws Error{shape_mismatch} for a size other than layers * kv_heads * head_dim and
  // Error{invalid_configuration} for a non-finite offset.
  KVCache(const ModelShape& shape, const Layout& layout, std::span<const float> key_offsets = {})
      : shape_(validated(shape, layout, key_offsets)),
        layout_(layout),
        book_(layout),
        retention_(layout.retention()),
        pool_rows_(static_cast<std::size_t>(layout.page_count()) * shape.kv_heads * layout.page_tokens()),
        pool_elements_(pool_rows_ * shape.head_dim / elements_per_unit<storage_type>),
        scale_bytes_((param_floats(0) + param_floats(1)) * sizeof(float) * shape.layers),
        bytes_capacity_(bytes_for_tokens<DType>(
            shape, static_cast<std::size_t>(layout.page_count()) * layout.page_tokens())),
        memory_(allocate(bytes_capacity_), Release{bytes_capacity_}),
        slots_(static_cast<std::size_t>(layout.sequence_slots())),
        layer_state_(static_cast<std::size_t>(layout.sequence_slots()) * shape.layers),
        device_tables_(make_device_tables(book_, layout.sequence_slots())),
        key_offsets_(key_offsets.begin(), key_offsets.end()),
        device_key_offsets_(upload_key_offsets(key_offsets), Release{device_key_offsets_bytes(key_offsets)}) {
    static_assert(sizeof(storage_type) * 8 == DType::bits * elements_per_unit<storage_type>, "whole elements per unit");
    KVCACHE_ASSERT(scale_bytes_ + 2 * shape.layers * pool_elements_ * sizeof(storage_type) == bytes_capacity_,
                   "the memory math and the layout agree");
    free_slots_.reserve(slots_.size());
    for (int slot = layout.sequence_slots() - 1; slot >= 0; --slot) free_slots_.push_back(slot);
    if constexpr (staged) residual_.resize(slots_.size() * residual_bytes_per_sequence<DType>(shape) / sizeof(float));
  }

  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;
  KVCache(KVCache&&) noexcept = default;
  KVCache& operator=(KVCache&&) noexcept = default;

  const ModelShape& shape() const { return shape_; }
  const Layout& layout() const { return layout_; }
  // The policy's host bookkeeping, read-only (block tables, pool counts) for inspection.
  const typename Layout::bookkeeping& bookkeeping() const { return book_; }

  // Layer `layer`'s key offsets as given to the constructor, [kv_heads][head_dim]; empty when
  // the cache has none.
  std::span<const float> key_offset(int layer) const {
    check_layer(layer, "key_offset");
    if (key_offsets_.empty()) return {};
    return std::span<const float>(key_offsets_).subspan(static_cast<std::size_t>(layer) * layer_offset_floats(),
                                                        layer_offset_floats());
  }

  int max_sequences() const { return static_cast<int>(slots_.size()); }
  int open_sequences() const { return max_sequences() - static_cast<int>(free_slots_.size()); }

  // ---- sequences ----

  bool can_open() const { return !free_slots_.empty(); }

  // Starts an empty sequence. Throws Error{capacity_exceeded} when every slot is taken.
  SeqId open() {
    if (free_slots_.empty())
      detail::fail(errc::capacity_exceeded, "open(): all ", max_sequences(),
                   " sequence slots are in use; release a sequence or raise max_sequences");
    const int slot = free_slots_.back();
    free_slots_.pop_back();
    book_.open(slot);
    SlotState& state = slots_[static_cast<std::size_t>(slot)];
    state.open = true;
    state.reserved = 0;
    audit_after_change();
    return {static_cast<std::uint32_t>(slot), state.generation};
  }

  bool contains(SeqId seq) const {
    return seq.slot < slots_.size() && slots_[seq.slot].open &&
           slots_[seq.slot].generation == seq.generation;
  }

  // Ends a sequence and returns its memory. The handle becomes stale.
  void release(SeqId seq) {
    const int slot = slot_of(seq, "release");
    book_.release(slot);
    SlotState& state = slots_[static_cast<std::size_t>(slot)];
    state.open = false;
    state.reserved = 0;
    ++state.generation;
    for (int layer = 0; layer < shape_.layers; ++layer) layer_state(slot, layer) = {};
    free_slots_.push_back(slot);
    audit_after_change();
  }

  // Positions every layer of seq holds.
  int length(SeqId seq) const {
    const int slot = slot_of(seq, "length");
    return min_length(slot);
  }

  // Positions layer `layer` of seq holds.
  int length(SeqId seq, int layer) const {
    const int slot = slot_of(seq, "length");
    check_layer(layer, "length");
    return layer_state(slot, layer).length;
  }

  // Positions seq may hold without another reserve().
  int reserved(SeqId seq) const { return slots_[static_cast<std::size_t>(slot_of(seq, "reserved"))].reserved; }

  // Whether reserve(seq, tokens) would succeed.
  bool can_reserve(SeqId seq, int tokens) const {
    const int slot = slot_of(seq, "can_reserve");
    if (tokens < 0) return false;
    const long long target = static_cast<long long>(max_length(slot)) + tokens;
    if (target > layout_.max_tokens_per_sequence()) return false;
    return target <= slots_[static_cast<std::size_t>(slot)].reserved ||
           book_.can_reserve(slot, min_length(slot), static_cast<int>(target));
  }

  // Makes room for `tokens` positions after the longest layer of seq; appends up to that many
  // need no further call. Throws Error{capacity_exceeded} (and changes nothing) when there is
  // no room; can_reserve asks first.
  void reserve(SeqId seq, int tokens) {
    const int slot = slot_of(seq, "reserve");
    if (tokens < 0)
      detail::fail(errc::out_of_range, "reserve(", seq, ", ", tokens, "): tokens must be >= 0");
    SlotState& state = slots_[static_cast<std::size_t>(slot)];
    const long long target = static_cast<long long>(max_length(slot)) + tokens;
    if (target <= state.reserved) return;
    if (target > layout_.max_tokens_per_sequence())
      detail::fail(errc::capacity_exceeded, "reserve(", seq, ", ", tokens, ") needs ", target,
                   " positions, but a sequence holds at most ",
                   layout_.max_tokens_per_sequence(), " in this ", Layout::name, " cache");
    if (!book_.can_reserve(slot, min_length(slot), static_cast<int>(target)))
      detail::fail(errc::capacity_exceeded, "reserve(", seq, ", ", tokens, ") needs room for ",
                   target, " positions, but only ", pages_available(), " of ",
                   layout_.page_count(), " ", Layout::name,
                   " pages are free or cached; release or preempt a sequence");
    book_.reserve(slot, min_length(slot), static_cast<int>(target), copier());
    sync_device_table(slot);
    state.reserved = static_cast<int>(target);
    audit_after_change();
  }

  // Writes the K and V of n new tokens of layer `layer` at positions [length(seq, layer), +n).
  // k and v are contiguous ranges (std::vector, std::span, ...) of [n][kv_heads][head_dim]
  // float, Eigen::half or Eigen::bfloat16; they are converted to DType (round to nearest even).
  // On a device backend they are spans of device memory and the rows are written by a kernel
  // queued on `stream` (the call returns before it ran).
  // @pre reserve() made room for them.
  template <std::ranges::contiguous_range KRange, std::ranges::contiguous_range VRange>
    requires std::same_as<std::ranges::range_value_t<KRange>, std::ranges::range_value_t<VRange>>
  void append(int layer, SeqId seq, const KRange& k_range, const VRange& v_range, [[maybe_unused]] stream_type stream = {}) {
    using In = std::ranges::range_value_t<KRange>;
    const std::span<const In> k(std::ranges::data(k_range), std::ranges::size(k_range));
    const std::span<const In> v(std::ranges::data(v_range), std::ranges::size(v_range));
    const int slot = slot_of(seq, "append");
    check_layer(layer, "append");
    const std::size_t row = static_cast<std::size_t>(shape_.kv_heads) * shape_.head_dim;
    if (k.size() != v.size() || k.size() % row != 0)
      detail::fail(errc::shape_mismatch, "append(layer ", layer, ", ", seq, "): k has ",
                   k.size(), " and v ", v.size(), " elements; both must be n * kv_heads * head_dim = n * ",
                   row);
    const int n = static_cast<int>(k.size() / row);
    LayerState& state = layer_state(slot, layer);
    const int reserved = slots_[static_cast<std::size_t>(slot)].reserved;
    if (static_cast<long long>(state.length) + n > reserved)
      detail::fail(errc::capacity_exceeded, "append(layer ", layer, ", ", seq, ") of ", n,
                   " tokens would hold ", static_cast<long long>(state.length) + n,
                   " positions, but only ", reserved, " are reserved; call reserve(seq, ", n,
                   ") first");

    if constexpr (staged) {
      for (int token = 0; token < n; ++token) stage_token(layer, slot, k.data() + token * row, v.data() + token * row);
    } else {
      write_rows(layer, n, [&](int token) { return book_.locate(slot, state.length + token); }, k.data(), v.data(),
                 stream);
      advance(state, n);
    }
  }

  // One new token for each sequence of a batch (a decode step) in layer `layer`: row i of k and
  // v, [seqs.size()][kv_heads][head_dim], goes to position length(seqs[i], layer). Every
  // sequence is checked before anything is written (unknown, listed twice, no reserved room);
  // on a device backend one kernel writes the whole batch.
  template <std::ranges::contiguous_range KRange, std::ranges::contiguous_range VRange>
    requires std::same_as<std::ranges::range_value_t<KRange>, std::ranges::range_value_t<VRange>>
  void append(int layer, std::span<const SeqId> seqs, const KRange& k_range, const VRange& v_range,
              [[maybe_unused]] stream_type stream = {}) {
    using In = std::ranges::range_value_t<KRange>;
    const std::span<const In> k(std::ranges::data(k_range), std::ranges::size(k_range));
    const std::span<const In> v(std::ranges::data(v_range), std::ranges::size(v_range));
    check_layer(layer, "append");
    const std::size_t row = static_cast<std::size_t>(shape_.kv_heads) * shape_.head_dim;
    if (k.size() != v.size() || k.size() != seqs.size() * row)
      detail::fail(errc::shape_mismatch, "append(layer ", layer, ", a batch of ", seqs.size(), "): k has ", k.size(),
                   " and v ", v.size(), " elements; both must be batch * kv_heads * head_dim = ", seqs.size() * row);
    if (seqs.size() > slots_.size())
      detail::fail(errc::out_of_range, "append(layer ", layer, ", a batch of ", seqs.size(),
                   "): more sequences than the cache has slots (", slots_.size(), ")");
    for (std::size_t i = 0; i < seqs.size(); ++i) batch_slots_[i] = slot_of(seqs[i], "append");
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      char& seen = batch_marks_[static_cast<std::size_t>(batch_slots_[i])];
      if (seen) {
        for (std::size_t j = 0; j < i; ++j) batch_marks_[static_cast<std::size_t>(batch_slots_[j])] = 0;
        detail::fail(errc::out_of_range, "append(layer ", layer, ", a batch): ", seqs[i],
                     " is listed twice; a batch appends one token to each of its sequences");
      }
      seen = 1;
    }
    for (std::size_t i = 0; i < seqs.size(); ++i) batch_marks_[static_cast<std::size_t>(batch_slots_[i])] = 0;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const int slot = batch_slots_[i];
      const int length = layer_state(slot, layer).length;
      if (length >= slots_[static_cast<std::size_t>(slot)].reserved)
        detail::fail(errc::capacity_exceeded, "append(layer ", layer, ", a batch): ", seqs[i], " holds ", length,
                     " positions and has no more reserved; call reserve(seq, 1) first");
    }
    const int n = static_cast<int>(seqs.size());
    if constexpr (staged) {
      for (int i = 0; i < n; ++i) stage_token(layer, batch_slots_[static_cast<std::size_t>(i)], k.data() + i * row, v.data() + i * row);
    } else {
      write_rows(layer, n,
                 [&](int i) {
                   const int slot = batch_slots_[static_cast<std::size_t>(i)];
                   return book_.locate(slot, layer_state(slot, layer).length);
                 },
                 k.data(), v.data(), stream);
      for (int i = 0; i < n; ++i) advance(layer_state(batch_slots_[static_cast<std::size_t>(i)], layer), 1);
    }
  }

  // The pages (blocks) that reserve() can still hand out, evicting cached prefixes if needed.
  int pages_available() const { return layout_.page_count() - book_.pages_in_use(); }

  // Shortens every layer of seq to `length` positions (speculative-decoding rollback) and drops
  // its reservation beyond them. Throws Error{out_of_range} if length > length(seq), and, for a
  // sliding window, Error{position_overwritten} if attention at the new length would need a
  // position the ring has already reused.
  void truncate(SeqId seq, int length) {
    const int slot = slot_of(seq, "truncate");
    const int current = min_length(slot);
    if (length < 0 || length > current)
      detail::fail(errc::out_of_range, "truncate(", seq, ", ", length, "): the new length must be in [0, ",
                   current, "], the positions every layer holds");
    if (retention_.ring_tokens > 0) {
      // Attention at the new length reads [needed, length) from the ring (nothing when the
      // sinks cover it).
      const int needed = std::max(retention_.sink_tokens, length - retention_.window);
      for (int layer = 0; layer < shape_.layers && needed < length; ++layer) {
        const LayerState& state = layer_state(slot, layer);
        if (state.first_held > needed)
          detail::fail(errc::position_overwritten, "truncate(", seq, ", ", length,
                       ") needs position ", needed, " for a window of ", retention_.window,
                       ", but layer ", layer, " at length ", state.length,
                       " only holds positions from ", state.first_held,
                       "; a sliding window rolls back at most slack_tokens = ",
                       retention_.ring_tokens - retention_.window, " positions");
      }
    }
    if constexpr (staged)
      for (int layer = 0; layer < shape_.layers; ++layer) unstage_group(layer, slot, length);
    book_.truncate(slot, length);
    for (int layer = 0; layer < shape_.layers; ++layer) {
      LayerState& state = layer_state(slot, layer);
      state.length = length;
      // Positions from `length` on will be written afresh.
      state.first_held = std::min(state.first_held, length);
    }
    slots_[static_cast<std::size_t>(slot)].reserved = length;
    audit_after_change();
  }

  // A new sequence with the same positions as seq (beam search, parallel sampling). Paged
  // storage shares blocks and copies a block only when one of the two first writes to it;
  // the other policies copy the rows. Afterwards neither sequence has a reservation beyond its
  // length: call reserve() before the next append. Throws Error{capacity_exceeded} without a
  // free slot and Error{out_of_range} if seq's layers have different lengths (mid-step).
  SeqId fork(SeqId seq) {
    const int from = slot_of(seq, "fork");
    const int length = min_length(from);
    if (length != max_length(from))
      detail::fail(errc::out_of_range, "fork(", seq, "): its layers hold between ", length,
                   " and ", max_length(from),
                   " positions; fork between steps, when every layer holds the same");
    if (free_slots_.empty() || !book_.can_fork(from))
      detail::fail(errc::capacity_exceeded, "fork(", seq, "): all ", max_sequences(),
                   " sequence slots are in use; release a sequence or raise max_sequences");
    const SeqId child = open();
    const int to = static_cast<int>(child.slot);
    book_.fork(from, to, length, copier());
    sync_device_table(to);
    for (int layer = 0; layer < shape_.layers; ++layer)
      layer_state(to, layer) = layer_state(from, layer);
    if constexpr (staged)  // the residual rows in use: those of the positions after the last whole group
      for (int layer = 0; layer < shape_.layers; ++layer)
        for (int kind = 0; kind < 2; ++kind)
          for (int head = 0; head < shape_.kv_heads; ++head) {
            const std::size_t first = static_cast<std::size_t>(head) * group_tokens * shape_.head_dim;
            std::copy_n(residual(from, layer, kind) + first, static_cast<std::size_t>(length % group_tokens) * shape_.head_dim,
                        residual(to, layer, kind) + first);
          }
    slots_[static_cast<std::size_t>(from)].reserved = length;
    slots_[static_cast<std::size_t>(to)].reserved = length;
    audit_after_change();
    return child;
  }

  // The segments of one layer of seq, for attention kernels. Valid until the next call that
  // changes seq (append, reserve, truncate, release).
  view_type view(int layer, SeqId seq) const {
    const int slot = slot_of(seq, "view");
    check_layer(layer, "view");
    const LayerState& state = layer_state(slot, layer);
    view_type view;
    view.kv_heads = shape_.kv_heads;
    view.head_dim = shape_.head_dim;
    view.pool_pages = layout_.page_count();
    view.length = state.length;
    view.window = retention_.window;
    view.sink_tokens = retention_.sink_tokens;
    view.first_held = retention_.ring_tokens > 0 ? std::max(state.first_held, retention_.sink_tokens) : 0;
    // Group-quantized and residual types: the positions of the last, incomplete group are in
    // the residual rows.
    const int stored = staged ? state.length / group_tokens * group_tokens : state.length;
    book_.segments(slot, stored, view.first_held, pool(layer, 0), pool(layer, 1), view);
    if constexpr (device_paged) view.block_ids = device_tables_.row(slot);
    view.hadamard = is_hadamard_rotated<DType>;
    view.key_offset = stored_key_offset(layer);
    if constexpr (quantized) {
      view.k_scale_pool = scale_pool(layer, 0);
      view.v_scale_pool = scale_pool(layer, 1);
      for (int i = 0; i < view.direct_count; ++i) {
        Segment<storage_type>& segment = view.direct[i];
        segment.k_scale = view.k_scale_pool + (segment.k - pool(layer, 0)) / shape_.head_dim;
        segment.v_scale = view.v_scale_pool + (segment.v - pool(layer, 1)) / shape_.head_dim;
      }
    }
    if constexpr (grouped) {
      view.group_tokens = group_tokens;
      view.k_scale_pool = scale_pool(layer, 0);
      view.v_scale_pool = scale_pool(layer, 1);
      for (int i = 0; i < view.direct_count; ++i) {
        Segment<storage_type>& segment = view.direct[i];
        const std::size_t row = static_cast<std::size_t>(segment.k - pool(layer, 0)) / row_units();
        const int page = static_cast<int>(row / layout_.page_tokens());  // kv-head 0's rows come first
        const int page_row = static_cast<int>(row % layout_.page_tokens());
        segment.k_scale = key_params(layer, page, 0, page_row);
        segment.v_scale = value_params(layer, page, 0, page_row);
      }
    }
    if constexpr (staged)
      view.residual = {residual(slot, layer, 0), residual(slot, layer, 1),
                       static_cast<std::size_t>(group_tokens) * shape_.head_dim, stored, state.length - stored};
    return view;
  }

  // ---- prefix caching (Paged storage) ----
  //
  // A prompt prefix that many requests share is computed and stored once. After a sequence's
  // K/V of positions [0, n) are appended in every layer, publish_prefix(seq, ids[0, n)) makes
  // its whole blocks matchable; a new sequence then starts with match_prefix(seq, prompt),
  // which shares the longest published whole-block prefix (no copy) and says how many positions
  // the engine may skip. Published blocks outlive their sequences as a cache, evicted
  // least-recently-used when reserve() needs their room; a referenced or pinned block never is.
  // Blocks are named by block_hash.hpp's chained hash (the same in every process) and verified
  // against their token ids. `salt` isolates tenants or models: prefixes published under one
  // salt never match under another.

  // Shares into the freshly opened `seq` the published blocks holding the longest whole-block
  // prefix of tokens, leaving at least the last token to compute (its logits start generation).
  // Returns the positions now held: every layer's length, and reserved(seq). Throws
  // Error{out_of_range} if seq holds or reserved positions already.
  int match_prefix(SeqId seq, std::span<const std::int32_t> tokens, std::uint64_t salt = 0)
    requires PrefixCachingPolicy<Layout>
  {
    const int slot = slot_of(seq, "match_prefix");
    if (max_length(slot) != 0 || slots_[static_cast<std::size_t>(slot)].reserved != 0)
      detail::fail(errc::out_of_range, "match_prefix(", seq, "): the sequence already holds ",
                   max_length(slot), " and reserved ", slots_[static_cast<std::size_t>(slot)].reserved,
                   " positions; match a prefix into a freshly opened sequence");
    const int matched = book_.match_prefix(slot, tokens, match_limit(tokens), prefix_root_of(salt), salt);
    sync_device_table(slot);
    for (int layer = 0; layer < shape_.layers; ++layer) layer_state(slot, layer).length = matched;
    slots_[static_cast<std::size_t>(slot)].reserved = matched;
    audit_after_change();
    return matched;
  }

  // The positions match_prefix(seq, tokens, salt) would share now, for a scheduler deciding
  // whether a request fits. Changes nothing: no counters, no LRU order.
  int cached_prefix_length(std::span<const std::int32_t> tokens, std::uint64_t salt = 0) const
    requires PrefixCachingPolicy<Layout>
  {
    return book_.cached_prefix(tokens, match_limit(tokens), prefix_root_of(salt), salt);
  }

  // Publishes the whole blocks holding positions [0, tokens.size()) of seq, whose token ids are
  // `tokens`. Call it after a prefill step (and, for multi-turn chats, after generation) with
  // every id so far; blocks published before are skipped. Throws Error{out_of_range} if some
  // layer of seq holds fewer than tokens.size() positions.
  void publish_prefix(SeqId seq, std::span<const std::int32_t> tokens, std::uint64_t salt = 0)
    requires PrefixCachingPolicy<Layout>
  {
    const int slot = slot_of(seq, "publish_prefix");
    if (tokens.size() > static_cast<std::size_t>(min_length(slot)))
      detail::fail(errc::out_of_range, "publish_prefix(", seq, ") of ", tokens.size(),
                   " token ids: every layer of the sequence must hold them, but one holds only ",
                   min_length(slot), " positions");
    book_.publish(slot, tokens, prefix_root_of(salt), salt);
    audit_after_change();
  }

  // Pins the published blocks of the longest whole-block prefix of tokens (a system prompt) so
  // that they are never evicted; returns the positions pinned. Pins count: unpin as often.
  int pin_prefix(std::span<const std::int32_t> tokens, std::uint64_t salt = 0)
    requires PrefixCachingPolicy<Layout>
  {
    const int pinned = book_.pin(tokens, prefix_root_of(salt), salt);
    audit_after_change();
    return pinned;
  }

  // Undoes pin_prefix(tokens) for the pinned blocks of that prefix; returns the positions unpinned.
  int unpin_prefix(std::span<const std::int32_t> tokens, std::uint64_t salt = 0)
    requires PrefixCachingPolicy<Layout>
  {
    const int unpinned = book_.unpin(tokens, prefix_root_of(salt), salt);
    audit_after_change();
    return unpinned;
  }

  // Forgets every published prefix and pin. Cached blocks are freed now; blocks that sequences
  // use stay theirs. Open sequences may publish again.
  void clear_prefix_cache()
    requires PrefixCachingPolicy<Layout>
  {
    book_.clear_prefixes();
    audit_after_change();
  }

  // Receives prefix-cache events (stored, shared, released, evicted); an empty function stops.
  void set_prefix_observer(PrefixObserver observer)
    requires PrefixCachingPolicy<Layout>
  {
    book_.set_observer(std::move(observer));
  }

  // Blocks in use, cached and free, waste and prefix-cache counters. Allocation-free; O(blocks).
  PoolStats pool_stats() const
    requires PrefixCachingPolicy<Layout>
  {
    return book_.stats(held_positions_by_slot());
  }

  // Checks every bookkeeping invariant (slots, reservations, and for paged storage: reference
  // counts equal table entries, each block exactly one of free, cached or in use, cached blocks
  // published); throws std::logic_error naming the first broken one. Runs after every changing
  // call when KVCACHE_AUDIT is 1 (the default without NDEBUG). O(blocks + sequences); allocates.
  void audit() const {
    auto check = [](bool ok, const char* what, std::size_t slot) {
      if (!ok)
        throw std::logic_error(std::string("KVCache audit: ") + what + " (slot " + std::to_string(slot) + ")");
    };
    std::vector<int> closed(slots_.size(), 0);
    for (int slot : free_slots_) ++closed[static_cast<std::size_t>(slot)];
    for (std::size_t slot = 0; slot < slots_.size(); ++slot) {
      check(closed[slot] == !slots_[slot].open, "a slot is neither open nor free exactly once", slot);
      if (slots_[slot].open)
        check(max_length(static_cast<int>(slot)) <= slots_[slot].reserved, "a layer holds unreserved positions", slot);
    }
    if constexpr (requires { book_.audit(); }) book_.audit();
  }

  // Memory accounting, by the longest layer of each sequence. Does not allocate; O(sequences)
  // (plus O(blocks) for paged storage). Not to be called concurrently on one cache.
  MemoryStats stats() const {
    const std::size_t per_token = bytes_per_token<DType>(shape_);
    const std::span<const int> held = held_positions_by_slot();
    MemoryStats stats;
    stats.bytes_capacity = bytes_capacity_ + residual_.size() * sizeof(float);
    stats.bytes_reserved = static_cast<std::size_t>(book_.pages_in_use()) * layout_.page_tokens() * per_token;
    stats.bytes_used = book_.rows_holding_tokens(held) * per_token;
    return stats;
  }

 private:
  struct SlotState {
    bool open = false;
    std::uint32_t generation = 0;
    int reserved = 0;  // positions that appends may fill without another reserve()
  };
  struct LayerState {
    int length = 0;      // positions [0, length) appended to this layer
    int first_held = 0;  // sliding window: positions in [sinks, first_held) were overwritten
  };

  static const ModelShape& validated(const ModelShape& shape, const Layout& layout, std::span<const float> key_offsets) {
    shape.validate();
    layout.validate();
    const std::size_t offset_floats = static_cast<std::size_t>(shape.layers) * shape.kv_heads * shape.head_dim;
    if (!key_offsets.empty() && key_offsets.size() != offset_floats)
      detail::fail(errc::shape_mismatch, "key_offsets has ", key_offsets.size(),
                   " floats; it must be empty or layers * kv_heads * head_dim = ", offset_floats);
    for (std::size_t i = 0; i < key_offsets.size(); ++i)
      if (!std::isfinite(key_offsets[i]))
        detail::fail(errc::invalid_configuration, "key_offsets[", i, "] = ", key_offsets[i],
                     " (layer ", i / (offset_floats / shape.layers), "); every key offset must be finite");
    if (is_hadamard_rotated<DType> && (shape.head_dim & (shape.head_dim - 1)) != 0)
      detail::fail(errc::invalid_configuration, "head_dim = ", shape.head_dim, " must be a power of two for ",
                   DType::name, ": the Hadamard rotation needs one");
    if constexpr (GroupQuantizedElement<DType>)
      if (shape.head_dim % 8 != 0)
        detail::fail(errc::invalid_configuration, "head_dim = ", shape.head_dim, " must be a multiple of 8 for ",
                     DType::name, ": key groups are stored in blocks of 8 channels");
    if constexpr (staged) {
      // A group is quantized into consecutive rows of one page, and a window's ring drops whole groups.
      const Retention retention = layout.retention();
      if (layout.page_tokens() % group_tokens != 0 || retention.sink_tokens % group_tokens != 0 ||
          retention.ring_tokens % group_tokens != 0)
        detail::fail(errc::invalid_configuration, "a ", Layout::name, " page of ", layout.page_tokens(),
                     " tokens (sinks ", retention.sink_tokens, ", ring ", retention.ring_tokens, ") does not hold whole ",
                     DType::name, " groups of ", group_tokens,
                     " tokens; use multiples of it (Paged<32> or larger, max_tokens, sink_tokens and window + slack_tokens)");
    }
    const long double elements = static_cast<long double>(shape.layers) * 2 * layout.page_count() *
                                 shape.kv_heads * layout.page_tokens() * shape.head_dim;
    if (elements * sizeof(storage_type) > static_cast<long double>(SIZE_MAX) / 2)
      detail::fail(errc::invalid_configuration, "the ", Layout::name, " cache would need ",
                   elements * sizeof(storage_type), " bytes");
    return shape;
  }

  static std::byte* allocate(std::size_t bytes) {
    try {
      return static_cast<std::byte*>(B::allocate(bytes));
    } catch (const std::bad_alloc&) {
      detail::fail(errc::capacity_exceeded, "the ", Layout::name, " cache could not allocate ",
                   bytes, " bytes on backend ", B::name, "; use a smaller policy or byte budget");
    }
  }

  int slot_of(SeqId seq, const char* operation) const {
    if (!contains(seq))
      detail::fail(errc::unknown_sequence, operation, "(", seq, "): no such open sequence (",
                   seq.slot < slots_.size() ? "its slot was released" : "slot out of range",
                   "; this cache has ", open_sequences(), " open of ", max_sequences(), ")");
    return static_cast<int>(seq.slot);
  }

  void check_layer(int layer, const char* operation) const {
    if (layer < 0 || layer >= shape_.layers)
      detail::fail(errc::out_of_range, operation, "(layer ", layer, "): layers are [0, ",
                   shape_.layers, ")");
  }

  LayerState& layer_state(int slot, int layer) {
    return layer_state_[static_cast<std::size_t>(slot) * shape_.layers + layer];
  }
  const LayerState& layer_state(int slot, int layer) const {
    return layer_state_[static_cast<std::size_t>(slot) * shape_.layers + layer];
  }

  int min_length(int slot) const {
    int length = INT_MAX;
    for (int layer = 0; layer < shape_.layers; ++layer) length = std::min(length, layer_state(slot, layer).length);
    return length;
  }
  int max_length(int slot) const {
    int length = 0;
    for (int layer = 0; layer < shape_.layers; ++layer) length = std::max(length, layer_state(slot, layer).length);
    return length;
  }

  // held[slot]: positions stored for each slot (0: closed), in scratch memory.
  std::span<const int> held_positions_by_slot() const {
    for (std::size_t slot = 0; slot < slots_.size(); ++slot)
      held_scratch_[slot] = slots_[slot].open ? held_positions(static_cast<int>(slot)) : 0;
    return held_scratch_;
  }

  // Positions a prefix match may cover: all but the last token, within a sequence's maximum.
  int match_limit(std::span<const std::int32_t> tokens) const {
    return static_cast<int>(std::min<std::size_t>(tokens.empty() ? 0 : tokens.size() - 1,
                                                  static_cast<std::size_t>(layout_.max_tokens_per_sequence())));
  }

  BlockHash prefix_root_of(std::uint64_t salt) const {
    return prefix_root<DType>(shape_, layout_.page_tokens(), salt);
  }

  void audit_after_change() const {
    if constexpr (KVCACHE_AUDIT) audit();
  }

  // Positions stored for slot in its longest layer (sinks plus the held ring for a window).
  int held_positions(int slot) const {
    int longest = 0;
    for (int layer = 1; layer < shape_.layers; ++layer)
      if (layer_state(slot, layer).length > layer_state(slot, longest).length) longest = layer;
    const LayerState& state = layer_state(slot, longest);
    if (retention_.ring_tokens == 0) return state.length;
    const int sinks = std::min(state.length, retention_.sink_tokens);
    return sinks + state.length - std::max(state.first_held, sinks);
  }

  static constexpr bool quantized = QuantizedElement<DType>;
  static constexpr bool grouped = GroupQuantizedElement<DType>;
  // Types whose newest tokens wait in full-precision residual rows until group_tokens of them
  // are quantized together: int4 (a K group) and the residual types (their window).
  static constexpr bool staged = residual_tokens<DType> > 0;
  static constexpr int group_tokens = staged ? residual_tokens<DType> : 1;
  // Kernels on a device backend read a device copy of paged block tables.
  static constexpr bool device_paged =
      !B::host_accessible && requires(const typename Layout::bookkeeping& book) { book.tables(); };

  static DeviceBlockTables<B> make_device_tables(const typename Layout::bookkeeping& book, int slots) {
    if constexpr (device_paged) return DeviceBlockTables<B>(slots, book.tables().max_blocks());
    else return {};
  }
  void sync_device_table(int slot) {
    if constexpr (device_paged) device_tables_.sync(slot, book_.tables().blocks(slot));
  }

  // Writes n tokens' K and V rows ([n][kv_heads][head_dim]) of layer `layer`, token i to page
  // row row_of(i): here on a host backend, by the backend's kernel on a device backend.
  template <class In, class RowOf>
  void write_rows(int layer, int n, RowOf row_of, const In* k, const In* v, [[maybe_unused]] stream_type stream) {
    const std::size_t row = static_cast<std::size_t>(shape_.kv_heads) * shape_.head_dim;
    if constexpr (!B::host_accessible) {
      constexpr int chunk = 512;
      PageRow rows[chunk];
      RowTarget<storage_type> target{pool(layer, 0), pool(layer, 1), shape_.kv_heads, layout_.page_count(),
                                     layout_.page_tokens(), shape_.head_dim};
      if constexpr (quantized) {
        target.k_scale_pool = scale_pool(layer, 0);
        target.v_scale_pool = scale_pool(layer, 1);
      }
      target.k_offset = stored_key_offset(layer);
      for (int first = 0; first < n; first += chunk) {
        const int count = std::min(chunk, n - first);
        for (int i = 0; i < count; ++i) rows[i] = row_of(first + i);
        B::template store_rows<DType>(target, k + first * row, v + first * row,
                                      std::span<const PageRow>(rows, static_cast<std::size_t>(count)), stream);
      }
    } else {
      for (int token = 0; token < n; ++token) {
        const PageRow at = row_of(token);
        for (int head = 0; head < shape_.kv_heads; ++head) {
          const std::size_t source = token * row + static_cast<std::size_t>(head) * shape_.head_dim;
          const std::size_t target = row_offset(at.page, head, at.row);
          store_row(layer, 0, target, k + source, key_offset_row(layer, head));
          store_row(layer, 1, target, v + source, nullptr);
        }
      }
    }
  }

  // n positions were appended to a layer: a sliding window's ring has dropped the oldest.
  void advance(LayerState& state, int n) const {
    state.length += n;
    if (retention_.ring_tokens > 0)
      state.first_held = std::max(state.first_held, state.length - retention_.ring_tokens);
  }

  // Quantized types keep their scales before the elements on the host (floats aligned whatever
  // the shape) and after them on a device, whose kernels load rows 16 bytes at a time from
  // 16-byte aligned addresses (cudaMalloc aligns the start; every row is head_dim elements).
  static constexpr bool scales_first = B::host_accessible;

  // kind 0: K, 1: V. [kv_heads][page_count][page_tokens][head_dim]: a kv-head's rows of every
  // page together, so consecutive pages of a sequence are one run of memory per kv-head (the
  // hardware prefetchers follow it; runs of one page each, a page of all kv-heads apart, left a
  // paged cache's decode about a fifth slower than a contiguous one's at two threads). Nor did
  // page-major pools pay when decode read each block whole, every kv-head in turn, so that even
  // scattered blocks are long runs: on a Zen 5 EPYC (Llama-3-8B, T = 16k) consecutive 16-token
  // blocks took 1.06-1.49x the time, scattered ones 0.88-1.32x (64-token ones 0.78-0.95x), as
  // every kv-head's queries and accumulators (32 KiB) then share L1 with the tiles.
  storage_type* pool(int layer, int kind) const {
    return reinterpret_cast<storage_type*>(memory_.get() + (scales_first ? scale_bytes_ : 0)) +
           (static_cast<std::size_t>(layer) * 2 + kind) * pool_elements_;
  }
  // Quantized types: the scale of each row of pool(layer, kind), [kv_heads][page_count][page_tokens];
  // group-quantized types: the K or V parameters (key_params, value_params).
  float* scale_pool(int layer, int kind) const {
    return reinterpret_cast<float*>(memory_.get() + (scales_first ? 0 : bytes_capacity_ - scale_bytes_)) +
           static_cast<std::size_t>(layer) * (param_floats(0) + param_floats(1)) + (kind == 1 ? param_floats(0) : 0);
  }
  // Floats of scales one layer's K (kind 0) or V (1) keeps.
  std::size_t param_floats(int kind) const {
    if constexpr (grouped)  // K: [kv_head][page][page_tokens / group][2][head_dim]; V: [kv_head][page][page_tokens][2]
      return kind == 0 ? pool_rows_ / group_tokens * 2 * shape_.head_dim : pool_rows_ * 2;
    else
      return quantized ? pool_rows_ : 0;
  }
  // Group-quantized types: the parameters of the K group holding `row` of a page's kv-head
  // ([2][head_dim]: scales, minima), and of V row `row` ([2]: scale, minimum).
  float* key_params(int layer, int page, int head, int row) const {
    return scale_pool(layer, 0) +
           ((static_cast<std::size_t>(head) * layout_.page_count() + page) * (layout_.page_tokens() / group_tokens) +
            row / group_tokens) * 2 * shape_.head_dim;
  }
  float* value_params(int layer, int page, int head, int row) const {
    return scale_pool(layer, 1) + ((static_cast<std::size_t>(head) * layout_.page_count() + page) * layout_.page_tokens() + row) * 2;
  }
  int row_units() const { return shape_.head_dim / elements_per_unit<storage_type>; }

  // Converts one row of head_dim input values, minus `offset` (null: none), into the pool at
  // element offset `target`.
  template <class In>
  void store_row(int layer, int kind, std::size_t target, const In* row, const float* offset) {
    alignas(64) float values[ModelShape::max_head_dim];
    to_floats(row, offset, values);
    if constexpr (quantized) {
      if constexpr (is_hadamard_rotated<DType>) detail::hadamard_transform(values, shape_.head_dim);
      quantize_row(layer, kind, target, values);
    } else {
      storage_type* stored = pool(layer, kind) + target;
      for (int d = 0; d < shape_.head_dim; ++d) stored[d] = DType::from_float(values[d]);
    }
  }
  // out[d] = row[d] - offset[d] (offset null: 0) as floats, for the head_dim elements of a row.
  template <class In>
  void to_floats(const In* row, const float* offset, float* out) const {
    for (int d = 0; d < shape_.head_dim; ++d) out[d] = to_float(row[d]) - (offset ? offset[d] : 0.0f);
  }

  // ---- key offsets ----

  std::size_t layer_offset_floats() const { return static_cast<std::size_t>(shape_.kv_heads) * shape_.head_dim; }
  // The host's copy of kv-head `head`'s offset in `layer`; null when the cache has none.
  const float* key_offset_row(int layer, int head) const {
    if (key_offsets_.empty()) return nullptr;
    return key_offsets_.data() + static_cast<std::size_t>(layer) * layer_offset_floats() +
           static_cast<std::size_t>(head) * shape_.head_dim;
  }
  // Layer's offsets, [kv_heads][head_dim], in the backend's memory (what views and append
  // kernels read); null when the cache has none.
  const float* stored_key_offset(int layer) const {
    if (key_offsets_.empty()) return nullptr;
    if constexpr (B::host_accessible) return key_offset_row(layer, 0);
    else return reinterpret_cast<const float*>(device_key_offsets_.get()) + static_cast<std::size_t>(layer) * layer_offset_floats();
  }
  static std::size_t device_key_offsets_bytes(std::span<const float> key_offsets) {
    return B::host_accessible ? 0 : key_offsets.size_bytes();
  }
  // A device backend's copy of the offsets (null on a host backend, or without offsets).
  static std::byte* upload_key_offsets(std::span<const float> key_offsets) {
    if (device_key_offsets_bytes(key_offsets) == 0) return nullptr;
    std::byte* memory = allocate(key_offsets.size_bytes());
    try {
      B::upload(memory, key_offsets.data(), key_offsets.size_bytes());
    } catch (...) {
      B::deallocate(memory, key_offsets.size_bytes());
      throw;
    }
    return memory;
  }
  // Row-quantized types: quantizes head_dim floats (rotated already, for rotated types) into the
  // pool at element offset `target`, and its scale beside.
  void quantize_row(int layer, int kind, std::size_t target, const float* values) {
    const std::span<const float> floats(values, static_cast<std::size_t>(shape_.head_dim));
    const float scale = DType::row_scale(floats);
    DType::quantize_row(floats, scale, pool(layer, kind) + target);
    scale_pool(layer, kind)[target / static_cast<std::size_t>(shape_.head_dim)] = scale;
  }
  // Storage-unit offset of a row in a pool.
  std::size_t row_offset(int page, int head, int row) const {
    return ((static_cast<std::size_t>(head) * layout_.page_count() + page) * layout_.page_tokens() + row) * row_units();
  }

  // ---- group-quantized (int4) and residual types: the residual rows ----

  std::size_t residual_floats() const {
    return static_cast<std::size_t>(shape_.kv_heads) * group_tokens * shape_.head_dim;
  }
  // The full-precision rows of (slot, layer) of K (kind 0) or V, [kv_heads][group_tokens][head_dim]:
  // row r holds the position of the incomplete group with r = position % group_tokens.
  float* residual(int slot, int layer, int kind) {
    return residual_.data() + ((static_cast<std::size_t>(slot) * shape_.layers + layer) * 2 + kind) * residual_floats();
  }
  const float* residual(int slot, int layer, int kind) const {
    return residual_.data() + ((static_cast<std::size_t>(slot) * shape_.layers + layer) * 2 + kind) * residual_floats();
  }

  // Appends one token, k and v [kv_heads][head_dim], to (slot, layer): into its residual rows,
  // quantized into the pages with the rest of its group when it is the group's last.
  template <class In>
  void stage_token(int layer, int slot, const In* k, const In* v) {
    LayerState& state = layer_state(slot, layer);
    const int group_row = state.length % group_tokens;
    for (int kind = 0; kind < 2; ++kind) {
      const In* source = kind == 0 ? k : v;
      float* rows = residual(slot, layer, kind);
      for (int head = 0; head < shape_.kv_heads; ++head) {
        float* target = rows + (static_cast<std::size_t>(head) * group_tokens + group_row) * shape_.head_dim;
        to_floats(source + head * shape_.head_dim, kind == 0 ? key_offset_row(layer, head) : nullptr, target);
        if constexpr (is_hadamard_rotated<DType>) detail::hadamard_transform(target, shape_.head_dim);
      }
    }
    if (group_row == group_tokens - 1) {
      // The group's positions are consecutive rows of one page (the policy was checked for it).
      const PageRow at = book_.locate(slot, state.length - group_row);
      const std::size_t head_floats = static_cast<std::size_t>(group_tokens) * shape_.head_dim;
      for (int head = 0; head < shape_.kv_heads; ++head) {
        const float* k_rows = residual(slot, layer, 0) + head * head_floats;
        const float* v_rows = residual(slot, layer, 1) + head * head_floats;
        if constexpr (grouped) {
          DType::quantize_keys(k_rows, shape_.head_dim, key_params(layer, at.page, head, at.row),
                               pool(layer, 0) + row_offset(at.page, head, at.row));
          for (int r = 0; r < group_tokens; ++r)
            DType::quantize_values(v_rows + r * shape_.head_dim, shape_.head_dim, value_params(layer, at.page, head, at.row + r),
                                   pool(layer, 1) + row_offset(at.page, head, at.row + r));
        } else {
          for (int r = 0; r < group_tokens; ++r) {
            quantize_row(layer, 0, row_offset(at.page, head, at.row + r), k_rows + r * shape_.head_dim);
            quantize_row(layer, 1, row_offset(at.page, head, at.row + r), v_rows + r * shape_.head_dim);
          }
        }
      }
    }
    advance(state, 1);
  }

  // Before (slot, layer) is truncated to `length`: when its new last group is a quantized one,
  // its positions before `length` go back to the residual rows, dequantized (a sliding window's
  // positions that the ring has reused as zeros), to be quantized again when the group refills.
  void unstage_group(int layer, int slot, int length) {
    const LayerState& state = layer_state(slot, layer);
    const int first = length / group_tokens * group_tokens;
    if (state.length / group_tokens * group_tokens == first) return;  // that group is in the residual rows already
    for (int position = first; position < length; ++position) {
      const bool held = retention_.ring_tokens == 0 || position < retention_.sink_tokens || position >= state.first_held;
      const PageRow at = book_.locate(slot, position);
      const int group_row = position - first;
      for (int head = 0; head < shape_.kv_heads; ++head) {
        const std::size_t offset = row_offset(at.page, head, at.row);
        const storage_type* k_codes = pool(layer, 0) + offset;
        const storage_type* v_codes = pool(layer, 1) + offset;
        float* k_row = residual(slot, layer, 0) + (static_cast<std::size_t>(head) * group_tokens + group_row) * shape_.head_dim;
        float* v_row = residual(slot, layer, 1) + (static_cast<std::size_t>(head) * group_tokens + group_row) * shape_.head_dim;
        if constexpr (grouped) {
          const float* k_params = key_params(layer, at.page, head, at.row);
          const float* v_params = value_params(layer, at.page, head, at.row);
          const storage_type* k_group = k_codes - static_cast<std::size_t>(group_row) * row_units();
          for (int d = 0; d < shape_.head_dim; ++d) {
            k_row[d] = held ? k_params[shape_.head_dim + d] + int4_key_code_at(k_group, group_row, d) * k_params[d] : 0.0f;
            v_row[d] = held ? v_params[1] + int4_code_at(v_codes, d) * v_params[0] : 0.0f;
          }
        } else {
          const float k_scale = scale_pool(layer, 0)[offset / static_cast<std::size_t>(shape_.head_dim)];
          const float v_scale = scale_pool(layer, 1)[offset / static_cast<std::size_t>(shape_.head_dim)];
          for (int d = 0; d < shape_.head_dim; ++d) {
            k_row[d] = held ? DType::decode(k_codes[d]) * k_scale : 0.0f;
            v_row[d] = held ? DType::decode(v_codes[d]) * v_scale : 0.0f;
          }
        }
      }
    }
  }

  PageCopier copier() { return {this, &copy_rows}; }
  // Copies the first `rows` rows of page `from` to page `to`, one run per kv-head.
  static void copy_rows(void* context, int from, int to, int rows) {
    auto& cache = *static_cast<KVCache*>(context);
    const std::size_t head_dim = static_cast<std::size_t>(cache.shape_.head_dim);
    for (int layer = 0; layer < cache.shape_.layers; ++layer)
      for (int kind = 0; kind < 2; ++kind)
        for (int head = 0; head < cache.shape_.kv_heads; ++head) {
          const std::size_t target = cache.row_offset(to, head, 0), source = cache.row_offset(from, head, 0);
          B::copy(cache.pool(layer, kind) + target, cache.pool(layer, kind) + source,
                  static_cast<std::size_t>(rows) * cache.row_units() * sizeof(storage_type));
          if constexpr (quantized)
            B::copy(cache.scale_pool(layer, kind) + target / head_dim, cache.scale_pool(layer, kind) + source / head_dim,
                    static_cast<std::size_t>(rows) * sizeof(float));
          if constexpr (grouped) {
            if (kind == 0)
              B::copy(cache.key_params(layer, to, head, 0), cache.key_params(layer, from, head, 0),
                      static_cast<std::size_t>((rows + group_tokens - 1) / group_tokens) * 2 * head_dim * sizeof(float));
            else
              B::copy(cache.value_params(layer, to, head, 0), cache.value_params(layer, from, head, 0),
                      static_cast<std::size_t>(rows) * 2 * sizeof(float));
          }
        }
  }

  ModelShape shape_;
  Layout layout_;
  typename Layout::bookkeeping book_;
  Retention retention_;
  std::size_t pool_rows_;      // rows of one layer's K (or V) pool: kv_heads * page_count * page_tokens
  std::size_t pool_elements_;  // storage units of one layer's K (or V) pool
  std::size_t scale_bytes_;    // quantized types: [layers][K, V][kv_heads][page_count][page_tokens] floats;
                               // group-quantized: [layers] of K then V parameters
  std::size_t bytes_capacity_;
  struct Release {
    std::size_t bytes;
    void operator()(std::byte* memory) const noexcept { B::deallocate(memory, bytes); }
  };
  // [layers][K, V][kv_heads][page_count][page_tokens][head_dim] and, for quantized types, the
  // scales [layers][K, V][kv_heads][page_count][page_tokens] before it (host) or after it (device).
  std::unique_ptr<std::byte, Release> memory_;
  std::vector<SlotState> slots_;         // [max_sequences]
  std::vector<LayerState> layer_state_;  // [max_sequences][layers]
  std::vector<int> free_slots_;          // stack of closed slots, lowest on top
  mutable std::vector<int> held_scratch_ = std::vector<int>(slots_.size());  // [max_sequences] for stats()
  DeviceBlockTables<B> device_tables_;  // device backends with paged storage: what kernels read
  std::vector<int> batch_slots_ = std::vector<int>(slots_.size());    // [max_sequences] a batch append's slots
  std::vector<char> batch_marks_ = std::vector<char>(slots_.size());  // [max_sequences] duplicates check
  std::vector<float> residual_;  // staged types: [max_sequences][layers][K, V] residual rows
  std::vector<float> key_offsets_;  // [layers][kv_heads][head_dim], or empty: no offsets
  std::unique_ptr<std::byte, Release> device_key_offsets_;  // device backends: a copy kernels read
};

KVCACHE_END_NAMESPACE
