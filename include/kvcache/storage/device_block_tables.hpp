// DeviceBlockTables<B>: the copy of a paged cache's block tables that kernels on a device
// backend read (SequenceView::block_ids points into it).
//
// The host tables stay the truth. After a call changes a slot's table, sync() uploads the
// entries that differ from what the device already holds: a decode step that stays inside its
// last block uploads nothing, one that opens a block uploads one id.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "../backend/concept.hpp"
#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

template <Backend B>
class DeviceBlockTables {
 public:
  DeviceBlockTables() = default;  // no tables: a host backend, or a policy without blocks
  DeviceBlockTables(int slots, int width)
      : width_(static_cast<std::size_t>(width)),
        uploaded_(static_cast<std::size_t>(slots) * width_, 0),
        memory_(static_cast<std::int32_t*>(B::allocate(uploaded_.size() * sizeof(std::int32_t))),
                Release{uploaded_.size() * sizeof(std::int32_t)}) {}

  // Makes the device's copy of slot's table equal `table` (its first table.size() entries).
  void sync(int slot, std::span<const std::int32_t> table) {
    std::int32_t* uploaded = uploaded_.data() + static_cast<std::size_t>(slot) * width_;
    std::int32_t* device = row_of(slot);
    for (std::size_t i = 0; i < table.size();) {
      if (uploaded[i] == table[i]) {
        ++i;
        continue;
      }
      std::size_t end = i;
      while (end < table.size() && uploaded[end] != table[end]) ++end;
      B::upload(device + i, table.data() + i, (end - i) * sizeof(std::int32_t));
      std::copy(table.begin() + static_cast<std::ptrdiff_t>(i), table.begin() + static_cast<std::ptrdiff_t>(end),
                uploaded + i);
      i = end;
    }
  }

  // Slot's table in device memory.
  const std::int32_t* row(int slot) const { return row_of(slot); }

 private:
  std::int32_t* row_of(int slot) const { return memory_.get() + static_cast<std::size_t>(slot) * width_; }

  struct Release {
    std::size_t bytes;
    void operator()(std::int32_t* memory) const noexcept { B::deallocate(memory, bytes); }
  };
  std::size_t width_ = 0;
  std::vector<std::int32_t> uploaded_;  // [slots][width] what the device holds (zero-filled at first)
  std::unique_ptr<std::int32_t, Release> memory_;
};

KVCACHE_END_NAMESPACE
