// Bookkeeping shared by the policies that give each sequence slot one page of its own
// (Contiguous, SlidingWindow): slot s is page s, in use while a sequence is open in it.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace detail {

class PagePerSlot {
 public:
  explicit PagePerSlot(int slots) : open_(static_cast<std::size_t>(slots)) {}

  void open(int slot) { open_[static_cast<std::size_t>(slot)] = true; }
  void release(int slot) { open_[static_cast<std::size_t>(slot)] = false; }

  int pages_in_use() const {
    int in_use = 0;
    for (bool open : open_) in_use += open;
    return in_use;
  }

  // No page is shared, so the rows holding tokens are what the slots hold.
  std::size_t rows_holding_tokens(std::span<const int> held) const {
    std::size_t total = 0;
    for (int rows : held) total += static_cast<std::size_t>(rows);
    return total;
  }

 private:
  std::vector<bool> open_;  // [slots] a sequence is open in the slot
};

}  // namespace detail

KVCACHE_END_NAMESPACE
