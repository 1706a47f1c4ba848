// SlidingWindow: a ring of recent positions per sequence, plus attention-sink tokens.
//
// Attention at position p sees the `window` positions (p - window, p] and the `sink_tokens`
// first positions, which are kept forever (StreamingLLM). Each sequence slot stores
//
//   rows [0, sink_tokens)                    positions [0, sink_tokens)
//   rows [sink_tokens, sink_tokens + ring)   position p at row sink_tokens + (p - sink_tokens) % ring
//
// with ring = window + slack_tokens. The slack is what makes rollback and chunked prefill exact:
// truncating by up to slack_tokens positions, or prefilling a chunk of up to slack_tokens + 1
// queries, only needs positions the ring still holds. Anything that would need an overwritten
// position fails with Error{position_overwritten} instead of silently attending the wrong keys.
// Memory per sequence is bounded whatever its length.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>

#include "../detail/page_per_slot.hpp"
#include "../error.hpp"
#include "../shape.hpp"
#include "concept.hpp"

KVCACHE_BEGIN_NAMESPACE

struct SlidingWindow {
  static constexpr const char* name = "window";

  int max_sequences = 0;
  int window = 0;
  int sink_tokens = 0;
  int slack_tokens = 0;

  // As many sequence rings of `window` (+ sinks and slack) as fit in budget_bytes.
  template <ElementType DType>
  static SlidingWindow from_budget(const ModelShape& shape, std::size_t budget_bytes, int window,
                                   int sink_tokens = 0, int slack_tokens = 0) {
    SlidingWindow policy{.window = window, .sink_tokens = sink_tokens, .slack_tokens = slack_tokens};
    const std::size_t rows = policy.page_tokens() > 0 ? static_cast<std::size_t>(policy.page_tokens()) : 1;
    policy.max_sequences = static_cast<int>(std::min<std::size_t>(tokens_in_budget<DType>(shape, budget_bytes) / rows, INT_MAX));
    return policy;
  }

  void validate() const {
    if (max_sequences <= 0)
      detail::fail(errc::invalid_configuration, "SlidingWindow::max_sequences = ", max_sequences,
                   " must be > 0");
    if (window <= 0)
      detail::fail(errc::invalid_configuration, "SlidingWindow::window = ", window,
                   " must be > 0");
    if (sink_tokens < 0 || slack_tokens < 0)
      detail::fail(errc::invalid_configuration, "SlidingWindow::sink_tokens = ", sink_tokens,
                   " and slack_tokens = ", slack_tokens, " must be >= 0");
    if (static_cast<long long>(sink_tokens) + window + slack_tokens > INT_MAX / 2)
      detail::fail(errc::invalid_configuration, "SlidingWindow rows per sequence ",
                   static_cast<long long>(sink_tokens) + window + slack_tokens,
                   " exceed ", INT_MAX / 2);
  }

  int ring_tokens() const { return window + slack_tokens; }
  int sequence_slots() const { return max_sequences; }
  int page_count() const { return max_sequences; }
  int page_tokens() const { return sink_tokens + ring_tokens(); }
  Retention retention() const { return {sink_tokens, ring_tokens(), window}; }
  int max_tokens_per_sequence() const { return INT_MAX; }

  class bookkeeping : public detail::PagePerSlot {
   public:
    explicit bookkeeping(const SlidingWindow& policy)
        : PagePerSlot(policy.max_sequences), sinks_(policy.sink_tokens), ring_(policy.ring_tokens()) {}

    bool can_reserve(int, int, int) const { return true; }
    void reserve(int, int, int, PageCopier) {}
    bool can_fork(int) const { return true; }
    void fork(int from, int to, int, PageCopier copy) { copy(from, to, sinks_ + ring_); }
    void truncate(int, int) {}

    PageRow locate(int slot, int position) const {
      if (position < sinks_) return {slot, position};
      return {slot, sinks_ + (position - sinks_) % ring_};
    }

    // Sinks first, then the ring's held positions [first_held, length) in at most two runs.
    template <class Storage>
    void segments(int slot, int length, int first_held, const Storage* k_pool,
                  const Storage* v_pool, SequenceView<Storage>& view) const {
      const std::size_t slot_rows = static_cast<std::size_t>(sinks_ + ring_) * view.row_units();
      const std::size_t head_stride = static_cast<std::size_t>(view.pool_pages) * slot_rows;
      const Storage* k = k_pool + static_cast<std::size_t>(slot) * slot_rows;
      const Storage* v = v_pool + static_cast<std::size_t>(slot) * slot_rows;
      const std::size_t token_stride = static_cast<std::size_t>(view.row_units());
      int count = 0;
      auto add = [&](int row, int first_position, int rows) {
        if (rows > 0)
          view.direct[count++] = {k + row * token_stride, v + row * token_stride, head_stride,
                                  first_position, rows};
      };
      add(0, 0, length < sinks_ ? length : sinks_);
      const int first = first_held > sinks_ ? first_held : sinks_;
      const int held = length - first;
      const int start_row = locate(slot, first).row;
      const int before_wrap = sinks_ + ring_ - start_row;
      add(start_row, first, held < before_wrap ? held : before_wrap);
      add(sinks_, first + before_wrap, held - before_wrap);
      view.direct_count = count;
    }

   private:
    int sinks_;
    int ring_;
  };
};

KVCACHE_END_NAMESPACE
