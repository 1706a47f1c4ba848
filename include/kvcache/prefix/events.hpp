// Prefix-cache events, for observers outside the cache (a router that sends requests to the
// replica holding their prefix, an offload tier, metrics). Events carry the block hash, which is
// the same in every process (block_hash.hpp), and a sequence number that grows by one per event
// of one cache, so an observer can tell whether it missed any.
#pragma once

#include <cstdint>
#include <functional>

#include "../config.hpp"
#include "block_hash.hpp"

KVCACHE_BEGIN_NAMESPACE

enum class PrefixEventKind {
  stored,    // a full block of a sequence was published and can now be matched
  shared,    // a prefix match or pin gave a published block another user
  released,  // a published block lost its last user; it stays cached until evicted
  evicted,   // a published block was forgotten (evicted for room, or the cache was cleared)
};

constexpr const char* to_string(PrefixEventKind kind) {
  switch (kind) {
    case PrefixEventKind::stored: return "stored";
    case PrefixEventKind::shared: return "shared";
    case PrefixEventKind::released: return "released";
    case PrefixEventKind::evicted: return "evicted";
  }
  return "?";
}

struct PrefixEvent {
  std::uint64_t sequence_number = 0;  // 1, 2, 3, ... per cache
  PrefixEventKind kind = PrefixEventKind::stored;
  BlockHash hash = 0;
  std::int32_t block = 0;
};

// Called synchronously from the cache call that caused the event; must not call back into the
// cache.
using PrefixObserver = std::function<void(const PrefixEvent&)>;

KVCACHE_END_NAMESPACE
