// Paged<BlockTokens, Eviction>: one pool of blocks shared by all sequences and all layers.
//
// A block holds BlockTokens positions of every layer's K and V: block id b is page b in every
// layer's pool, so one block table per sequence serves all layers (as in vLLM). Sequences waste
// at most one partly filled block each. fork() shares blocks by reference count; a block others
// may read (shared, published as a prefix, or pinned) is copied the first time a sequence
// reserves room to write into it (copy-on-write), so forking a long sequence copies no K/V.
//
// Prefix caching: publish() registers a sequence's whole blocks in a PrefixIndex under their
// chained hashes; match_prefix() shares them into a new sequence. A published block whose last
// user leaves stays cached, a candidate of the Eviction policy (LRU by default), and is evicted
// only when an allocation finds the free list empty.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../prefix/block_hash.hpp"
#include "../prefix/eviction.hpp"
#include "../prefix/events.hpp"
#include "../prefix/prefix_index.hpp"
#include "../shape.hpp"
#include "../stats.hpp"
#include "block_pool.hpp"
#include "block_table.hpp"
#include "concept.hpp"

KVCACHE_BEGIN_NAMESPACE

template <int BlockTokens, EvictionPolicy Eviction = LruEviction>
struct Paged {
  static_assert(BlockTokens > 0, "a block holds at least one token");
  static constexpr const char* name = "paged";
  static constexpr int block_tokens = BlockTokens;

  int num_blocks = 0;
  int max_sequences = 256;
  int max_tokens = 0;  // most positions per sequence; 0: the whole pool. Sizes the block tables
                       // (max_sequences * ceil(max_tokens / BlockTokens) entries of 20 bytes,
                       // allocated up front): set it with many sequences over a large pool

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
    using pool_type = BasicBlockPool<Eviction>;

    explicit bookkeeping(const Paged& policy)
        : max_tokens_(policy.max_tokens_per_sequence()),
          pool_(policy.num_blocks),
          tables_(policy.max_sequences, blocks_for(max_tokens_)),
          index_(policy.num_blocks, BlockTokens),
          chains_(static_cast<std::size_t>(policy.max_sequences) *
                  static_cast<std::size_t>(tables_.max_blocks())),
          published_(static_cast<std::size_t>(policy.max_sequences), 0) {}

    const pool_type& pool() const { return pool_; }
    const BlockTables& tables() const { return tables_; }
    const PrefixIndex& index() const { return index_; }

    void open(int) {}

    bool can_reserve(int slot, int write_from, int tokens) const {
      if (tokens > max_tokens_) return false;
      const int missing = std::max(0, blocks_for(tokens) - tables_.count(slot));
      return missing + immutable_blocks_written(slot, write_from, tokens) <= pool_.available_count();
    }

    // Gives slot blocks for positions [0, tokens), and private copies of the blocks others may
    // read (shared, published or pinned) that positions [write_from, tokens) fall in. Takes free
    // blocks first and evicts cached ones only when none is left.
    void reserve(int slot, int write_from, int tokens, PageCopier copy) {
      KVCACHE_ASSERT(can_reserve(slot, write_from, tokens), "Paged::reserve without room");
      const int last = std::min(tables_.count(slot), blocks_for(tokens));
      for (int i = write_from / BlockTokens; i < last; ++i) {
        const std::int32_t shared = tables_.at(slot, i);
        if (!pool_.is_immutable(shared)) continue;
        const std::int32_t private_copy = allocate();
        copy(shared, private_copy, BlockTokens);
        ++counters_.copy_on_write_blocks;
        release_block(shared);
        tables_.at(slot, i) = private_copy;
        published_[static_cast<std::size_t>(slot)] = std::min(published(slot), i);
      }
      while (tables_.count(slot) < blocks_for(tokens)) tables_.push(slot, allocate());
    }

    // Last block first: under LRU the tail of a prefix is evicted before its head.
    void release(int slot) {
      while (tables_.count(slot) > 0) release_block(tables_.pop(slot));
      published_[static_cast<std::size_t>(slot)] = 0;
    }

    bool can_fork(int) const { return true; }

