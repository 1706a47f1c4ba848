// Backend: where the bytes of a cache live. A backend is a tag type with a tiny device
// interface (allocate, deallocate, copy, fill, upload from the host); kernels for it live in
// attention/<name>. A backend whose memory the host cannot read (host_accessible false) also
// writes appended rows itself (store_rows) and takes a stream where a call launches work.
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
  { B::upload(dst, src, bytes) };                 // src in host memory
  { B::host_accessible } -> std::convertible_to<bool>;
  typename B::stream_type;                        // where work is queued; {} is the default
};

KVCACHE_END_NAMESPACE
