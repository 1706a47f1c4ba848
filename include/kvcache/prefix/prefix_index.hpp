// PrefixIndex: which blocks hold a published prefix, found by block hash and verified exactly.
//
// Why hashed blocks and not a radix tree: the unit of sharing is a whole block anyway (a partial
// block is never shared mutably), a chained block hash names a prefix in O(1) memory whatever
// its length, and the same names can be published to other processes (routers, offload tiers);
// a radix tree would only add pointer chasing to the lookup.
//
// A hash only finds a candidate. A block is a hit when its token ids equal the query's and its
// parent is exactly the block matched one step before: every registration gets a fresh 64-bit id
// that is never reused, and a block records its parent's id (or, for the first block of a chain,
// the salt). So even a 64-bit hash collision cannot serve K/V of a different prefix.
//
// Storage is allocated at construction: an open-addressing table (linear probing, backward-shift
// deletion) of 2-4 slots per block, and block_tokens token ids per block.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <span>
#include <vector>

#include "../config.hpp"
#include "block_hash.hpp"

KVCACHE_BEGIN_NAMESPACE

class PrefixIndex {
 public:
  // The identity of the block a chain continues from: a registration id, or 0 and the salt for
  // the first block.
  struct Parent {
    std::uint64_t id = 0;
    std::uint64_t salt = 0;
    friend bool operator==(const Parent&, const Parent&) = default;
  };

  PrefixIndex(int block_count, int block_tokens)
      : block_tokens_(block_tokens),
        mask_(std::bit_ceil(static_cast<std::size_t>(block_count) * 2) - 1),
        table_(mask_ + 1, empty),
        entries_(static_cast<std::size_t>(block_count)),
        tokens_(static_cast<std::size_t>(block_count) * static_cast<std::size_t>(block_tokens)) {}

  int size() const { return size_; }
  int block_tokens() const { return block_tokens_; }
  bool registered(std::int32_t block) const { return entry(block).id != 0; }
  std::uint64_t id(std::int32_t block) const { return entry(block).id; }
  BlockHash hash(std::int32_t block) const { return entry(block).hash; }

  // The block registered under `hash`, or -1.
  std::int32_t find_hash(BlockHash hash) const {
    for (std::size_t i = home(hash);; i = (i + 1) & mask_) {
      const std::int32_t block = table_[i];
      if (block == empty || entry(block).hash == hash) return block;
    }
  }

  // Whether `block` holds exactly `tokens` after `parent`.
  bool holds(std::int32_t block, Parent parent, std::span<const std::int32_t> tokens) const {
    const Entry& e = entry(block);
    return e.parent == parent && std::ranges::equal(tokens, stored_tokens(block));
  }

  // The block that holds `tokens` after `parent` and hashes to `hash`, or -1.
  std::int32_t find(BlockHash hash, Parent parent, std::span<const std::int32_t> tokens) const {
    const std::int32_t block = find_hash(hash);
    return block != empty && holds(block, parent, tokens) ? block : empty;
  }

  // Registers `block` as holding `tokens` after `parent`; returns its registration id.
  // @pre !registered(block), find_hash(hash) == -1, tokens.size() == block_tokens()
  std::uint64_t insert(std::int32_t block, BlockHash hash, Parent parent,
                       std::span<const std::int32_t> tokens) {
    KVCACHE_ASSERT(!registered(block) && find_hash(hash) == empty, "PrefixIndex::insert twice");
    KVCACHE_ASSERT(static_cast<int>(tokens.size()) == block_tokens_, "PrefixIndex::insert of a partial block");
    std::size_t i = home(hash);
    while (table_[i] != empty) i = (i + 1) & mask_;
    table_[i] = block;
    entry(block) = {.hash = hash, .id = ++last_id_, .parent = parent};
    std::ranges::copy(tokens, tokens_.begin() + offset(block));
    ++size_;
    return last_id_;
  }

  // @pre registered(block)
  void erase(std::int32_t block) {
    KVCACHE_ASSERT(registered(block), "PrefixIndex::erase of an unregistered block");
    std::size_t hole = home(entry(block).hash);
    while (table_[hole] != block) hole = (hole + 1) & mask_;
    // Backward shift: move later members of the probe run into the hole when the hole lies on
    // their way from their home slot, so every run stays unbroken.
    for (std::size_t next = (hole + 1) & mask_; table_[next] != empty; next = (next + 1) & mask_) {
      const std::size_t wanted = home(entry(table_[next]).hash);
      if (((next - wanted) & mask_) >= ((next - hole) & mask_)) {
        table_[hole] = table_[next];
        hole = next;
      }
    }
    table_[hole] = empty;
    entry(block) = {};
    --size_;
  }

 private:
  static constexpr std::int32_t empty = -1;

  struct Entry {
    BlockHash hash = 0;
    std::uint64_t id = 0;  // 0: not registered
    Parent parent;
  };

  std::size_t home(BlockHash hash) const { return static_cast<std::size_t>(hash) & mask_; }
  std::size_t offset(std::int32_t block) const {
    return static_cast<std::size_t>(block) * static_cast<std::size_t>(block_tokens_);
  }
  std::span<const std::int32_t> stored_tokens(std::int32_t block) const {
    return {tokens_.data() + offset(block), static_cast<std::size_t>(block_tokens_)};
  }
  Entry& entry(std::int32_t block) { return entries_[static_cast<std::size_t>(block)]; }
  const Entry& entry(std::int32_t block) const { return entries_[static_cast<std::size_t>(block)]; }

  int block_tokens_;
  std::size_t mask_;                  // table size - 1, a power of two >= 2 * block_count
  std::vector<std::int32_t> table_;   // [mask_ + 1] block ids by hash; -1 empty
  std::vector<Entry> entries_;        // [block_count]
  std::vector<std::int32_t> tokens_;  // [block_count][block_tokens] ids of registered blocks
  std::uint64_t last_id_ = 0;
  int size_ = 0;
};

KVCACHE_END_NAMESPACE
