// backend::cpu: host memory, 64-byte aligned (one cache line, one AVX-512 register), and the
// thread pool the CPU attention kernels run on.
#pragma once

#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <thread>

#include "../detail/thread_pool.hpp"
#include "concept.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace backend {

struct cpu {
  static constexpr const char* name = "cpu";
  static constexpr std::size_t alignment = 64;

  static void* allocate(std::size_t bytes) {
    void* memory = ::operator new(bytes == 0 ? alignment : bytes, std::align_val_t{alignment});
    std::memset(memory, 0, bytes);
    return memory;
  }
  static void deallocate(void* memory, std::size_t) noexcept {
    ::operator delete(memory, std::align_val_t{alignment});
  }
  static void copy(void* dst, const void* src, std::size_t bytes) { std::memmove(dst, src, bytes); }
  static void fill_zero(void* dst, std::size_t bytes) { std::memset(dst, 0, bytes); }

  // Threads the attention kernels use (the calling thread included); by default every hardware
  // thread. set_threads must not run concurrently with a kernel.
  static int threads() { return pool().size(); }
  static void set_threads(int threads) {
    pool_slot() = std::make_unique<detail::ThreadPool>(threads < 1 ? 1 : threads);
  }
  static detail::ThreadPool& pool() {
    auto& slot = pool_slot();
    if (!slot) {
      const unsigned hardware = std::thread::hardware_concurrency();
      slot = std::make_unique<detail::ThreadPool>(hardware == 0 ? 1 : static_cast<int>(hardware));
    }
    return *slot;
  }

 private:
  static std::unique_ptr<detail::ThreadPool>& pool_slot() {
    static std::unique_ptr<detail::ThreadPool> slot;
    return slot;
  }
};

static_assert(Backend<cpu>);

}  // namespace backend

KVCACHE_END_NAMESPACE
