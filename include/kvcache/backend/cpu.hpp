// backend::cpu: host memory, 64-byte aligned (one cache line, one AVX-512 register), and the
// thread pool the CPU attention kernels run on. Allocations of 2 MiB and more are aligned to
// 2 MiB and, on Linux, asked to be backed by transparent huge pages: a decode step streams the
// whole cache, and with 4 KiB pages every few dozen rows cost a TLB miss and a page walk.
#pragma once

#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <thread>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../detail/thread_pool.hpp"
#include "concept.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace backend {

struct cpu {
  static constexpr const char* name = "cpu";
  static constexpr std::size_t alignment = 64;
  static constexpr bool host_accessible = true;
  struct stream_type {};  // the CPU kernels run on the calling thread and the pool: no stream

  static constexpr std::size_t huge_page = std::size_t{2} << 20;

  static void* allocate(std::size_t bytes) {
    void* memory = ::operator new(bytes == 0 ? alignment : bytes, std::align_val_t{alignment_for(bytes)});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= huge_page) ::madvise(memory, bytes, MADV_HUGEPAGE);  // advice only: failure is fine
#endif
    std::memset(memory, 0, bytes);
    return memory;
  }
  static void deallocate(void* memory, std::size_t bytes) noexcept {
    ::operator delete(memory, std::align_val_t{alignment_for(bytes)});
  }
  static void copy(void* dst, const void* src, std::size_t bytes) { std::memmove(dst, src, bytes); }
  static void fill_zero(void* dst, std::size_t bytes) { std::memset(dst, 0, bytes); }
  static void upload(void* dst, const void* src, std::size_t bytes) { std::memmove(dst, src, bytes); }
  static constexpr std::size_t alignment_for(std::size_t bytes) { return bytes >= huge_page ? huge_page : alignment; }

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
