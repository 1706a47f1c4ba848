// Backend: where the bytes of a cache live. A backend is a tag type with a tiny device
// interface (allocate, deallocate, copy, fill); kernels for it live in attention/<name>.
#pragma once

#include <concepts>
#include <cstddef>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

template <class B>
concept Backend = requires(void* dst, const void* src, std::size_t bytes) {
  { B::name } -> std::convertible_to<const char*>;
  { B::allocate(bytes) } -> std::same_as<void*>;  // zero-filled; throws on failure
  { B::deallocate(dst, bytes) } noexcept;
  { B::copy(dst, src, bytes) };                   // both in this backend's memory
  { B::fill_zero(dst, bytes) };
};

KVCACHE_END_NAMESPACE