    // The target shares the blocks holding positions [0, tokens); nothing is copied.
    void fork(int from, int to, int tokens, PageCopier) {
      KVCACHE_ASSERT(tables_.count(to) == 0, "Paged::fork into a slot with blocks");
      for (int i = 0; i < blocks_for(tokens); ++i) {
        const std::int32_t block = tables_.at(from, i);
        pool_.retain(block);
        tables_.push(to, block);
        chain(to, i) = chain(from, i);
      }
      published_[static_cast<std::size_t>(to)] = published(from);
    }

    void truncate(int slot, int tokens) {
      while (tables_.count(slot) > blocks_for(tokens)) release_block(tables_.pop(slot));
      published_[static_cast<std::size_t>(slot)] = std::min(published(slot), tokens / BlockTokens);
    }

    PageRow locate(int slot, int position) const {
      return {tables_.at(slot, position / BlockTokens), position % BlockTokens};
    }

    int pages_in_use() const { return pool_.used_count(); }

    // Rows of the pool that hold a token of some sequence; a shared block counts once, as
    // full as the fullest sequence that owns it. held[slot]: positions slot holds (0: closed).
    std::size_t rows_holding_tokens(std::span<const int> held) const {
      std::size_t total = 0;
      for (int rows : fill(held)) total += static_cast<std::size_t>(rows);
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

    // ---- prefix caching ----

    // Shares into the empty `slot` the published blocks that hold the longest prefix of
    // tokens[0, limit) made of whole blocks; returns the positions shared.
    int match_prefix(int slot, std::span<const std::int32_t> tokens, int limit, BlockHash root,
                     std::uint64_t salt) {
      KVCACHE_ASSERT(tables_.count(slot) == 0, "Paged::match_prefix into a slot with blocks");
      ++counters_.prefix_queries;
      counters_.prefix_query_tokens += static_cast<std::uint64_t>(limit);
      int blocks = 0;
      for_each_published(tokens.first(static_cast<std::size_t>(limit)), root, salt,
                         [&](std::int32_t block, Link link) {
                           pool_.retain(block);
                           notify(PrefixEventKind::shared, block);
                           tables_.push(slot, block);
                           chain(slot, blocks++) = link;
                         });
      published_[static_cast<std::size_t>(slot)] = blocks;
      counters_.prefix_hit_tokens += static_cast<std::uint64_t>(blocks) * BlockTokens;
      return blocks * BlockTokens;
    }

    // The positions match_prefix(..., tokens, limit, ...) would share now; changes nothing.
    int cached_prefix(std::span<const std::int32_t> tokens, int limit, BlockHash root, std::uint64_t salt) const {
      int blocks = 0;
      for_each_published(tokens.first(static_cast<std::size_t>(limit)), root, salt, [&](std::int32_t, Link) { ++blocks; });
      return blocks * BlockTokens;
    }

    // Publishes the whole blocks of slot that hold positions [0, tokens.size()), whose ids are
    // `tokens`: a later match_prefix can share them. A block whose prefix is already published
    // by another block stays private (the first one serves matches).
    // @pre the slot holds tokens.size() positions.
    void publish(int slot, std::span<const std::int32_t> tokens, BlockHash root, std::uint64_t salt) {
      const int full = static_cast<int>(tokens.size()) / BlockTokens;
      for (int i = published(slot); i < full; ++i) {
        const Link parent = i == 0 ? Link{root, 0} : chain(slot, i - 1);
        const auto ids = tokens.subspan(static_cast<std::size_t>(i) * BlockTokens, BlockTokens);
        const BlockHash hash = hash_block(parent.hash, ids);
        const PrefixIndex::Parent identity{parent.id, i == 0 ? salt : 0};
        const std::int32_t block = tables_.at(slot, i);
        std::uint64_t id = 0;
        if (index_.registered(block)) {
          if (index_.hash(block) == hash && index_.holds(block, identity, ids)) id = index_.id(block);
        } else if (const std::int32_t twin = index_.find_hash(hash); twin >= 0) {
          if (index_.holds(twin, identity, ids)) id = index_.id(twin);
        } else if (i == 0 || parent.id != 0) {
          id = index_.insert(block, hash, identity, ids);
          pool_.keep(block);
          ++counters_.blocks_stored;
          notify(PrefixEventKind::stored, block);
        }
        chain(slot, i) = {hash, id};
      }
      published_[static_cast<std::size_t>(slot)] = std::max(published(slot), full);
    }

    // Pins the published blocks holding the longest whole-block prefix of tokens (a system
    // prompt): they are never evicted until unpinned. Returns the positions pinned.
    int pin(std::span<const std::int32_t> tokens, BlockHash root, std::uint64_t salt) {
      int blocks = 0;
      for_each_published(tokens, root, salt, [&](std::int32_t block, Link) {
        pool_.pin(block);
        notify(PrefixEventKind::shared, block);
        ++blocks;
      });
      return blocks * BlockTokens;
    }

    // Unpins what pin(tokens) pinned: the pinned blocks of the longest published prefix.
    // Returns the positions unpinned.
    int unpin(std::span<const std::int32_t> tokens, BlockHash root, std::uint64_t salt) {
      int blocks = 0;
      bool pinned = true;
      for_each_published(tokens, root, salt, [&](std::int32_t block, Link) {
        pinned = pinned && pool_.pins(block) > 0;
        if (!pinned) return;
        pool_.unpin(block);
        if (pool_.is_cached(block)) notify(PrefixEventKind::released, block);
        ++blocks;
      });
      return blocks * BlockTokens;
    }

    // Forgets every published block and drops every pin: cached blocks become free at once,
    // blocks in use when their last sequence leaves.
    void clear_prefixes() {
      for (std::int32_t block = 0; block < pool_.block_count(); ++block) {
        while (pool_.pins(block) > 0) pool_.unpin(block);
        if (!index_.registered(block)) continue;
        notify(PrefixEventKind::evicted, block);
        index_.erase(block);
        pool_.forget(block);
      }
      std::ranges::fill(published_, 0);
    }

    void set_observer(PrefixObserver observer) { observer_ = std::move(observer); }

    // held[slot]: positions slot holds (0: closed).
    PoolStats stats(std::span<const int> held) const {
      PoolStats stats = counters_;
      stats.block_tokens = BlockTokens;
      stats.blocks_total = pool_.block_count();
      stats.blocks_free = pool_.free_count();
      stats.blocks_cached = pool_.cached_count();
      stats.blocks_in_use = pool_.used_count();
      const std::vector<int>& rows = fill(held);
      for (std::int32_t block = 0; block < pool_.block_count(); ++block) {
        if (!pool_.is_in_use(block)) continue;
        stats.blocks_pinned += pool_.pins(block) > 0;
        const int filled = index_.registered(block) ? BlockTokens : rows[static_cast<std::size_t>(block)];
        stats.waste_tokens += static_cast<std::size_t>(BlockTokens - filled);
      }
      return stats;
    }

    // Checks that the pool, the tables and the index agree; throws std::logic_error naming the
    // first broken invariant. O(blocks + table entries); allocates.
    void audit() const {
      auto check = [](bool ok, const char* what, std::int32_t id) {
        if (!ok) throw std::logic_error(std::string("Paged bookkeeping audit: ") + what + " (" + std::to_string(id) + ")");
      };
      std::vector<int> references(static_cast<std::size_t>(pool_.block_count()), 0);
      for (int slot = 0; slot < static_cast<int>(published_.size()); ++slot) {
        check(published(slot) <= tables_.count(slot), "a slot published blocks it does not hold (slot)", slot);
        for (std::int32_t block : tables_.blocks(slot)) {
          check(block >= 0 && block < pool_.block_count(), "a table holds an invalid block id (block)", block);
          ++references[static_cast<std::size_t>(block)];
        }
      }
      std::vector<int> on_free_list(static_cast<std::size_t>(pool_.block_count()), 0);
      for (std::int32_t block : pool_.free_blocks()) ++on_free_list[static_cast<std::size_t>(block)];
      int in_use = 0;
      for (std::int32_t block = 0; block < pool_.block_count(); ++block) {
        const auto b = static_cast<std::size_t>(block);
        check(pool_.owners(block) == references[b], "owners differ from table references", block);
        check(pool_.is_kept(block) == index_.registered(block), "kept differs from registered", block);
        check(!index_.registered(block) || index_.find_hash(index_.hash(block)) == block,
              "a registered block is not found by its hash", block);
        const bool used = pool_.is_in_use(block);
        const bool cached = pool_.is_cached(block);
        const bool free = on_free_list[b] > 0;
        check(used + cached + free == 1, "a block is not exactly one of used, cached, free", block);
        check(on_free_list[b] <= 1, "a block is on the free list twice", block);
        check(!cached || pool_.is_kept(block), "a cached block is not published", block);
        check(!free || !pool_.is_kept(block), "a free block is still published", block);
        in_use += used;
      }
      check(in_use == pool_.used_count() && index_.size() <= pool_.block_count(),
            "free + cached + in use != total", -1);
    }

   private:
    // What a sequence knows of the chain through its block i.
    struct Link {
      BlockHash hash = 0;    // of the chain up to and with block i
      std::uint64_t id = 0;  // registration holding that chain; 0: not published
    };

    // Calls visit(block, link) for each published block of the longest whole-block prefix of
    // tokens, in order.
    template <class Visit>
    void for_each_published(std::span<const std::int32_t> tokens, BlockHash root, std::uint64_t salt,
                            Visit visit) const {
      Link link{root, 0};
      for (std::size_t first = 0; first + BlockTokens <= tokens.size(); first += BlockTokens) {
        const auto ids = tokens.subspan(first, BlockTokens);
        const BlockHash hash = hash_block(link.hash, ids);
        const PrefixIndex::Parent parent{link.id, first == 0 ? salt : std::uint64_t{0}};
        const std::int32_t block = index_.find(hash, parent, ids);
        if (block < 0) return;
        link = {hash, index_.id(block)};
        visit(block, link);
      }
    }

    std::int32_t allocate() {
      if (pool_.free_count() == 0) {
        const std::int32_t victim = pool_.eviction().victim();
        notify(PrefixEventKind::evicted, victim);
        index_.erase(victim);
        pool_.evict();
        ++counters_.evictions;
      }
      return pool_.allocate();
    }

    void release_block(std::int32_t block) {
      pool_.release(block);
      if (pool_.is_cached(block)) notify(PrefixEventKind::released, block);
    }

    void notify(PrefixEventKind kind, std::int32_t block) {
      ++events_;
      if (observer_) observer_({events_, kind, index_.hash(block), block});
    }

    int immutable_blocks_written(int slot, int write_from, int tokens) const {
      const int last = std::min(tables_.count(slot), blocks_for(tokens));
      int immutable = 0;
      for (int i = write_from / BlockTokens; i < last; ++i)
        immutable += pool_.is_immutable(tables_.at(slot, i));
      return immutable;
    }

    const std::vector<int>& fill(std::span<const int> held) const {
      std::vector<int>& rows = fill_scratch_;
      std::ranges::fill(rows, 0);
      for (std::size_t slot = 0; slot < held.size(); ++slot) {
        const int blocks = std::min(tables_.count(static_cast<int>(slot)), blocks_for(held[slot]));
        for (int i = 0; i < blocks; ++i) {
          int& filled = rows[static_cast<std::size_t>(tables_.at(static_cast<int>(slot), i))];
          filled = std::max(filled, std::min(BlockTokens, held[slot] - i * BlockTokens));
        }
      }
      return rows;
    }

    int published(int slot) const { return published_[static_cast<std::size_t>(slot)]; }
    Link& chain(int slot, int i) {
      return chains_[static_cast<std::size_t>(slot) * static_cast<std::size_t>(tables_.max_blocks()) +
                     static_cast<std::size_t>(i)];
    }

    int max_tokens_;
    pool_type pool_;
    BlockTables tables_;
    PrefixIndex index_;
    std::vector<Link> chains_;     // [max_sequences][max blocks] chain of each table entry
    std::vector<int> published_;   // [max_sequences] leading blocks whose chain is known
    PoolStats counters_;
    std::uint64_t events_ = 0;
    PrefixObserver observer_;
    mutable std::vector<int> fill_scratch_ = std::vector<int>(static_cast<std::size_t>(pool_.block_count()));
  };
};

KVCACHE_END_NAMESPACE
