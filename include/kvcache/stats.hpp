// Memory accounting of a cache.
#pragma once

#include <cstddef>

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

KVCACHE_END_NAMESPACE
