// fp8 element codecs: E4M3 (OCP "FN" variant) and E5M2, one byte per element, no scales.
//
//   E4M3: sign, 4 exponent bits (bias 7), 3 mantissa bits. No infinities: S.1111.111 is NaN and
//         the rest of the top exponent holds finite values, up to 448.
//   E5M2: sign, 5 exponent bits (bias 15), 2 mantissa bits. IEEE-like: the top exponent holds
//         +-inf (mantissa 0) and NaN; the largest finite value is 57344.
//
// encode rounds to nearest, ties to even, and SATURATES: a finite value beyond +-max_finite and
// +-inf both encode as +-max_finite. A KV cache never wants inf, since one inf key turns every
// later softmax row into NaN. So E5M2's inf codes are only ever read, never written. NaN
// encodes as a NaN code (sign kept) and decodes as a quiet NaN. decode is exact, as is every
// fp8 value in a float; subnormals are handled in both directions, and -0 stays -0.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "../config.hpp"
#include "concept.hpp"
#include "scale_search.hpp"

KVCACHE_BEGIN_NAMESPACE

enum class fp8_specials {
  nan_only,  // OCP "FN": all-ones exponent and mantissa is NaN; there is no inf
  ieee,      // the all-ones exponent is reserved: inf for mantissa 0, NaN otherwise
};

namespace detail {

// 2^power as a float, for powers where that is a normal float; constexpr, unlike std::ldexp.
constexpr float exp2_normal(int power) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(power + 127) << 23);
}

template <class Codec>
constexpr std::array<float, 256> build_decode_table() noexcept {
  std::array<float, 256> table{};
  for (int code = 0; code < 256; ++code)
    table[code] = Codec::decode(static_cast<std::uint8_t>(code));
  return table;
}

// A variable template rather than a static member, so that it can call Codec::decode, which
// is not usable inside Codec's own definition.
template <class Codec>
inline constexpr std::array<float, 256> fp8_decode_table = build_decode_table<Codec>();

}  // namespace detail

template <int ExponentBits, int MantissaBits, fp8_specials Specials>
struct fp8_codec {
  static_assert(ExponentBits >= 2 && MantissaBits >= 1 && 1 + ExponentBits + MantissaBits == 8);

  static constexpr int exponent_bits = ExponentBits;
  static constexpr int mantissa_bits = MantissaBits;
  static constexpr int bias = (1 << (ExponentBits - 1)) - 1;
  static constexpr int min_exponent = 1 - bias;  // of the normals; subnormals share it
  static constexpr std::uint8_t nan_code = 0x7F;  // with the sign bit clear; 0xFF is NaN too
  // The largest finite code and its value: the top exponent's second-largest mantissa for
  // "FN" (its largest is NaN), the largest mantissa below the reserved exponent for ieee.
  static constexpr std::uint8_t max_code =
      Specials == fp8_specials::nan_only ? 0x7E : 0x7F - (1 << MantissaBits);
  static constexpr float max_finite =
      Specials == fp8_specials::nan_only
          ? (2.0f - detail::exp2_normal(1 - MantissaBits)) *
                detail::exp2_normal((1 << ExponentBits) - 1 - bias)
          : (2.0f - detail::exp2_normal(-MantissaBits)) *
                detail::exp2_normal((1 << ExponentBits) - 2 - bias);

