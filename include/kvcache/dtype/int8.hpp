// Symmetric int8 quantization with one float scale per row: x ~ code * scale, code in
// [-127, 127]. -128 is never produced, so the code range is symmetric and negation is exact.
//
// The scale is absmax / top for the top in [112, 127] that rounds the row closest (in squared
// error; dtype/scale_search.hpp), so the largest code is +-top.
//
// Error bound. With scale = int8_row_scale(row), every element x of the row satisfies
//   |x - dequantized| <= scale / 2 <= absmax / 224   in exact arithmetic;
// float rounding adds at most absmax * 2^-22, plus 2^-141 when scale is subnormal
// (absmax < 2^-119), where scale itself carries only a few significant bits.
//
// Non-finite inputs, which an engine should never write but must not crash on:
//   NaN is treated as 0: it encodes as code 0.
//   +-inf saturates, like fp8: it encodes as +-127.
// NaN takes no part in choosing the scale; a row holding inf keeps the plain scale absmax / 127 of
// its finite elements, so inf dequantizes to +-absmax.
// A row with no nonzero finite element has scale 0, and every code is 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "../config.hpp"
#include "concept.hpp"
#include "scale_search.hpp"

KVCACHE_BEGIN_NAMESPACE

inline constexpr int int8_max_code = 127;

// How many scales int8_row_scale weighs: absmax / top for top = 127, 126, ..., 112.
inline constexpr int int8_scale_candidates = 16;

namespace detail {

// x rounded to the nearest integer, ties to even, on host and device alike.
KVCACHE_HOST_DEVICE float round_to_even(float x) noexcept {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

// absmax / top, rounded down where needed so that top * scale <= absmax also in float: codes
// stay within [-top, top], so dequantized values never leave [-absmax, absmax] and a row
// holding +-FLT_MAX does not dequantize to inf.
KVCACHE_HOST_DEVICE float int8_scale_for_top(float absmax, int top) noexcept {
  const auto top_code = static_cast<float>(top);
  float scale = absmax / top_code;
  while (top_code * scale > absmax)  // at most one step down (scale > 0 here)
    scale = std::bit_cast<float>(std::bit_cast<std::uint32_t>(scale) - 1);
  return scale;
}

}  // namespace detail

// codes[i] = round(row[i] / scale), ties to even, clamped to [-127, 127]; NaN and inf as the
// top of this header says, and every code 0 when scale is 0. A scale other than the row's
// own (one shared by several rows, say) is fine: elements beyond 127 * scale saturate.
// @pre codes.size() == row.size(); scale is finite and >= 0.
KVCACHE_HOST_DEVICE void quantize_int8_row(std::span<const float> row, float scale,
                                           std::span<std::int8_t> codes) {
  KVCACHE_ASSERT(codes.size() == row.size(), "quantize_int8_row: need one code per element");
  KVCACHE_ASSERT(scale >= 0.0f && scale <= std::numeric_limits<float>::max(),
                 "quantize_int8_row: scale must be finite and >= 0");
  if (scale == 0.0f) {  // would divide by zero; every element is within 0 of 0 * code anyway
    for (std::int8_t& code : codes) code = 0;
    return;
  }
  constexpr auto max_code = static_cast<float>(int8_max_code);
  for (std::size_t i = 0; i < row.size(); ++i) {
    const float x = row[i] != row[i] ? 0.0f : row[i];  // NaN as 0
    // Divide rather than multiply by 1 / scale: a subnormal scale has no finite reciprocal.
    const float steps = std::clamp(x / scale, -max_code, max_code);
    codes[i] = static_cast<std::int8_t>(detail::round_to_even(steps));
  }
}

// out[i] = codes[i] * scale.
// @pre out.size() == codes.size().
inline void dequantize_int8_row(std::span<const std::int8_t> codes, float scale,
                                std::span<float> out) {
  KVCACHE_ASSERT(out.size() == codes.size(), "dequantize_int8_row: need one output per code");
  for (std::size_t i = 0; i < codes.size(); ++i) out[i] = static_cast<float>(codes[i]) * scale;
}

// The int8 cache element: symmetric, one float scale per row (token and kv-head), so a row of
// 128 elements takes 132 bytes (f16: 256). Error bound per element: the row's absmax / 224.
struct int8 {
  using storage_type = std::int8_t;
  static constexpr const char* name = "int8";
  static constexpr int bits = 8;
  static constexpr int scale_bits = 32;

  KVCACHE_HOST_DEVICE static float row_scale(std::span<const float> row) noexcept {
    return detail::searched_row_scale<int8>(row);
  }
  KVCACHE_HOST_DEVICE static void quantize_row(std::span<const float> row, float scale, std::int8_t* codes) {
    quantize_int8_row(row, scale, {codes, row.size()});
  }
  KVCACHE_HOST_DEVICE static constexpr float decode(std::int8_t code) noexcept { return code; }

  // The scale search (dtype/scale_search.hpp): candidate k is absmax / (127 - k). Rows so small
  // that the scale is subnormal (too few bits to keep codes within +-top) keep absmax / 127.
  static constexpr int scale_candidates = int8_scale_candidates;
  static constexpr float min_searched_absmax = int8_max_code * std::numeric_limits<float>::min();
  static constexpr float max_searched_absmax = std::numeric_limits<float>::max();
  KVCACHE_HOST_DEVICE static float search_gain(int k) noexcept { return static_cast<float>(int8_max_code - k); }
  KVCACHE_HOST_DEVICE static float candidate_scale(float absmax, int k) noexcept {
    return detail::int8_scale_for_top(absmax, int8_max_code - k);
  }
  KVCACHE_HOST_DEVICE static float nearest_code(float y) noexcept { return detail::round_to_even(y); }
#if KVCACHE_SCALE_SEARCH_LANES
  static auto nearest_code(detail::search_simd::floats y) noexcept { return detail::search_simd::nearest_integer(y); }
#endif
};

// absmax / top over the finite elements of `row`, of the int8_scale_candidates tops the one
// that rounds the row with the least squared error (dtype/scale_search.hpp); absmax / 127 for
// rows holding inf and rows below int8::min_searched_absmax, and 0 for rows with no nonzero
// finite element.
KVCACHE_HOST_DEVICE float int8_row_scale(std::span<const float> row) noexcept { return int8::row_scale(row); }

// A stored code as the kernels read it (times the row's scale).
KVCACHE_HOST_DEVICE constexpr float to_float(std::int8_t code) noexcept { return code; }

KVCACHE_END_NAMESPACE
