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
#include <utility>

#include "../config.hpp"
#include "concept.hpp"

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

// round((x - minimum) / scale), ties to even, clamped to [0, 15]. @pre params.scale > 0.
inline std::uint8_t int4_code(float x, Int4Params params) noexcept {
  // x - minimum cannot be NaN: x is finite and minimum finite; it may overflow to +-inf
  // only for a minimum beyond the value limit, and then the clamp saturates it correctly.
  const float steps = std::clamp((int4_input(x) - params.minimum) / params.scale, 0.0f,
                                 static_cast<float>(int4_max_code));
  return static_cast<std::uint8_t>(std::nearbyint(steps));
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

  for (std::size_t i = 0; i < group.size(); ++i)
    packed[i / 2] = static_cast<std::uint8_t>(packed[i / 2] | detail::int4_code(group[i], params) << (4 * (i % 2)));
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

// ---- the int4 cache element ----
//
// Keys and values are quantized along different axes, because their outliers lie along
// different axes (KIVI): a few key channels are large for every token, so keys are quantized per
// channel, each channel over a group of int4_group_tokens consecutive tokens; value outliers
// come token by token, so values are quantized per token, one group per row. A group of keys
// can be quantized only once its last token is known, so the cache keeps the newest tokens of
// each sequence in full precision (the residual window: the positions after the last whole
// group, fewer than int4_group_tokens) and quantizes a group when it fills.
//
// Per kv-head of a page the cache stores codes [page_tokens][head_dim / 2] for V, and for K the
// same bytes as [page_tokens / group] key groups (int4_key_code_at says how one is laid out),
// K parameters [page_tokens / group][2][head_dim] (a group's channel scales, then its channel
// minima) and V parameters [page_tokens][2] (scale, minimum). With head_dim 128 a token takes
// 168 bytes per kv-head (f16: 512); the residual window takes the same f32 rows in every
// sequence whatever its length.

// Two int4 codes, element 2i in the low nibble of byte i.
struct int4x2 {
  static constexpr int elements = 2;
  std::uint8_t bits;
};

inline constexpr int int4_group_tokens = 32;

// Code d of a packed row, as a float.
inline float int4_code_at(const int4x2* codes, int d) noexcept {
  return static_cast<float>((codes[d / 2].bits >> (4 * (d % 2))) & 0xF);
}

// A group of key codes, int4_group_tokens tokens of head_dim channels (head_dim a multiple
// of 8), is stored channel-block-major, [head_dim / 8][int4_group_tokens][4 bytes]: the 32-bit
// word of token t in block c holds channels 8c + 2i in bits 4i (i = 0..3) and 8c + 2i + 1 in
// bits 16 + 4i. So one 64-byte load holds 8 channels of 16 tokens, and shifting it by 4i and
// masking 0x000F000F gives each token the 16-bit pair (channel 8c + 2i, 8c + 2i + 1): a group
// is dotted with the queries a token per SIMD lane, with no reduction across lanes.
// Byte offset in the group, and bit shift in that byte, of token `token`'s channel d.
inline std::pair<std::size_t, int> int4_key_code_place(int token, int d) noexcept {
  const int channel = d % 8, pair = channel / 2;
  const std::size_t word = static_cast<std::size_t>(d / 8) * int4_group_tokens + static_cast<std::size_t>(token);
  return {word * 4 + static_cast<std::size_t>(channel % 2) * 2 + static_cast<std::size_t>(pair / 2), 4 * (pair % 2)};
}

// Code of channel d of token `token` of a group of key codes, as a float.
inline float int4_key_code_at(const int4x2* group, int token, int d) noexcept {
  const auto [byte, shift] = int4_key_code_place(token, d);
  return static_cast<float>((group[byte].bits >> shift) & 0xF);
}

namespace detail {
inline void set_int4_code(int4x2* codes, int d, std::uint8_t code) noexcept {
  codes[d / 2].bits = static_cast<std::uint8_t>(codes[d / 2].bits | code << (4 * (d % 2)));
}
inline std::uint8_t int4_code_or_zero(float x, Int4Params params) noexcept {
  return params.scale == 0.0f ? std::uint8_t{0} : int4_code(x, params);
}
}  // namespace detail

// Quantizes a whole group of key rows, rows [int4_group_tokens][head_dim], channel by channel:
// params [2][head_dim] get each channel's scale and minimum (int4_group_params over the
// channel's group_tokens values), codes (int4_group_tokens * head_dim / 2 bytes, laid out as
// int4_key_code_at reads them) the codes. Each element is within its channel's scale / 2 of its
// dequantized value (the bound at the top). @pre head_dim % 8 == 0
inline void quantize_int4_keys(const float* rows, int head_dim, float* params, int4x2* codes) noexcept {
  constexpr int group = int4_group_tokens;
  for (std::size_t unit = 0; unit < static_cast<std::size_t>(group) * head_dim / 2; ++unit) codes[unit].bits = 0;
  for (int d = 0; d < head_dim; ++d) {
    float channel[group];
    for (int r = 0; r < group; ++r) channel[r] = rows[static_cast<std::size_t>(r) * head_dim + d];
    const Int4Params p = int4_group_params(channel);
    params[d] = p.scale;
    params[head_dim + d] = p.minimum;
    for (int r = 0; r < group; ++r) {
      const auto [byte, shift] = int4_key_code_place(r, d);
      codes[byte].bits = static_cast<std::uint8_t>(codes[byte].bits | detail::int4_code_or_zero(channel[r], p) << shift);
    }
  }
}

// Quantizes one value row of head_dim elements as one group: params [2] = scale, minimum;
// codes [head_dim / 2].
inline void quantize_int4_values(const float* row, int head_dim, float* params, int4x2* codes) noexcept {
  const Int4Params p = int4_group_params({row, static_cast<std::size_t>(head_dim)});
  params[0] = p.scale;
  params[1] = p.minimum;
  for (int unit = 0; unit < head_dim / 2; ++unit) codes[unit].bits = 0;
  for (int d = 0; d < head_dim; ++d) detail::set_int4_code(codes, d, detail::int4_code_or_zero(row[d], p));
}

// The int4 cache element: keys per channel over groups of int4_group_tokens tokens, values per
// token, asymmetric 4-bit codes (the layout above).
struct int4 {
  using storage_type = int4x2;
  static constexpr const char* name = "int4";
  static constexpr int bits = 4;
  static constexpr int scale_bits = 0;  // no per-row scale of one layout: see token_bytes
  static constexpr int group_tokens = int4_group_tokens;

  // K and V bytes of one token in one kv-head: codes, the V row's scale and minimum, and its
  // share of the K group's channel scales and minima. @pre head_dim % 8 == 0 (key groups'
  // blocks of 8 channels).
  static constexpr std::size_t token_bytes(std::size_t head_dim) noexcept {
    return head_dim + 2 * sizeof(float) + 2 * sizeof(float) * head_dim / group_tokens;
  }
  static void quantize_keys(const float* rows, int head_dim, float* params, int4x2* codes) noexcept {
    quantize_int4_keys(rows, head_dim, params, codes);
  }
  static void quantize_values(const float* row, int head_dim, float* params, int4x2* codes) noexcept {
    quantize_int4_values(row, head_dim, params, codes);
  }
};

KVCACHE_END_NAMESPACE
