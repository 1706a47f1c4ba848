// Asymmetric int4 group quantization (min and scale per group, as KIVI uses for the KV cache):
// x ~ minimum + code * scale, code in [0, 15], two codes per byte, the even element in the low
// nibble. Asymmetric because key channels are often far from centred on 0, where a symmetric
// code would waste half of its 16 levels.
//
// Error bound. With params = int4_group_params(group), scale = (max - min) / 15 and every
// element x of the group satisfies
//   |x - dequantized| <= scale / 2   in exact arithmetic;
// float rounding adds at most (|min| + |max|) * 2^-21, plus 2^-140 when scale is subnormal.
//
// Inputs outside that contract, which an engine should never write but must not crash on:
//   NaN is treated as 0: exactly as if the element were 0, so 0 counts towards min and max.
//   +-inf saturates, like fp8: it leaves min and max alone and encodes as code 15 (+inf) or 0.
//   Finite values are first clamped to +-int4_value_limit (FLT_MAX / 2, about 1.7e38), so that
//   max - min, and every intermediate of quantizing and dequantizing, stays a finite float.
// A constant group (max == min) has scale 0; its codes are all 0 (inf's too) and dequantize to
// exactly minimum. A group with no finite value has params {0, 0}.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

inline constexpr int int4_max_code = 15;
inline constexpr float int4_value_limit = std::numeric_limits<float>::max() / 2;

struct Int4Params {
  float scale = 0.0f;    // value of one code step; >= 0
  float minimum = 0.0f;  // value of code 0

  friend constexpr bool operator==(const Int4Params&, const Int4Params&) = default;
};

// Bytes that `elements` packed codes take; an odd count leaves the last high nibble 0.
constexpr std::size_t int4_packed_bytes(std::size_t elements) noexcept {
  return (elements + 1) / 2;
}

namespace detail {

// An element as the int4 quantizer sees it: NaN as 0, finite values clamped to the limit.
// inf is clamped too, which for quantizing is the same as saturating.
inline float int4_input(float x) noexcept {
  return std::isnan(x) ? 0.0f : std::clamp(x, -int4_value_limit, int4_value_limit);
}

}  // namespace detail

// minimum and scale = (max - min) / 15 over the group, inputs read as the header says. scale
// is rounded down where needed so that dequantized code 15 does not exceed max in float:
// dequantized values never leave [min, max].
inline Int4Params int4_group_params(std::span<const float> group) noexcept {
  float minimum = std::numeric_limits<float>::infinity();
  float maximum = -std::numeric_limits<float>::infinity();
  for (const float x : group) {
    if (std::isinf(x)) continue;
    const float value = detail::int4_input(x);
    minimum = std::min(minimum, value);
    maximum = std::max(maximum, value);
  }
  if (minimum > maximum) return {};  // no finite value

  constexpr auto max_code = static_cast<float>(int4_max_code);
  float scale = (maximum - minimum) / max_code;  // finite: both are within +-FLT_MAX / 2
  // Both roundings of minimum + 15 * scale can go up; a few ulps down always suffices.
  while (minimum + max_code * scale > maximum) scale = std::nextafter(scale, 0.0f);
  return {scale, minimum};
}

// code = round((x - minimum) / scale), ties to even, clamped to [0, 15], packed two per byte
// with element 2i in the low nibble of packed[i]. Params of another group are fine: elements
// outside [minimum, minimum + 15 * scale] saturate. Every code is 0 when scale is 0.
// @pre packed.size() == int4_packed_bytes(group.size()); params.scale is finite and >= 0,
//      params.minimum is finite.
inline void quantize_int4_group(std::span<const float> group, Int4Params params,
                                std::span<std::uint8_t> packed) {
  KVCACHE_ASSERT(packed.size() == int4_packed_bytes(group.size()),
                 "quantize_int4_group: need one byte per two elements");
  KVCACHE_ASSERT(params.scale >= 0.0f && params.scale <= std::numeric_limits<float>::max(),
                 "quantize_int4_group: scale must be finite and >= 0");
  KVCACHE_ASSERT(std::isfinite(params.minimum), "quantize_int4_group: minimum must be finite");
  std::fill(packed.begin(), packed.end(), std::uint8_t{0});
  if (params.scale == 0.0f) return;  // would divide by zero; code 0 is minimum, the best there is

  constexpr auto max_code = static_cast<float>(int4_max_code);
  for (std::size_t i = 0; i < group.size(); ++i) {
    // x - minimum cannot be NaN: x is finite and minimum finite; it may overflow to +-inf
    // only for a minimum beyond the value limit, and then the clamp saturates it correctly.
    const float steps =
        std::clamp((detail::int4_input(group[i]) - params.minimum) / params.scale, 0.0f, max_code);
    const auto code = static_cast<std::uint8_t>(std::nearbyint(steps));
    packed[i / 2] = static_cast<std::uint8_t>(packed[i / 2] | code << (4 * (i % 2)));
  }
}

// out[i] = minimum + code_i * scale, where code_i is nibble i of `packed` (low nibble first).
// @pre packed.size() == int4_packed_bytes(out.size()).
inline void dequantize_int4_group(std::span<const std::uint8_t> packed, Int4Params params,
                                  std::span<float> out) {
  KVCACHE_ASSERT(packed.size() == int4_packed_bytes(out.size()),
                 "dequantize_int4_group: need one byte per two elements");
  for (std::size_t i = 0; i < out.size(); ++i) {
    const int code = (packed[i / 2] >> (4 * (i % 2))) & 0xF;
    out[i] = params.minimum + static_cast<float>(code) * params.scale;
  }
}

KVCACHE_END_NAMESPACE
