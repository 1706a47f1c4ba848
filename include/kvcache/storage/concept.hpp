// StoragePolicy: how the tokens of a sequence map to memory.
//
// A policy is a small value type: compile-time knobs as template parameters (the block size of
// Paged), runtime sizes as members (how many blocks, slots, window positions). The memory itself
// belongs to the cache and is laid out the same way for every policy:
//
//   [layer][K, V][kv_head][page][page_tokens][head_dim]
//
// where a page is a sequence slot (Contiguous, SlidingWindow) or a block (Paged). The policy's
// `bookkeeping` type is plain host data that decides which page row holds which position of
// which sequence; it never touches the bytes, and asks the cache to copy pages when it must
// (fork, copy-on-write). Sequence slots are numbered [0, max_sequences) and opened by the cache.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>

#include "../config.hpp"
#include "../prefix/block_hash.hpp"
#include "../prefix/events.hpp"
#include "../stats.hpp"
#include "../view.hpp"

KVCACHE_BEGIN_NAMESPACE

// Where one position of a sequence is stored.
struct PageRow {
  int page = 0;
  int row = 0;
};

// The K and V pools of one layer, [kv_head][page][page_tokens][head_dim], as a backend that
// writes appended rows itself (one whose memory the host cannot touch) sees them.
template <class Storage>
struct RowTarget {
  Storage* k_pool = nullptr;
  Storage* v_pool = nullptr;
  int kv_heads = 0;
  int page_count = 0;
  int page_tokens = 0;
  int head_dim = 0;
  float* k_scale_pool = nullptr;  // quantized types: one scale per row, [kv_head][page][page_tokens]
  float* v_scale_pool = nullptr;
  const float* k_offset = nullptr;  // [kv_heads][head_dim] subtracted from each key row first; null: none
};

// Which positions a policy keeps. With ring_tokens > 0 only the sink_tokens first positions
// and the ring_tokens most recent ones are stored, and attention sees the sinks and the last
// `window` positions (window <= ring_tokens; the rest of the ring allows rollback).
struct Retention {
  int sink_tokens = 0;
  int ring_tokens = 0;  // 0: every position is kept
  int window = 0;       // 0: attention sees every position
};

// Called by bookkeeping to copy rows [0, rows) of every kv-head from page `from` to page `to`,
// in every layer, for K and V.
using PageCopyFn = void (*)(void* context, int from, int to, int rows);
struct PageCopier {
  void* context;
  PageCopyFn function;
  void operator()(int from, int to, int rows) const { function(context, from, to, rows); }
};

template <class P>
concept StoragePolicy = std::copyable<P> && requires(
    const P policy, typename P::bookkeeping book, const typename P::bookkeeping const_book,
    int slot, int tokens, PageCopier copy, SequenceView<float>& view, const float* pool,
    std::span<const int> held) {
  typename P::bookkeeping;
  { P::name } -> std::convertible_to<const char*>;
  { policy.validate() };                           // throws Error{invalid_configuration}
  { policy.sequence_slots() } -> std::same_as<int>;
  { policy.page_count() } -> std::same_as<int>;
  { policy.page_tokens() } -> std::same_as<int>;
  { policy.retention() } -> std::same_as<Retention>;
  { policy.max_tokens_per_sequence() } -> std::same_as<int>;

  requires std::constructible_from<typename P::bookkeeping, const P&>;
  { book.open(slot) };                           // a sequence starts in this slot, empty
  // Whether slot can hold `tokens` positions with [write_from, tokens) writable.
  { const_book.can_reserve(slot, tokens, tokens) } -> std::same_as<bool>;
  { book.reserve(slot, tokens, tokens, copy) };  // @pre can_reserve
  { book.release(slot) };
  { const_book.can_fork(slot) } -> std::same_as<bool>;
  { book.fork(slot, slot, tokens, copy) };       // @pre can_fork; source slot, target slot
  { book.truncate(slot, tokens) };
  { const_book.locate(slot, tokens) } -> std::same_as<PageRow>;
  { const_book.pages_in_use() } -> std::same_as<int>;
  // Rows holding a token, shared rows once; held[slot] = positions stored for slot (0: closed).
  { const_book.rows_holding_tokens(held) } -> std::same_as<std::size_t>;
  // Fills view's segments for slot holding positions [0, length), ring from first_held, given
  // the layer's K and V pools; the rest of the view is the cache's to fill.
  { const_book.segments(slot, tokens, tokens, pool, pool, view) };
};

// A policy whose bookkeeping can publish whole blocks and share them with later sequences that
// start with the same tokens (Paged). The cache passes the chain root (block_hash.hpp).
template <class P>
concept PrefixCachingPolicy = StoragePolicy<P> && requires(
    typename P::bookkeeping book, const typename P::bookkeeping const_book, int slot,
    std::span<const std::int32_t> tokens, BlockHash root, std::uint64_t salt,
    std::span<const int> held) {
  // Shares the published blocks of the longest whole-block prefix of tokens[0, limit) into an
  // empty slot; returns the positions shared.
  { book.match_prefix(slot, tokens, slot, root, salt) } -> std::same_as<int>;
  { const_book.cached_prefix(tokens, slot, root, salt) } -> std::same_as<int>;  // match, but only counts
  { book.publish(slot, tokens, root, salt) };  // tokens: the ids of the slot's first positions
  { book.pin(tokens, root, salt) } -> std::same_as<int>;
  { book.unpin(tokens, root, salt) } -> std::same_as<int>;
  { book.clear_prefixes() };
  { book.set_observer(PrefixObserver{}) };
  { const_book.stats(held) } -> std::same_as<PoolStats>;
  { const_book.audit() };  // throws std::logic_error when the bookkeeping is inconsistent
};

KVCACHE_END_NAMESPACE
