// BlockPool: which blocks are free and how many owners each used block has.
//
// Knows blocks, not tokens. allocate, retain and release are O(1); the free list is a stack,
// so the block freed last is reused first (it is the one most likely still in cache).
#pragma once

#include <cstdint>
#include <vector>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

class BlockPool {
 public:
  explicit BlockPool(int block_count)
      : free_(static_cast<std::size_t>(block_count)),
        owners_(static_cast<std::size_t>(block_count), 0) {
    // Lowest ids on top, so a fresh pool hands out blocks in address order.
    for (int i = 0; i < block_count; ++i) free_[static_cast<std::size_t>(i)] = block_count - 1 - i;
  }

  int block_count() const { return static_cast<int>(owners_.size()); }
  int free_count() const { return static_cast<int>(free_.size()); }
  int used_count() const { return block_count() - free_count(); }
  int owners(std::int32_t block) const { return owners_[static_cast<std::size_t>(block)]; }
  bool is_shared(std::int32_t block) const { return owners(block) > 1; }

  // @pre free_count() > 0. Returns a block with one owner.
  std::int32_t allocate() {
    KVCACHE_ASSERT(!free_.empty(), "BlockPool::allocate on an empty pool");
    const std::int32_t block = free_.back();
    free_.pop_back();
    owners_[static_cast<std::size_t>(block)] = 1;
    return block;
  }

  // @pre owners(block) > 0. Adds an owner (copy-on-write sharing).
  void retain(std::int32_t block) {
    KVCACHE_ASSERT(owners(block) > 0, "BlockPool::retain of a free block");
    ++owners_[static_cast<std::size_t>(block)];
  }

  // @pre owners(block) > 0. Drops an owner; the last one returns the block to the free list.
  void release(std::int32_t block) {
    KVCACHE_ASSERT(owners(block) > 0, "BlockPool::release of a free block");
    if (--owners_[static_cast<std::size_t>(block)] == 0) free_.push_back(block);
  }

 private:
  std::vector<std::int32_t> free_;    // [<= block_count] stack of free block ids; capacity fixed
  std::vector<std::int32_t> owners_;  // [block_count] sequences referencing each block
};

KVCACHE_END_NAMESPACE
