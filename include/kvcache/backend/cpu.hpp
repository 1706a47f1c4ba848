// backend::cpu: host memory, 64-byte aligned (one cache line, one AVX-512 register).
#pragma once

#include <cstddef>
#include <cstring>
#include <new>

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
};

static_assert(Backend<cpu>);

}  // namespace backend

KVCACHE_END_NAMESPACE
