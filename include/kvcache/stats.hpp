// Memory accounting of a cache, and of the block pool of a paged cache.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "config.hpp"

KVCACHE_BEGIN_NAMESPACE

struct MemoryStats {
  std::size_t bytes_capacity = 0;  // everything the cache allocated at construction
  std::size_t bytes_reserved = 0;  // bytes assigned to open sequences (slots, rings, blocks)
  std::size_t bytes_used = 0;      // bytes of those that hold a token, shared storage once

  // Fraction of the reserved bytes that hold tokens; 1 when nothing is reserved.
  double utilization() const {
    return bytes_reserved == 0 ? 1.0
                               : static_cast<double>(bytes_used) / static_cast<double>(bytes_reserved);
  }
};

// The blocks of a paged cache and what prefix caching did with them. Counters (queries, hits,
// evictions, copies) run from construction; the rest is a snapshot.
struct PoolStats {
  int block_tokens = 0;
  int blocks_total = 0;
  int blocks_in_use = 0;   // referenced by a sequence or pinned
  int blocks_cached = 0;   // unreferenced published prefixes, evicted when room is needed
  int blocks_free = 0;     // blocks_in_use + blocks_cached + blocks_free == blocks_total
  int blocks_pinned = 0;
  std::size_t waste_tokens = 0;  // unused rows of blocks in use (the partly filled last blocks)
  std::uint64_t prefix_queries = 0;       // match_prefix calls
  std::uint64_t prefix_query_tokens = 0;  // tokens those calls could have matched
  std::uint64_t prefix_hit_tokens = 0;    // tokens they did match, shared instead of computed
  std::uint64_t blocks_stored = 0;        // blocks published
  std::uint64_t evictions = 0;
  std::uint64_t copy_on_write_blocks = 0;  // private copies made before writing a shared block

  // Unused fraction of the rows in use; 0 when none are.
  double waste_fraction() const {
    const double rows = static_cast<double>(blocks_in_use) * block_tokens;
    return rows == 0 ? 0.0 : static_cast<double>(waste_tokens) / rows;
  }
  double hit_rate() const {
    return prefix_query_tokens == 0 ? 0.0
                                    : static_cast<double>(prefix_hit_tokens) /
                                          static_cast<double>(prefix_query_tokens);
  }
};

// PoolStats in the Prometheus text exposition format (version 0.0.4): gauges for the snapshot,
// counters (suffix _total) for the rest, every name prefixed with `prefix` + '_'.
inline std::string to_prometheus(const PoolStats& stats, std::string_view prefix = "kvcache") {
  std::string text;
  auto metric = [&](std::string_view name, std::string_view type, std::string_view help, auto value) {
    const std::string full = std::string(prefix) + "_" + std::string(name);
    text += "# HELP " + full + " " + std::string(help) + "\n";
    text += "# TYPE " + full + " " + std::string(type) + "\n";
    text += full + " " + std::to_string(value) + "\n";
  };
  metric("blocks_total", "gauge", "Blocks in the pool.", stats.blocks_total);
  metric("blocks_in_use", "gauge", "Blocks referenced by a sequence or pinned.", stats.blocks_in_use);
  metric("blocks_cached", "gauge", "Unreferenced blocks kept for prefix matches.", stats.blocks_cached);
  metric("blocks_free", "gauge", "Blocks on the free list.", stats.blocks_free);
  metric("blocks_pinned", "gauge", "Blocks pinned against eviction.", stats.blocks_pinned);
  metric("waste_tokens", "gauge", "Unused token rows of blocks in use.", stats.waste_tokens);
  metric("prefix_queries_total", "counter", "Prefix match calls.", stats.prefix_queries);
  metric("prefix_query_tokens_total", "counter", "Tokens offered to prefix matching.",
         stats.prefix_query_tokens);
  metric("prefix_hit_tokens_total", "counter", "Tokens served from cached prefixes.",
         stats.prefix_hit_tokens);
  metric("blocks_stored_total", "counter", "Blocks published for prefix matching.", stats.blocks_stored);
  metric("evictions_total", "counter", "Cached blocks evicted for room.", stats.evictions);
  metric("copy_on_write_blocks_total", "counter", "Shared blocks copied before a write.",
         stats.copy_on_write_blocks);
  return text;
}

KVCACHE_END_NAMESPACE