  // The code of the fp8 value nearest to `value`, ties to even; saturating, see the top.
  KVCACHE_HOST_DEVICE static constexpr std::uint8_t encode(float value) noexcept {
    const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
    const auto sign = static_cast<std::uint8_t>((bits >> 24) & 0x80);
    const std::uint32_t magnitude = bits & 0x7FFFFFFF;  // as bits; ordered like the values
    if (magnitude > 0x7F800000) return static_cast<std::uint8_t>(sign | nan_code);
    if (magnitude > std::bit_cast<std::uint32_t>(max_finite))
      return static_cast<std::uint8_t>(sign | max_code);

    // Below half the smallest subnormal everything rounds to +-0, float subnormals included.
    const int float_exponent = static_cast<int>(magnitude >> 23) - 127;
    if (float_exponent < min_exponent - MantissaBits - 1) return sign;

    // Count the value in steps of this fp8 binade (the subnormals' binade for small values):
    // the 24-bit significand shifted right by the mantissa bits fp8 lacks, rounded to even.
    const std::uint32_t significand = (magnitude & 0x7FFFFF) | 0x800000;
    const int exponent = float_exponent > min_exponent ? float_exponent : min_exponent;
    const int shift = 23 - MantissaBits + (exponent - float_exponent);  // at most 24
    std::uint32_t steps = significand >> shift;
    const std::uint32_t remainder = significand & ((std::uint32_t{1} << shift) - 1);
    const std::uint32_t half = std::uint32_t{1} << (shift - 1);
    if (remainder > half || (remainder == half && (steps & 1) != 0)) ++steps;

    // steps includes the implicit leading 1 of a normal, so adding it to the exponent field
    // one below the true one gives the code; a carry out of the mantissa (steps = 2^(m+1))
    // lands on the next exponent, and a subnormal (exponent field 0) needs no special case.
    const auto field = static_cast<std::uint32_t>(exponent + bias - 1) << MantissaBits;
    return static_cast<std::uint8_t>(sign | (field + steps));
  }

  // The exact value of `code`; a quiet NaN for NaN codes, +-inf for E5M2's inf codes.
  KVCACHE_HOST_DEVICE static constexpr float decode(std::uint8_t code) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(code & 0x80) << 24;
    const int exponent = (code & 0x7F) >> MantissaBits;
    const int mantissa = code & ((1 << MantissaBits) - 1);
    constexpr int top_exponent = (1 << ExponentBits) - 1;
    float magnitude = 0.0f;
    if (Specials == fp8_specials::nan_only && (code & 0x7F) == nan_code) {
      magnitude = std::numeric_limits<float>::quiet_NaN();
    } else if (Specials == fp8_specials::ieee && exponent == top_exponent) {
      magnitude = mantissa == 0 ? std::numeric_limits<float>::infinity()
                                : std::numeric_limits<float>::quiet_NaN();
    } else if (exponent == 0) {  // subnormal: mantissa steps of the smallest subnormal
      magnitude = static_cast<float>(mantissa) * detail::exp2_normal(min_exponent - MantissaBits);
    } else {
      magnitude = std::bit_cast<float>(static_cast<std::uint32_t>(exponent - bias + 127) << 23 |
                                       static_cast<std::uint32_t>(mantissa) << (23 - MantissaBits));
    }
    return std::bit_cast<float>(std::bit_cast<std::uint32_t>(magnitude) | sign);
  }

  // `value` rounded to MantissaBits bits after the binary point, ties to even, like encode for
  // normal values in range; elsewhere (fp8 subnormals, beyond max_finite) only an estimate.
  // What a scale search needs: a few integer instructions (search_simd has them lane-wise).
  KVCACHE_HOST_DEVICE static constexpr float round_significand(float value) noexcept {
    constexpr int dropped = 23 - MantissaBits;
    const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
    const std::uint32_t half = (std::uint32_t{1} << (dropped - 1)) - 1 + ((bits >> dropped) & 1);
    return std::bit_cast<float>((bits + half) & ~((std::uint32_t{1} << dropped) - 1));
  }

  // decode of every code, built at compile time: dequantizing a block is one lookup per byte.
  static constexpr const std::array<float, 256>& decode_table() noexcept {
    return detail::fp8_decode_table<fp8_codec>;
  }
};

using fp8_e4m3_codec = fp8_codec<4, 3, fp8_specials::nan_only>;
using fp8_e5m2_codec = fp8_codec<5, 2, fp8_specials::ieee>;

static_assert(fp8_e4m3_codec::max_finite == 448.0f && fp8_e5m2_codec::max_finite == 57344.0f);
static_assert(fp8_e4m3_codec::decode(fp8_e4m3_codec::max_code) == fp8_e4m3_codec::max_finite);
static_assert(fp8_e5m2_codec::decode(fp8_e5m2_codec::max_code) == fp8_e5m2_codec::max_finite);

