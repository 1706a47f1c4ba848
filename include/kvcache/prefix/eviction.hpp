// EvictionPolicy: which cached block to give up when the pool needs room.
//
// A cached block holds a published prefix that no sequence references any more; it keeps its
// K/V in case a later request matches it, and is the pool's reserve of memory. The policy sees
// only those blocks (a referenced or pinned block is never a candidate) and picks a victim when
// allocation finds the free list empty. Policies are value types constructed for a block count
// and must not allocate after construction.
#pragma once

#include <concepts>
#include <cstdint>
#include <vector>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

template <class E>
concept EvictionPolicy = std::constructible_from<E, int> &&
    requires(E policy, const E const_policy, std::int32_t block) {
  { E::name } -> std::convertible_to<const char*>;
  { policy.add(block) };     // block became a candidate (its last user left)
  { policy.remove(block) };  // block is no candidate any more (shared again, or cleared)
  { policy.victim() } -> std::same_as<std::int32_t>;  // the candidate to evict next; -1: none
  { const_policy.size() } -> std::same_as<int>;
  { const_policy.contains(block) } -> std::same_as<bool>;
};

// Least recently used: the block whose last user left longest ago goes first. Sequences release
// their blocks from the last to the first, so a prefix's tail is evicted before its head and a
// chain stays matchable as long as possible. O(1) everything: an intrusive list over block ids.
class LruEviction {
 public:
  static constexpr const char* name = "lru";

  explicit LruEviction(int block_count)
      : previous_(static_cast<std::size_t>(block_count), outside),
        next_(static_cast<std::size_t>(block_count), outside) {}

  void add(std::int32_t block) {
    KVCACHE_ASSERT(!contains(block), "LruEviction::add of a candidate");
    previous_[index(block)] = newest_;
    next_[index(block)] = none;
    if (newest_ == none) oldest_ = block;
    else next_[index(newest_)] = block;
    newest_ = block;
    ++size_;
  }

  void remove(std::int32_t block) {
    KVCACHE_ASSERT(contains(block), "LruEviction::remove of a non-candidate");
    const std::int32_t before = previous_[index(block)];
    const std::int32_t after = next_[index(block)];
    if (before < 0) oldest_ = after;
    else next_[index(before)] = after;
    if (after < 0) newest_ = before;
    else previous_[index(after)] = before;
    previous_[index(block)] = next_[index(block)] = outside;
    --size_;
  }

  std::int32_t victim() const { return oldest_; }
  int size() const { return size_; }
  bool contains(std::int32_t block) const { return previous_[index(block)] != outside; }

 private:
  static constexpr std::int32_t none = -1;     // end of the list
  static constexpr std::int32_t outside = -2;  // not in the list
  static std::size_t index(std::int32_t block) { return static_cast<std::size_t>(block); }

  std::vector<std::int32_t> previous_;  // [block_count] toward the oldest
  std::vector<std::int32_t> next_;      // [block_count] toward the newest
  std::int32_t oldest_ = none;
  std::int32_t newest_ = none;
  int size_ = 0;
};

static_assert(EvictionPolicy<LruEviction>);

KVCACHE_END_NAMESPACE
