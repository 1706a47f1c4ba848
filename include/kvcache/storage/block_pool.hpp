// BlockPool: the state of every block of a paged cache.
//
// Knows blocks, not tokens. A block is
//   free    on the free list, holding nothing;
//   in use  referenced by sequences (owners, copy-on-write sharing) or pinned;
//   cached  unreferenced, but kept because it holds a published prefix; it is a candidate of
//           the eviction policy and returns to use when a prefix match shares it again.
// Every operation is O(1) and allocation-free. The free list is a stack, so the block freed last
// is reused first (it is the one most likely still in the CPU cache).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "../config.hpp"
#include "../prefix/eviction.hpp"

KVCACHE_BEGIN_NAMESPACE

template <EvictionPolicy Eviction = LruEviction>
class BasicBlockPool {
 public:
  using eviction_type = Eviction;

  explicit BasicBlockPool(int block_count)
      : free_(static_cast<std::size_t>(block_count)),
        owners_(static_cast<std::size_t>(block_count), 0),
        pins_(static_cast<std::size_t>(block_count), 0),
        kept_(static_cast<std::size_t>(block_count), 0),
        eviction_(block_count) {
    // Lowest ids on top, so a fresh pool hands out blocks in address order.
    for (int i = 0; i < block_count; ++i) free_[static_cast<std::size_t>(i)] = block_count - 1 - i;
  }

  int block_count() const { return static_cast<int>(owners_.size()); }
  int free_count() const { return static_cast<int>(free_.size()); }
  int cached_count() const { return eviction_.size(); }
  // Blocks an allocation can get: free ones, then cached ones by eviction.
  int available_count() const { return free_count() + cached_count(); }
  int used_count() const { return block_count() - available_count(); }

  int owners(std::int32_t block) const { return owners_[at(block)]; }
  int pins(std::int32_t block) const { return pins_[at(block)]; }
  bool is_shared(std::int32_t block) const { return owners(block) > 1; }
  bool is_kept(std::int32_t block) const { return kept_[at(block)] != 0; }
  bool is_cached(std::int32_t block) const { return eviction_.contains(block); }
  bool is_in_use(std::int32_t block) const { return owners(block) + pins(block) > 0; }
  // A block whose content others may read: written only after a private copy (copy-on-write).
  bool is_immutable(std::int32_t block) const { return is_shared(block) || is_kept(block) || pins(block) > 0; }
  const Eviction& eviction() const { return eviction_; }
  std::span<const std::int32_t> free_blocks() const { return free_; }

  // @pre free_count() > 0. Returns a block with one owner.
  std::int32_t allocate() {
    KVCACHE_ASSERT(!free_.empty(), "BlockPool::allocate on an empty free list");
    const std::int32_t block = free_.back();
    free_.pop_back();
    owners_[at(block)] = 1;
    return block;
  }

  // @pre cached_count() > 0. Frees the eviction policy's victim and returns it, so that the
  // prefix index can forget it.
  std::int32_t evict() {
    const std::int32_t block = eviction_.victim();
    KVCACHE_ASSERT(block >= 0, "BlockPool::evict without a cached block");
    eviction_.remove(block);
    kept_[at(block)] = 0;
    free_.push_back(block);
    return block;
  }

  // @pre the block is in use or cached. Adds an owner (sharing).
  void retain(std::int32_t block) {
    KVCACHE_ASSERT(is_in_use(block) || is_cached(block), "BlockPool::retain of a free block");
    leave_cache(block);
    ++owners_[at(block)];
  }

  // @pre owners(block) > 0. Drops an owner; the last reference frees the block, or caches it
  // when it is kept.
  void release(std::int32_t block) {
    KVCACHE_ASSERT(owners(block) > 0, "BlockPool::release of a block without owners");
    --owners_[at(block)];
    leave_if_unused(block);
  }

  // @pre the block is in use or cached. A pinned block is never freed nor evicted.
  void pin(std::int32_t block) {
    KVCACHE_ASSERT(is_in_use(block) || is_cached(block), "BlockPool::pin of a free block");
    leave_cache(block);
    ++pins_[at(block)];
  }

  // @pre pins(block) > 0
  void unpin(std::int32_t block) {
    KVCACHE_ASSERT(pins(block) > 0, "BlockPool::unpin of an unpinned block");
    --pins_[at(block)];
    leave_if_unused(block);
  }

  // @pre the block is in use and not kept. It will be cached rather than freed.
  void keep(std::int32_t block) {
    KVCACHE_ASSERT(is_in_use(block) && !is_kept(block), "BlockPool::keep of a free or kept block");
    kept_[at(block)] = 1;
  }

  // @pre is_kept(block). It will be freed with its last reference (now, if it is cached).
  void forget(std::int32_t block) {
    KVCACHE_ASSERT(is_kept(block), "BlockPool::forget of a block not kept");
    kept_[at(block)] = 0;
    if (is_cached(block)) {
      eviction_.remove(block);
      free_.push_back(block);
    }
  }

 private:
  static std::size_t at(std::int32_t block) { return static_cast<std::size_t>(block); }

  // A cached block that gains a reference or a pin is no eviction candidate any more.
  void leave_cache(std::int32_t block) {
    if (is_cached(block)) eviction_.remove(block);
  }

  void leave_if_unused(std::int32_t block) {
    if (is_in_use(block)) return;
    if (is_kept(block)) eviction_.add(block);
    else free_.push_back(block);
  }

  std::vector<std::int32_t> free_;         // [<= block_count] stack of free block ids; capacity fixed
  std::vector<std::int32_t> owners_;       // [block_count] sequences referencing each block
  std::vector<std::int32_t> pins_;         // [block_count] pins of each block
  std::vector<std::uint8_t> kept_;         // [block_count] 1: holds a published prefix
  Eviction eviction_;                      // the cached blocks
};

using BlockPool = BasicBlockPool<>;

KVCACHE_END_NAMESPACE
