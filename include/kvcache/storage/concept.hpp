// StoragePolicy: how the tokens of a sequence map to memory.
//
// A policy is a small value type: compile-time knobs as template parameters (the block size of
// Paged), runtime sizes as members (how many blocks, slots, window positions). The memory itself
// belongs to the cache and is laid out the same way for every policy:
//
//   [layer][K, V][page][kv_head][page_tokens][head_dim]
//
// where a page is a sequence slot (Contiguous, SlidingWindow) or a block (Paged). The policy's
// `bookkeeping` type is plain host data that decides which page row holds which position of
// which sequence; it never touches the bytes, and asks the cache to copy pages when it must
// (fork, copy-on-write). Sequence slots are numbered [0, max_sequences) and opened by the cache.
#pragma once

#include <concepts>
#include <cstddef>
#include <span>

#include "../config.hpp"
#include "../view.hpp"

KVCACHE_BEGIN_NAMESPACE

// Where one position of a sequence is stored.
struct PageRow {
  int page = 0;
  int row = 0;
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

KVCACHE_END_NAMESPACE