// One fp8 code as stored in a cache: distinct types per format, so a kernel picks the right
// conversion from the storage type alone.
struct fp8_e4m3_code {
  static constexpr const char* format = "fp8_e4m3";
  std::uint8_t bits;
};
struct fp8_e5m2_code {
  static constexpr const char* format = "fp8_e5m2";
  std::uint8_t bits;
};

// The fp8 cache elements, with one float scale per row (token and kv-head): the row is divided
// by absmax / max_finite * (1 + k / 32) before encoding, for the k in [0, 32) that rounds the
// row closest (in squared error; dtype/scale_search.hpp), so every row uses all but at most one
// binade of the fp8 range. A row of 128 elements takes 132 bytes. Error bound per element x of
// a row with absmax m:
//   E4M3: |x - x'| <= max(|x| * 2^-4, m * 2^-17)    (3 mantissa bits; subnormals below m/2^5/448)
//   E5M2: |x - x'| <= max(|x| * 2^-3, m * 2^-31)
// NaN inputs are stored as 0 and +-inf saturate to +-absmax of the finite elements, as int8
// does, so a cache never holds a NaN or inf code. Rows holding inf, rows whose absmax is within
// a factor 2 of FLT_MAX (which rounding up could take to inf) and rows whose scale would be
// subnormal keep k = 0.
template <class Codec, class Code>
struct fp8_element {
  using storage_type = Code;
  static constexpr const char* name = Code::format;
  static constexpr int bits = 8;
  static constexpr int scale_bits = 32;

  KVCACHE_HOST_DEVICE static float row_scale(std::span<const float> row) noexcept {
    return detail::searched_row_scale<fp8_element>(row);
  }
  KVCACHE_HOST_DEVICE static void quantize_row(std::span<const float> row, float scale, Code* codes) {
    for (std::size_t i = 0; i < row.size(); ++i) {
      const float x = row[i] != row[i] || scale == 0.0f ? 0.0f : row[i] / scale;  // NaN as 0
      codes[i] = {Codec::encode(x)};
    }
  }
  KVCACHE_HOST_DEVICE static constexpr float decode(Code code) noexcept { return Codec::decode(code.bits); }

  // The scale search (dtype/scale_search.hpp): candidate k is absmax / max_finite * (1 + k / 32).
  static constexpr int scale_candidates = 32;
  static constexpr float min_searched_absmax = Codec::max_finite * std::numeric_limits<float>::min();
  static constexpr float max_searched_absmax = std::numeric_limits<float>::max() / 2;
  KVCACHE_HOST_DEVICE static float search_gain(int k) noexcept { return Codec::max_finite / stretch(k); }
  KVCACHE_HOST_DEVICE static float candidate_scale(float absmax, int k) noexcept {
    return absmax / Codec::max_finite * stretch(k);
  }
  // On the normal grid only: elements that land among fp8's subnormals lose at most half a
  // subnormal step, which the estimate does not see and the bound above covers.
  KVCACHE_HOST_DEVICE static float nearest_code(float y) noexcept { return Codec::round_significand(y); }
#if KVCACHE_SCALE_SEARCH_LANES
  static auto nearest_code(detail::search_simd::floats y) noexcept {
    return detail::search_simd::round_significand<Codec::mantissa_bits>(y);
  }
#endif

 private:
  KVCACHE_HOST_DEVICE static constexpr float stretch(int k) noexcept {
    return 1.0f + static_cast<float>(k) / scale_candidates;
  }
};

using fp8_e4m3 = fp8_element<fp8_e4m3_codec, fp8_e4m3_code>;
using fp8_e5m2 = fp8_element<fp8_e5m2_codec, fp8_e5m2_code>;

// A stored code as the kernels read it (times the row's scale).
KVCACHE_HOST_DEVICE constexpr float to_float(fp8_e4m3_code code) noexcept { return fp8_e4m3::decode(code); }
KVCACHE_HOST_DEVICE constexpr float to_float(fp8_e5m2_code code) noexcept { return fp8_e5m2::decode(code); }

KVCACHE_END_NAMESPACE
