// BlockTables: the blocks of every sequence slot, in position order.
//
// Slot s's block i holds positions [i * block_tokens, (i + 1) * block_tokens). All tables are
// one preallocated array, so growing a table never allocates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

class BlockTables {
 public:
  BlockTables(int slots, int max_blocks_per_slot)
      : width_(max_blocks_per_slot),
        ids_(static_cast<std::size_t>(slots) * static_cast<std::size_t>(max_blocks_per_slot)),
        counts_(static_cast<std::size_t>(slots), 0) {}

  int max_blocks() const { return width_; }
  int count(int slot) const { return counts_[static_cast<std::size_t>(slot)]; }

  std::span<const std::int32_t> blocks(int slot) const { return {row(slot), row(slot) + count(slot)}; }
  std::int32_t& at(int slot, int index) { return row(slot)[index]; }
  std::int32_t at(int slot, int index) const { return row(slot)[index]; }

  // @pre count(slot) < max_blocks()
  void push(int slot, std::int32_t block) {
    KVCACHE_ASSERT(count(slot) < width_, "BlockTables::push past the table width");
    row(slot)[counts_[static_cast<std::size_t>(slot)]++] = block;
  }

  // @pre count(slot) > 0
  std::int32_t pop(int slot) {
    KVCACHE_ASSERT(count(slot) > 0, "BlockTables::pop of an empty table");
    return row(slot)[--counts_[static_cast<std::size_t>(slot)]];
  }

 private:
  std::int32_t* row(int slot) { return ids_.data() + static_cast<std::size_t>(slot) * width_; }
  const std::int32_t* row(int slot) const {
    return ids_.data() + static_cast<std::size_t>(slot) * width_;
  }

  int width_;
  std::vector<std::int32_t> ids_;  // [slots][max_blocks_per_slot]
  std::vector<int> counts_;        // [slots] blocks in each table
};

KVCACHE_END_NAMESPACE
