// ElementType: how one element of K or V is stored.
//
// All byte math goes through bit widths, so a packed sub-byte type (int4) is an ordinary type,
// and a quantized type states the bits of scale data it keeps per row (one token of one kv-head,
// head_dim elements). Plain floating types keep no scales and convert element by element
// (FloatElement); row-quantized types keep one float scale per row (QuantizedElement). The
// cache and the attention kernels take either (CacheElement).
#pragma once

#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
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

// An element type quantized a row at a time with one float scale per row: a row x is stored as
// codes c with x[i] ~ decode(c[i]) * scale. Kernels read decode(c) and apply the scale once per
// row (to the score for K, to the softmax weight for V), so dequantization costs no extra pass.
template <class T>
concept QuantizedElement = ElementType<T> && (T::scale_bits == 32) &&
    requires(std::span<const float> row, float scale, typename T::storage_type* codes,
             typename T::storage_type code) {
      { T::row_scale(row) } -> std::same_as<float>;  // finite, >= 0
      { T::quantize_row(row, scale, codes) };         // row.size() codes
      { T::decode(code) } -> std::same_as<float>;
    };

template <class T>
concept CacheElement = FloatElement<T> || QuantizedElement<T>;

namespace detail {

// Float helpers the row quantizers use on host and device alike (<cmath>'s are host-only).
KVCACHE_HOST_DEVICE constexpr bool is_finite(float x) noexcept {
  return (std::bit_cast<std::uint32_t>(x) & 0x7F800000u) != 0x7F800000u;
}
KVCACHE_HOST_DEVICE constexpr float magnitude(float x) noexcept {
  return std::bit_cast<float>(std::bit_cast<std::uint32_t>(x) & 0x7FFFFFFFu);
}
// The finite elements' largest magnitude (NaN and inf skipped); 0 for none.
KVCACHE_HOST_DEVICE constexpr float finite_absmax(std::span<const float> row) noexcept {
  float absmax = 0.0f;
  for (const float x : row)
    if (is_finite(x) && magnitude(x) > absmax) absmax = magnitude(x);
  return absmax;
}

}  // namespace detail

// Bytes that one row of `elements` values takes, scales included.
// @pre elements * T::bits is a whole number of bytes (head_dim even for 4-bit types).
template <ElementType T>
constexpr std::size_t row_bytes(std::size_t elements) noexcept {
  return elements * T::bits / 8 + T::scale_bits / 8;
}

KVCACHE_END_NAMESPACE
