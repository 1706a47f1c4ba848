// Contiguous: `max_sequences` preallocated slots of `max_tokens` positions each.
//
// The classic static cache: one segment per sequence, the fastest to read; a sequence wastes
// whatever part of its slot it does not use.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>

#include "../detail/page_per_slot.hpp"
#include "../error.hpp"
#include "../shape.hpp"
#include "concept.hpp"

KVCACHE_BEGIN_NAMESPACE

struct Contiguous {
  static constexpr const char* name = "contiguous";

  int max_sequences = 0;
  int max_tokens = 0;

  // As many slots of max_tokens as fit in budget_bytes (zero if not one fits: validate() says so).
  template <ElementType DType>
  static Contiguous from_budget(const ModelShape& shape, std::size_t budget_bytes, int max_tokens) {
    const std::size_t tokens = tokens_in_budget<DType>(shape, budget_bytes);
    const std::size_t slots = max_tokens > 0 ? tokens / static_cast<std::size_t>(max_tokens) : 0;
    return {.max_sequences = static_cast<int>(std::min<std::size_t>(slots, INT_MAX)), .max_tokens = max_tokens};
  }

  void validate() const {
    if (max_sequences <= 0)
      detail::fail(errc::invalid_configuration, "Contiguous::max_sequences = ", max_sequences,
                   " must be > 0");
    if (max_tokens <= 0)
      detail::fail(errc::invalid_configuration, "Contiguous::max_tokens = ", max_tokens,
                   " must be > 0");
  }

  int sequence_slots() const { return max_sequences; }
  int page_count() const { return max_sequences; }
  int page_tokens() const { return max_tokens; }
  Retention retention() const { return {}; }
  int max_tokens_per_sequence() const { return max_tokens; }

  // Host bookkeeping: slot s is page s, position p is row p.
  class bookkeeping : public detail::PagePerSlot {
   public:
    explicit bookkeeping(const Contiguous& policy)
        : PagePerSlot(policy.max_sequences), max_tokens_(policy.max_tokens) {}

    bool can_reserve(int, int, int tokens) const { return tokens <= max_tokens_; }
    void reserve(int, int, int, PageCopier) {}
    bool can_fork(int) const { return true; }
    void fork(int from, int to, int tokens, PageCopier copy) { copy(from, to, tokens); }
    void truncate(int, int) {}
    PageRow locate(int slot, int position) const { return {slot, position}; }
    template <class Storage>
    void segments(int slot, int length, int, const Storage* k_pool, const Storage* v_pool,
                  SequenceView<Storage>& view) const {
      const std::size_t slot_rows = static_cast<std::size_t>(max_tokens_) * view.row_units();
      const std::size_t head_stride = static_cast<std::size_t>(view.pool_pages) * slot_rows;
      const std::size_t offset = static_cast<std::size_t>(slot) * slot_rows;
      view.direct[0] = {k_pool + offset, v_pool + offset, head_stride, 0, length};
      view.direct_count = length > 0 ? 1 : 0;
    }

   private:
    int max_tokens_;
  };
};

KVCACHE_END_NAMESPACE
