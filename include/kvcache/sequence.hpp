// SeqId: the handle of one open sequence.
//
// A handle names a slot and the generation of that slot when it was opened, so a handle kept
// after release() is recognised as stale (Error{unknown_sequence}) even once the slot is reused.
#pragma once

#include <cstdint>
#include <ostream>

#include "config.hpp"

KVCACHE_BEGIN_NAMESPACE

struct SeqId {
  std::uint32_t slot = 0;
  std::uint32_t generation = 0;

  friend constexpr bool operator==(SeqId, SeqId) = default;
  friend std::ostream& operator<<(std::ostream& out, SeqId id) {
    return out << "seq#" << id.slot << '.' << id.generation;
  }
};

KVCACHE_END_NAMESPACE
