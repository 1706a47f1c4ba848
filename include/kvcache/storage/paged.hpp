// Paged<BlockTokens>: one pool of blocks shared by all sequences and all layers.
//
// A block holds BlockTokens positions of every layer's K and V: block id b is page b in every
// layer's pool, so one block table per sequence serves all layers (as in vLLM). Sequences waste
// at most one partly filled block each. fork() shares blocks by reference count; a shared block
// is copied the first time a sequence reserves room to write into it (copy-on-write), so forking
// a long sequence copies no K/V at all.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "../error.hpp"
#include "../shape.hpp"
#include "block_pool.hpp"
#include "block_table.hpp"
#include "concept.hpp"

KVCACHE_BEGIN_NAMESPACE

template <int BlockTokens>
struct Paged {
  static_assert(BlockTokens > 0, "a block holds at least one token");
  static constexpr const char* name = "paged";
  static constexpr int block_tokens = BlockTokens;

  int num_blocks = 0;
  int max_sequences = 256;
  int max_tokens = 0;  // most positions per sequence; 0: the whole pool. Sizes the block tables
                       // (max_sequences * ceil(max_tokens / BlockTokens) ids, allocated up front)

  // As many blocks as fit in budget_bytes.
  template <ElementType DType>
  static Paged from_budget(const ModelShape& shape, std::size_t budget_bytes, int max_sequences = 256) {
    const std::size_t blocks = tokens_in_budget<DType>(shape, budget_bytes) / BlockTokens;
    return {.num_blocks = static_cast<int>(std::min<std::size_t>(blocks, INT_MAX / BlockTokens)),
            .max_sequences = max_sequences};
  }

  void validate() const {
    if (num_blocks <= 0)
      detail::fail(errc::invalid_configuration, "Paged::num_blocks = ", num_blocks,
                   " must be > 0");
    if (static_cast<long long>(num_blocks) * BlockTokens > INT_MAX)
      detail::fail(errc::invalid_configuration, "Paged::num_blocks = ", num_blocks, " of ",
                   BlockTokens, " tokens exceeds ", INT_MAX, " positions");
    if (max_sequences <= 0)
      detail::fail(errc::invalid_configuration, "Paged::max_sequences = ", max_sequences,
                   " must be > 0");
    if (max_tokens < 0)
      detail::fail(errc::invalid_configuration, "Paged::max_tokens = ", max_tokens,
                   " must be >= 0 (0 means the whole pool)");
  }

  int sequence_slots() const { return max_sequences; }
  int page_count() const { return num_blocks; }
  int page_tokens() const { return BlockTokens; }
  Retention retention() const { return {}; }
  int max_tokens_per_sequence() const {
    const int pool_tokens = num_blocks * BlockTokens;
    return max_tokens == 0 ? pool_tokens : std::min(max_tokens, pool_tokens);
  }

  static constexpr int blocks_for(int tokens) { return (tokens + BlockTokens - 1) / BlockTokens; }

  class bookkeeping {
   public:
    explicit bookkeeping(const Paged& policy)
        : max_tokens_(policy.max_tokens_per_sequence()),
          pool_(policy.num_blocks),
          tables_(policy.max_sequences, blocks_for(max_tokens_)) {}

    const BlockPool& pool() const { return pool_; }
    const BlockTables& tables() const { return tables_; }

    void open(int) {}

    bool can_reserve(int slot, int write_from, int tokens) const {
      if (tokens > max_tokens_) return false;
      const int missing = std::max(0, blocks_for(tokens) - tables_.count(slot));
      return missing + shared_blocks_written(slot, write_from, tokens) <= pool_.free_count();
    }

    // Gives slot blocks for positions [0, tokens), and private copies of the shared blocks that
    // positions [write_from, tokens) fall in.
    void reserve(int slot, int write_from, int tokens, PageCopier copy) {
      KVCACHE_ASSERT(can_reserve(slot, write_from, tokens), "Paged::reserve without room");
      const int last = std::min(tables_.count(slot), blocks_for(tokens));
      for (int i = write_from / BlockTokens; i < last; ++i) {
        const std::int32_t shared = tables_.at(slot, i);
        if (!pool_.is_shared(shared)) continue;
        const std::int32_t copy_block = pool_.allocate();
        copy(shared, copy_block, BlockTokens);
        pool_.release(shared);
        tables_.at(slot, i) = copy_block;
      }
      while (tables_.count(slot) < blocks_for(tokens)) tables_.push(slot, pool_.allocate());
    }

    void release(int slot) {
      while (tables_.count(slot) > 0) pool_.release(tables_.pop(slot));
    }

    bool can_fork(int) const { return true; }

    // The target shares the blocks holding positions [0, tokens); nothing is copied.
    void fork(int from, int to, int tokens, PageCopier) {
      KVCACHE_ASSERT(tables_.count(to) == 0, "Paged::fork into a slot with blocks");
      for (int i = 0; i < blocks_for(tokens); ++i) {
        const std::int32_t block = tables_.at(from, i);
        pool_.retain(block);
        tables_.push(to, block);
      }
    }

    void truncate(int slot, int tokens) {
      while (tables_.count(slot) > blocks_for(tokens)) pool_.release(tables_.pop(slot));
    }

    PageRow locate(int slot, int position) const {
      return {tables_.at(slot, position / BlockTokens), position % BlockTokens};
    }

    int pages_in_use() const { return pool_.used_count(); }

    // Rows of the pool that hold a token of some sequence; a shared block counts once, as
    // full as the fullest sequence that owns it. held[slot]: positions slot holds (0: closed).
    std::size_t rows_holding_tokens(std::span<const int> held) const {
      std::vector<int>& fill = fill_scratch_;
      std::fill(fill.begin(), fill.end(), 0);
      for (std::size_t slot = 0; slot < held.size(); ++slot) {
        const int blocks = std::min(tables_.count(static_cast<int>(slot)), blocks_for(held[slot]));
        for (int i = 0; i < blocks; ++i) {
          int& rows = fill[static_cast<std::size_t>(tables_.at(static_cast<int>(slot), i))];
          rows = std::max(rows, std::min(BlockTokens, held[slot] - i * BlockTokens));
        }
      }
      std::size_t total = 0;
      for (int rows : fill) total += static_cast<std::size_t>(rows);
      return total;
    }

    template <class Storage>
    void segments(int slot, int length, int, const Storage* k_pool, const Storage* v_pool,
                  SequenceView<Storage>& view) const {
      view.k_pool = k_pool;
      view.v_pool = v_pool;
      view.block_ids = tables_.blocks(slot).data();
      view.block_count = blocks_for(length);
      view.block_tokens = BlockTokens;
    }

   private:
    int shared_blocks_written(int slot, int write_from, int tokens) const {
      const int last = std::min(tables_.count(slot), blocks_for(tokens));
      int shared = 0;
      for (int i = write_from / BlockTokens; i < last; ++i)
        shared += pool_.is_shared(tables_.at(slot, i));
      return shared;
    }

    int max_tokens_;
    BlockPool pool_;
    BlockTables tables_;
    mutable std::vector<int> fill_scratch_ = std::vector<int>(static_cast<std::size_t>(pool_.block_count()));
  };
};

KVCACHE_END_NAMESPACE
