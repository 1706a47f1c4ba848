// ElementType: how one element of K or V is stored.
//
// All byte math goes through bit widths, so a packed sub-byte type (int4) is an ordinary type,
// and a quantized type states the bits of scale data it keeps per row (one token of one kv-head,
// head_dim elements). Plain floating types keep no scales and convert element by element;
// they also satisfy FloatElement, which is what the attention kernels of this version read.
#pragma once

#include <concepts>
#include <string_view>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

template <class T>
concept ElementType = requires {
  typename T::storage_type;                              // unit of the element array
  { T::name } -> std::convertible_to<std::string_view>;  // "f16", "int8", ...
  { T::bits } -> std::convertible_to<int>;               // bits of one element
  { T::scale_bits } -> std::convertible_to<int>;         // bits of scales per row; 0: none
} && (T::bits > 0) && (T::scale_bits >= 0) && (T::scale_bits % 8 == 0);

// An element type read and written one element at a time, with no scales.
template <class T>
concept FloatElement = ElementType<T> && (T::scale_bits == 0) &&
    requires(typename T::storage_type stored, float value) {
      { T::to_float(stored) } -> std::same_as<float>;
      { T::from_float(value) } -> std::same_as<typename T::storage_type>;
    };

// Bytes that one row of `elements` values takes, scales included.
// @pre elements * T::bits is a whole number of bytes (head_dim even for 4-bit types).
template <ElementType T>
constexpr std::size_t row_bytes(std::size_t elements) noexcept {
  return elements * T::bits / 8 + T::scale_bits / 8;
}

KVCACHE_END_NAMESPACE
