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

// An element type quantized in groups that span tokens (int4: keys per channel over
// group_tokens tokens, values per row, dtype/int4.hpp). The cache keeps a sequence's newest
// tokens in full precision until their group is whole; token_bytes(head_dim) is what one token
// of one kv-head takes, K and V, scales included.
template <class T>
concept GroupQuantizedElement = ElementType<T> && (T::group_tokens > 0) && requires(std::size_t head_dim) {
  { T::token_bytes(head_dim) } -> std::same_as<std::size_t>;
};

// A row-quantized type whose cache keeps each sequence's newest tokens in full precision, as
// int4 does (dtype/residual.hpp): rows are quantized residual_tokens at a time, when the last
// of them is appended, so the newest 0 to residual_tokens - 1 positions stay exact.
template <class T>
concept ResidualQuantizedElement = QuantizedElement<T> && requires {
  { T::residual_tokens } -> std::convertible_to<int>;
} && (T::residual_tokens > 0);

template <class T>
concept CacheElement = FloatElement<T> || QuantizedElement<T> || GroupQuantizedElement<T>;

// Tokens a cache of T quantizes together, keeping the newest of them in full precision until
// the last arrives: int4's K group, a residual type's window; 0 for types stored as appended.
template <ElementType T>
inline constexpr int residual_tokens = [] {
  if constexpr (GroupQuantizedElement<T>) return int{T::group_tokens};
  else if constexpr (ResidualQuantizedElement<T>) return int{T::residual_tokens};
  else return 0;
}();

namespace detail {

// Float helpers the row quantizers use on host and device alike (<cmath>'s are host-only).
KVCACHE_HOST_DEVICE constexpr bool is_finite(float x) noexcept {
  return (std::bit_cast<std::uint32_t>(x) & 0x7F800000u) != 0x7F800000u;
}
KVCACHE_HOST_DEVICE constexpr float magnitude(float x) noexcept {
  return std::bit_cast<float>(std::bit_cast<std::uint32_t>(x) & 0x7FFFFFFFu);
}
// The finite elements' largest magnitude (NaN and inf skipped); 0 for none. Computed on the
// bits, where finite magnitudes order as unsigned integers: a branch-free integer max vectorizes.
KVCACHE_HOST_DEVICE constexpr float finite_absmax(std::span<const float> row) noexcept {
  std::uint32_t largest = 0;
  for (const float x : row) {
    const std::uint32_t bits = std::bit_cast<std::uint32_t>(x) & 0x7FFFFFFFu;
    const std::uint32_t finite = bits < 0x7F800000u ? bits : 0u;
    largest = finite > largest ? finite : largest;
  }
  return std::bit_cast<float>(largest);
}

}  // namespace detail

// Bytes that one row of `elements` values takes, scales included.
// @pre elements * T::bits is a whole number of bytes (head_dim even for 4-bit types).
template <ElementType T>
constexpr std::size_t row_bytes(std::size_t elements) noexcept {
  return elements * T::bits / 8 + T::scale_bits / 8;
}

// Bytes that one token's K and V rows take in one kv-head, scales included.
template <ElementType T>
constexpr std::size_t token_bytes(std::size_t head_dim) noexcept {
  if constexpr (requires { T::token_bytes(head_dim); }) return T::token_bytes(head_dim);
  else return 2 * row_bytes<T>(head_dim);
}

// Elements one storage unit holds: 2 for packed int4 (int4x2), else 1.
template <class Storage>
inline constexpr int elements_per_unit = [] {
  if constexpr (requires { Storage::elements; }) return int{Storage::elements};
  else return 1;
}();

KVCACHE_END_NAMESPACE
