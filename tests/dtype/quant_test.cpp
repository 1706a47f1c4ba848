#include <kvcache/dtype/float.hpp>
#include <kvcache/dtype/fp8.hpp>
#include <kvcache/dtype/int4.hpp>
#include <kvcache/dtype/int8.hpp>
#include <kvcache/dtype/scale_search.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

namespace kvcache {
namespace {

constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float nan = std::numeric_limits<float>::quiet_NaN();
constexpr float flt_max = std::numeric_limits<float>::max();
constexpr float denorm_min = std::numeric_limits<float>::denorm_min();

// A float with the given sign, unbiased exponent and 23 mantissa bits; a normal float.
float make_float(bool negative, int exponent, std::uint32_t mantissa) {
  return std::bit_cast<float>((negative ? 0x80000000u : 0u) |
                              static_cast<std::uint32_t>(exponent + 127) << 23 |
                              (mantissa & 0x7FFFFF));
}

// ---------------------------------------------------------------------------------------------
// fp8: every code and the encoder against a reference written from the format's definition.

// The format as the OCP fp8 specification describes it, independently of the codec's code.
struct Fp8Spec {
  int exponent_bits;
  int mantissa_bits;
  int bias;
  bool has_inf;  // E5M2: top exponent is inf / NaN. E4M3 "FN": only S.1111.111 is NaN.
  float max_finite;
  int nan_codes;
};

bool reference_is_nan(const Fp8Spec& spec, int code) {
  const int magnitude = code & 0x7F;
  const int top = ((1 << spec.exponent_bits) - 1) << spec.mantissa_bits;
  if (spec.has_inf) return magnitude > top;
  return magnitude == 0x7F;
}

// Value of a code by the textbook formula, in double; NaN and inf as the format says.
double reference_decode(const Fp8Spec& spec, int code) {
  if (reference_is_nan(spec, code)) return std::numeric_limits<double>::quiet_NaN();
  const double sign = (code & 0x80) != 0 ? -1.0 : 1.0;
  const int exponent = (code & 0x7F) >> spec.mantissa_bits;
  const int mantissa = code & ((1 << spec.mantissa_bits) - 1);
  if (spec.has_inf && exponent == (1 << spec.exponent_bits) - 1)
    return sign * std::numeric_limits<double>::infinity();
  const double fraction = std::ldexp(mantissa, -spec.mantissa_bits);
  if (exponent == 0) return sign * std::ldexp(fraction, 1 - spec.bias);
  return sign * std::ldexp(1.0 + fraction, exponent - spec.bias);
}

// The code encode must give for a non-NaN x, by brute force over all codes: the largest
// finite code of x's sign when |x| > max finite (saturation), else the code of x's sign whose
// value is nearest, the one with an even code on a tie.
int reference_encode(const Fp8Spec& spec, float x) {
  const int sign = std::signbit(x) ? 0x80 : 0x00;
  int best = -1;
  long double best_distance = 0;
  double largest = -1;
  int largest_code = -1;
  for (int code = sign; code < sign + 0x80; ++code) {
    const double value = reference_decode(spec, code);
    if (std::isnan(value) || std::isinf(value)) continue;
    if (std::abs(value) > largest) {
      largest = std::abs(value);
      largest_code = code;
    }
    const long double distance = std::abs(static_cast<long double>(x) - value);
    if (best < 0 || distance < best_distance ||
        (distance == best_distance && (code & 1) == 0)) {
      best = code;
      best_distance = distance;
    }
  }
  return std::abs(x) > largest ? largest_code : best;
}

template <class Codec>
struct Fp8Case;

template <>
struct Fp8Case<fp8_e4m3_codec> {
  static constexpr Fp8Spec spec{4, 3, 7, false, 448.0f, 2};
};
template <>
struct Fp8Case<fp8_e5m2_codec> {
  static constexpr Fp8Spec spec{5, 2, 15, true, 57344.0f, 6};
};

template <class Codec>
class Fp8Test : public ::testing::Test {};
using Fp8Codecs = ::testing::Types<fp8_e4m3_codec, fp8_e5m2_codec>;
TYPED_TEST_SUITE(Fp8Test, Fp8Codecs);

// Checks encode(x) against the reference, NaN included; returns whether it matched.
template <class Codec>
bool encodes_like_reference(float x) {
  const Fp8Spec& spec = Fp8Case<Codec>::spec;
  const std::uint8_t code = Codec::encode(x);
  if (std::isnan(x)) {
    EXPECT_TRUE(reference_is_nan(spec, code)) << "NaN encoded as non-NaN code " << int{code};
    EXPECT_EQ(code & 0x80, std::signbit(x) ? 0x80 : 0x00) << "NaN lost its sign";
    return reference_is_nan(spec, code);
  }
  const int expected = reference_encode(spec, x);
  EXPECT_EQ(int{code}, expected) << "encode(" << x << ") [bits 0x" << std::hex
                                 << std::bit_cast<std::uint32_t>(x) << std::dec << "] gave "
                                 << Codec::decode(code) << ", expected "
                                 << reference_decode(spec, expected);
  return int{code} == expected;
}

TYPED_TEST(Fp8Test, DecodeMatchesTheFormatDefinitionForAllCodes) {
  const Fp8Spec& spec = Fp8Case<TypeParam>::spec;
  int nan_codes = 0;
  for (int code = 0; code < 256; ++code) {
    const float decoded = TypeParam::decode(static_cast<std::uint8_t>(code));
    const double expected = reference_decode(spec, code);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(decoded)) << "code " << code;
      ++nan_codes;
      continue;
    }
    EXPECT_EQ(static_cast<double>(decoded), expected) << "code " << code;
    EXPECT_EQ(std::signbit(decoded), (code & 0x80) != 0) << "code " << code;  // -0 too
  }
  EXPECT_EQ(nan_codes, spec.nan_codes);
  EXPECT_EQ(TypeParam::max_finite, spec.max_finite);
  EXPECT_EQ(TypeParam::decode(TypeParam::max_code), spec.max_finite);
  EXPECT_EQ(TypeParam::decode(TypeParam::max_code | 0x80), -spec.max_finite);
}

TYPED_TEST(Fp8Test, DecodeTableIsDecodeBitForBit) {
  const std::array<float, 256>& table = TypeParam::decode_table();
  for (int code = 0; code < 256; ++code)
    EXPECT_EQ(std::bit_cast<std::uint32_t>(table[code]),
              std::bit_cast<std::uint32_t>(TypeParam::decode(static_cast<std::uint8_t>(code))))
        << "code " << code;
  static_assert(TypeParam::decode_table()[0x00] == 0.0f);  // built at compile time
}

TYPED_TEST(Fp8Test, EveryFiniteCodeRoundTripsAndInfSaturates) {
  for (int code = 0; code < 256; ++code) {
    const float value = TypeParam::decode(static_cast<std::uint8_t>(code));
    const std::uint8_t again = TypeParam::encode(value);
    if (std::isnan(value)) {
      EXPECT_TRUE(std::isnan(TypeParam::decode(again))) << "code " << code;
    } else if (std::isinf(value)) {
      EXPECT_EQ(again, (code & 0x80) | TypeParam::max_code) << "code " << code;
    } else {
      EXPECT_EQ(int{again}, code) << "value " << value;
    }
  }
  EXPECT_EQ(TypeParam::encode(-0.0f), 0x80);
  EXPECT_EQ(TypeParam::encode(0.0f), 0x00);
}

TYPED_TEST(Fp8Test, TiesGoToEvenAtEveryMidpoint) {
  // Midpoints of neighbouring finite values are exact floats; one float ulp either side must
  // go to the nearer neighbour. Covers subnormals, the subnormal/normal seam and every binade.
  std::vector<float> positives;
  for (int code = 0; code <= TypeParam::max_code; ++code)
    positives.push_back(TypeParam::decode(static_cast<std::uint8_t>(code)));
  ASSERT_TRUE(std::is_sorted(positives.begin(), positives.end()));
  int mismatches = 0;
  for (std::size_t i = 0; i + 1 < positives.size(); ++i) {
    const float middle = (positives[i] + positives[i + 1]) / 2;
    ASSERT_EQ(static_cast<double>(middle),
              (static_cast<double>(positives[i]) + positives[i + 1]) / 2);  // exact
    for (const float x : {middle, std::nextafter(middle, 0.0f), std::nextafter(middle, inf)})
      mismatches += !encodes_like_reference<TypeParam>(x) + !encodes_like_reference<TypeParam>(-x);
    // A tie goes to whichever neighbour has an even code: i, since codes count up from 0.
    EXPECT_EQ(std::size_t{TypeParam::encode(middle)}, i % 2 == 0 ? i : i + 1)
        << "midpoint " << middle;
  }
  EXPECT_EQ(mismatches, 0);
}

TYPED_TEST(Fp8Test, ExtremesSaturateAndNanStaysNan) {
  const float max = TypeParam::max_finite;
  const std::uint8_t top = TypeParam::max_code;
  EXPECT_EQ(TypeParam::encode(max), top);
  EXPECT_EQ(TypeParam::encode(-max), top | 0x80);
  EXPECT_EQ(TypeParam::encode(std::nextafter(max, inf)), top);  // just above max
  EXPECT_EQ(TypeParam::encode(max * 1.25f), top);   // beyond the would-be next value's midpoint
  EXPECT_EQ(TypeParam::encode(inf), top);
  EXPECT_EQ(TypeParam::encode(-inf), top | 0x80);
  EXPECT_EQ(TypeParam::encode(flt_max), top);
  EXPECT_EQ(TypeParam::encode(-flt_max), top | 0x80);
  EXPECT_TRUE(std::isnan(TypeParam::decode(TypeParam::encode(nan))));
  EXPECT_TRUE(std::isnan(TypeParam::decode(TypeParam::encode(-nan))));
  EXPECT_EQ(TypeParam::encode(denorm_min), 0x00);  // float subnormals are far below fp8's
  EXPECT_EQ(TypeParam::encode(-denorm_min), 0x80);

  const float smallest = TypeParam::decode(1);  // smallest subnormal
  EXPECT_EQ(TypeParam::encode(smallest), 1);
  EXPECT_EQ(TypeParam::encode(smallest / 2), 0);  // tie between 0 and 1: even
  EXPECT_EQ(TypeParam::encode(std::nextafter(smallest / 2, 1.0f)), 1);
  EXPECT_EQ(TypeParam::encode(-smallest * 1.5f), 0x82);  // tie between 1 and 2: even

  for (const float x : {max, -max, std::nextafter(max, inf), inf, -inf, flt_max, -flt_max,
                        std::numeric_limits<float>::min(), denorm_min, -denorm_min, 0.0f, -0.0f,
                        nan, -nan, smallest / 2, smallest, 1.0f, -1.0f})
    encodes_like_reference<TypeParam>(x);
}

TYPED_TEST(Fp8Test, EncodeMatchesBruteForceOnRandomFloats) {
  std::mt19937 rng(8);
  std::uniform_int_distribution<int> exponent(-30, 20);  // below E5M2 subnormals to above max
  std::uniform_int_distribution<std::uint32_t> bits;
  int mismatches = 0;
  for (int i = 0; i < 100000 && mismatches < 20; ++i) {
    mismatches += !encodes_like_reference<TypeParam>(
        make_float((bits(rng) & 1) != 0, exponent(rng), bits(rng)));
    // Any bit pattern: huge, tiny, subnormal, inf and NaN floats.
    mismatches += !encodes_like_reference<TypeParam>(std::bit_cast<float>(bits(rng)));
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(Fp8, KnownValues) {
  static_assert(fp8_e4m3_codec::decode(0x38) == 1.0f && fp8_e5m2_codec::decode(0x3C) == 1.0f);
  static_assert(fp8_e4m3_codec::encode(1.0f) == 0x38 && fp8_e5m2_codec::encode(-2.0f) == 0xC0);
  EXPECT_EQ(fp8_e4m3_codec::decode(0x01), 0x1p-9f);   // smallest subnormal
  EXPECT_EQ(fp8_e4m3_codec::decode(0x08), 0x1p-6f);   // smallest normal
  EXPECT_EQ(fp8_e4m3_codec::decode(0x7E), 448.0f);
  EXPECT_EQ(fp8_e4m3_codec::decode(0x78), 256.0f);    // top exponent is finite in "FN"
  EXPECT_EQ(fp8_e5m2_codec::decode(0x01), 0x1p-16f);
  EXPECT_EQ(fp8_e5m2_codec::decode(0x04), 0x1p-14f);
  EXPECT_EQ(fp8_e5m2_codec::decode(0x7B), 57344.0f);
  EXPECT_EQ(fp8_e5m2_codec::decode(0x7C), inf);
  EXPECT_EQ(fp8_e5m2_codec::decode(0xFC), -inf);
  EXPECT_EQ(fp8_e4m3_codec::encode(0.1f), 0x1D);  // 0.1015625, nearest to 0.1
  EXPECT_EQ(fp8_e5m2_codec::encode(300.0f), 0x5D);  // 320; 256 is farther
}

// ---------------------------------------------------------------------------------------------
// int8: the documented bound, round-to-nearest, and the documented NaN / inf / zero handling.

float finite_absmax(const std::vector<float>& row) {
  float absmax = 0;
  for (const float x : row)
    if (std::isfinite(x)) absmax = std::max(absmax, std::abs(x));
  return absmax;
}

struct Int8Row {
  float scale;
  std::vector<std::int8_t> codes;
  std::vector<float> dequantized;
};

Int8Row int8_round_trip(const std::vector<float>& row) {
  Int8Row result{int8_row_scale(row), std::vector<std::int8_t>(row.size()),
                 std::vector<float>(row.size())};
  quantize_int8_row(row, result.scale, result.codes);
  dequantize_int8_row(result.codes, result.scale, result.dequantized);
  return result;
}

// The bound int8.hpp documents, for finite elements; returns the largest error / scale seen.
double expect_int8_bound(const std::vector<float>& row) {
  const Int8Row q = int8_round_trip(row);
  const float absmax = finite_absmax(row);
  const int top = *std::max_element(q.codes.begin(), q.codes.end(), [](auto a, auto b) { return std::abs(a) < std::abs(b); });
  EXPECT_LE(static_cast<float>(std::abs(top)) * q.scale, absmax);  // as float: dequantized values stay in the row's range
  if (absmax / 127 >= std::numeric_limits<float>::min()) {  // absmax / top for a top in [112, 127]
    EXPECT_GE(q.scale, absmax / 127.0 * (1 - 0x1p-22));
    EXPECT_LE(q.scale, absmax / 112.0);
  }
  const double bound = q.scale / 2.0 + absmax * 0x1p-22 + 0x1p-141;
  double worst = 0;
  for (std::size_t i = 0; i < row.size(); ++i) {
    if (!std::isfinite(row[i])) continue;
    const double error = std::abs(static_cast<double>(row[i]) - q.dequantized[i]);
    EXPECT_LE(error, bound) << "x = " << row[i] << ", scale " << q.scale << ", code "
                            << int{q.codes[i]};
    EXPECT_LE(error, absmax / 224.0 + absmax * 0x1p-22 + 0x1p-141);  // the bound int8.hpp documents
    EXPECT_TRUE(std::isfinite(q.dequantized[i]));
    EXPECT_GE(q.codes[i], -127);
    if (q.scale > 0) {
      // Round to nearest, not just within the bound: the code is within half a step of x.
      const double steps = static_cast<double>(row[i]) / q.scale;
      EXPECT_LE(std::abs(std::clamp(steps, -127.0, 127.0) - q.codes[i]), 0.5 + 1e-5)
          << "x = " << row[i];
      worst = std::max(worst, error / q.scale);
    }
  }
  return worst;
}

TEST(Int8, ErrorBoundOnRandomRowsAcrossMagnitudes) {
  std::mt19937 rng(1);
  double worst = 0;
  for (int magnitude = -45; magnitude <= 38; ++magnitude) {
    std::uniform_real_distribution<double> uniform(-1, 1);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> row(128);
      for (float& x : row) x = static_cast<float>(uniform(rng) * std::pow(10.0, magnitude));
      worst = std::max(worst, expect_int8_bound(row));
    }
  }
  EXPECT_GT(worst, 0.45);  // the bound is nearly reached: a real test, not a vacuous one
}

TEST(Int8, ExtremeRows) {
  expect_int8_bound({flt_max, -flt_max, 1.0f, 1e38f, -3e37f});
  expect_int8_bound({1e-40f, -3e-42f, denorm_min, 0.0f});  // subnormal scale
  expect_int8_bound({denorm_min, -denorm_min});            // scale rounds to 0
  expect_int8_bound({std::numeric_limits<float>::min(), 1e-30f});

  const Int8Row huge = int8_round_trip({flt_max, -flt_max, 0.0f});
  EXPECT_EQ(huge.codes, (std::vector<std::int8_t>{127, -127, 0}));
  EXPECT_LE(huge.dequantized[0], flt_max);  // not inf
  EXPECT_EQ(huge.dequantized[1], -huge.dequantized[0]);

  const Int8Row zeros = int8_round_trip(std::vector<float>(64, 0.0f));
  EXPECT_EQ(zeros.scale, 0.0f);
  EXPECT_EQ(zeros.codes, std::vector<std::int8_t>(64, 0));
  EXPECT_EQ(zeros.dequantized, std::vector<float>(64, 0.0f));
}

TEST(Int8, RoundsToNearestEvenAndClamps) {
  const std::vector<float> row{2.5f, 3.5f, -2.5f, 0.5f, 126.5f, 127.4f, 1000.0f, -1000.0f, 0.7f};
  std::vector<std::int8_t> codes(row.size());
  quantize_int8_row(row, 1.0f, codes);
  EXPECT_EQ(codes, (std::vector<std::int8_t>{2, 4, -2, 0, 126, 127, 127, -127, 1}));
}

TEST(Int8, NanIsZeroAndInfSaturates) {
  const std::vector<float> clean{1.0f, -4.0f, 0.0f, 2.0f, 0.0f};
  const Int8Row reference = int8_round_trip(clean);
  const Int8Row with_nan = int8_round_trip({1.0f, -4.0f, nan, 2.0f, 0.0f});
  EXPECT_EQ(with_nan.scale, reference.scale);
  EXPECT_EQ(with_nan.codes, reference.codes);

  const Int8Row with_inf = int8_round_trip({1.0f, -4.0f, inf, 3.0f, -inf});
  // inf neither widens the scale nor joins the search: the plain absmax / 127, so inf is +-absmax.
  EXPECT_EQ(with_inf.scale, detail::int8_scale_for_top(4.0f, int8_max_code));
  EXPECT_EQ(with_inf.codes, (std::vector<std::int8_t>{32, -127, 127, 95, -127}));

  const Int8Row only_specials = int8_round_trip({nan, inf, -inf});
  EXPECT_EQ(only_specials.scale, 0.0f);
  EXPECT_EQ(only_specials.codes, (std::vector<std::int8_t>{0, 0, 0}));
}

TEST(Int8, BrokenPreconditionsAreCaught) {
  const std::vector<float> row(4, 1.0f);
  std::vector<std::int8_t> short_codes(3);
  std::vector<std::int8_t> codes(4);
  std::vector<float> out(5);
  EXPECT_THROW(quantize_int8_row(row, 1.0f, short_codes), std::logic_error);
  EXPECT_THROW(quantize_int8_row(row, -1.0f, codes), std::logic_error);
  EXPECT_THROW(quantize_int8_row(row, nan, codes), std::logic_error);
  EXPECT_THROW(quantize_int8_row(row, inf, codes), std::logic_error);
  EXPECT_THROW(dequantize_int8_row(codes, 1.0f, out), std::logic_error);
}

// ---------------------------------------------------------------------------------------------
// int4: packing, the documented bound, and the documented NaN / inf / constant handling.

struct Int4Group {
  Int4Params params;
  std::vector<std::uint8_t> packed;
  std::vector<float> dequantized;
};

Int4Group int4_round_trip(const std::vector<float>& group) {
  Int4Group result{int4_group_params(group),
                   std::vector<std::uint8_t>(int4_packed_bytes(group.size())),
                   std::vector<float>(group.size())};
  quantize_int4_group(group, result.params, result.packed);
  dequantize_int4_group(result.packed, result.params, result.dequantized);
  return result;
}

int nibble(const std::vector<std::uint8_t>& packed, std::size_t i) {
  return (packed[i / 2] >> (4 * (i % 2))) & 0xF;
}

// The bound int4.hpp documents, for finite elements within the value limit; returns the
// largest error / scale seen.
double expect_int4_bound(const std::vector<float>& group) {
  const Int4Group q = int4_round_trip(group);
  float low = inf;
  float high = -inf;
  for (const float x : group)
    if (std::isfinite(x)) {
      low = std::min(low, std::clamp(x, -int4_value_limit, int4_value_limit));
      high = std::max(high, std::clamp(x, -int4_value_limit, int4_value_limit));
    }
  EXPECT_EQ(q.params.minimum, low);
  const double range = static_cast<double>(high) - low;
  if (range / 15 >= std::numeric_limits<float>::min()) {
    EXPECT_NEAR(15.0 * q.params.scale, range, range * 0x1p-20);
  }
  const double bound =
      q.params.scale / 2.0 + (std::abs(double{low}) + std::abs(double{high})) * 0x1p-21 + 0x1p-140;
  double worst = 0;
  for (std::size_t i = 0; i < group.size(); ++i) {
    EXPECT_GE(q.dequantized[i], low);  // never outside the group's range, never inf
    EXPECT_LE(q.dequantized[i], high);
    if (!std::isfinite(group[i]) || std::abs(group[i]) > int4_value_limit) continue;
    const double error = std::abs(static_cast<double>(group[i]) - q.dequantized[i]);
    EXPECT_LE(error, bound) << "x = " << group[i] << ", scale " << q.params.scale
                            << ", minimum " << q.params.minimum << ", code " << nibble(q.packed, i);
    if (q.params.scale > 0) {
      const double steps = (static_cast<double>(group[i]) - low) / q.params.scale;
      EXPECT_LE(std::abs(std::min(steps, 15.0) - nibble(q.packed, i)), 0.5 + 1e-5)
          << "x = " << group[i];
      worst = std::max(worst, error / q.params.scale);
    }
  }
  if (group.size() % 2 == 1) {
    EXPECT_EQ(q.packed.back() >> 4, 0) << "unused nibble not 0";
  }
  return worst;
}

TEST(Int4, PacksTheEvenElementInTheLowNibble) {
  std::vector<float> ramp(16);
  for (int i = 0; i < 16; ++i) ramp[i] = static_cast<float>(i);
  const Int4Group q = int4_round_trip(ramp);
  EXPECT_EQ(q.params, (Int4Params{1.0f, 0.0f}));
  for (int i = 0; i < 8; ++i) EXPECT_EQ(q.packed[i], (2 * i) | (2 * i + 1) << 4) << "byte " << i;
  EXPECT_EQ(q.dequantized, ramp);

  const Int4Group odd = int4_round_trip({0.0f, 15.0f, 7.0f});
  EXPECT_EQ(odd.packed, (std::vector<std::uint8_t>{0xF0, 0x07}));
  EXPECT_EQ(odd.dequantized, (std::vector<float>{0.0f, 15.0f, 7.0f}));
}

TEST(Int4, ErrorBoundOnRandomGroupsAcrossMagnitudesAndOffsets) {
  std::mt19937 rng(4);
  double worst = 0;
  for (int magnitude = -45; magnitude <= 37; ++magnitude) {
    std::uniform_real_distribution<double> uniform(-1, 1);
    for (const double offset : {0.0, 0.5, -3.0, 40.0}) {  // off-centre groups: asymmetry matters
      if ((std::abs(offset) + 1) * std::pow(10.0, magnitude) > int4_value_limit) continue;
      for (const std::size_t size : {32u, 33u, 128u}) {
        std::vector<float> group(size);
        for (float& x : group)
          x = static_cast<float>((uniform(rng) + offset) * std::pow(10.0, magnitude));
        worst = std::max(worst, expect_int4_bound(group));
      }
    }
  }
  EXPECT_GT(worst, 0.45);
}

TEST(Int4, ExtremeGroups) {
  expect_int4_bound({int4_value_limit, -int4_value_limit, 0.0f, 1e38f});
  expect_int4_bound({1e-40f, -3e-42f, denorm_min, 0.0f});  // subnormal scale
  expect_int4_bound({denorm_min, 0.0f});                   // scale rounds to 0
  expect_int4_bound({1e8f, 1e8f + 8.0f, 1e8f + 16.0f});    // range of a few ulps of the values

  // Beyond the value limit, elements clamp to it: finite, and the rest keep the bound.
  const Int4Group huge = int4_round_trip({flt_max, -flt_max, 0.0f});
  EXPECT_EQ(huge.params.minimum, -int4_value_limit);
  EXPECT_LE(huge.dequantized[0], int4_value_limit);
  EXPECT_GE(huge.dequantized[0], int4_value_limit * (1 - 0x1p-20));
  EXPECT_EQ(huge.dequantized[1], -int4_value_limit);
  EXPECT_LE(std::abs(huge.dequantized[2]), huge.params.scale / 2 + int4_value_limit * 0x1p-20);

  const Int4Group constant = int4_round_trip(std::vector<float>(8, -3.25f));
  EXPECT_EQ(constant.params, (Int4Params{0.0f, -3.25f}));
  EXPECT_EQ(constant.packed, std::vector<std::uint8_t>(4, 0));
  EXPECT_EQ(constant.dequantized, std::vector<float>(8, -3.25f));
}

TEST(Int4, NanIsZeroAndInfSaturates) {
  // NaN reads as 0, which here widens the range down to 0.
  const Int4Group with_nan = int4_round_trip({5.0f, nan, 20.0f, 10.0f});
  const Int4Group zero = int4_round_trip({5.0f, 0.0f, 20.0f, 10.0f});
  EXPECT_EQ(with_nan.params, zero.params);
  EXPECT_EQ(with_nan.packed, zero.packed);
  EXPECT_EQ(with_nan.params.minimum, 0.0f);

  // inf does not widen the range and takes the extreme code of its sign.
  const Int4Group with_inf = int4_round_trip({5.0f, inf, 20.0f, -inf});
  EXPECT_EQ(with_inf.params, int4_group_params(std::vector<float>{5.0f, 20.0f}));
  EXPECT_EQ(nibble(with_inf.packed, 1), 15);
  EXPECT_EQ(nibble(with_inf.packed, 3), 0);

  EXPECT_EQ(int4_group_params(std::vector<float>{inf, -inf}), (Int4Params{0.0f, 0.0f}));
  EXPECT_EQ(int4_group_params(std::vector<float>{nan, nan}), (Int4Params{0.0f, 0.0f}));
}

TEST(Int4, ForeignParamsSaturate) {
  const std::vector<float> group{-100.0f, 0.0f, 7.4f, 100.0f};
  std::vector<std::uint8_t> packed(2);
  quantize_int4_group(group, Int4Params{1.0f, 0.0f}, packed);
  EXPECT_EQ(packed, (std::vector<std::uint8_t>{0x00, 0xF7}));
  quantize_int4_group(group, Int4Params{1.0f, -flt_max}, packed);  // x - minimum overflows
  EXPECT_EQ(packed, (std::vector<std::uint8_t>{0xFF, 0xFF}));
}

TEST(Int4, BrokenPreconditionsAreCaught) {
  const std::vector<float> group(4, 1.0f);
  std::vector<std::uint8_t> short_packed(1);
  std::vector<std::uint8_t> packed(2);
  std::vector<float> out(5);
  EXPECT_THROW(quantize_int4_group(group, {1.0f, 0.0f}, short_packed), std::logic_error);
  EXPECT_THROW(quantize_int4_group(group, {-1.0f, 0.0f}, packed), std::logic_error);
  EXPECT_THROW(quantize_int4_group(group, {nan, 0.0f}, packed), std::logic_error);
  EXPECT_THROW(quantize_int4_group(group, {1.0f, inf}, packed), std::logic_error);
  EXPECT_THROW(dequantize_int4_group(packed, {1.0f, 0.0f}, out), std::logic_error);  // needs 3
}

// The fp8 cache elements: one scale per row, the documented per-element bound on random rows
// across magnitudes, and the non-finite rules (NaN stored as 0, inf saturated to the absmax).
template <class Element>
void check_fp8_rows(double relative, double absolute_of_absmax) {
  std::mt19937 rng(77);
  std::vector<typename Element::storage_type> codes(128);
  double worst = 0.0;
  for (int trial = 0; trial < 2000; ++trial) {
    const float magnitude = std::ldexp(1.0f, std::uniform_int_distribution<int>(-60, 60)(rng));
    std::normal_distribution<float> normal(0.0f, magnitude);
    std::vector<float> row(128);
    for (float& x : row) x = normal(rng) * (std::uniform_int_distribution<int>(0, 9)(rng) == 0 ? 1e-6f : 1.0f);
    const float scale = Element::row_scale(row);
    Element::quantize_row(row, scale, codes.data());
    float absmax = 0.0f;
    for (float x : row) absmax = std::max(absmax, std::abs(x));
    for (std::size_t i = 0; i < row.size(); ++i) {
      const double stored = static_cast<double>(Element::decode(codes[i])) * scale;
      const double bound = std::max(std::abs(row[i]) * relative, absmax * absolute_of_absmax) * (1 + 1e-6);
      const double error = std::abs(stored - row[i]);
      ASSERT_LE(error, bound) << Element::name << " x = " << row[i] << " absmax " << absmax;
      worst = std::max(worst, error / std::max(std::abs(static_cast<double>(row[i])), 1e-300));
    }
  }
  EXPECT_GT(worst, relative * 0.5) << "the bound is far from tight: is the test still testing?";
}

TEST(Fp8Element, RowErrorWithinTheDocumentedBound) {
  check_fp8_rows<fp8_e4m3>(std::ldexp(1.0, -4), std::ldexp(1.0, -17));
  check_fp8_rows<fp8_e5m2>(std::ldexp(1.0, -3), std::ldexp(1.0, -31));
}

TEST(Fp8Element, NonFiniteInputsNeverStoreNonFiniteCodes) {
  const std::vector<float> row{1.0f, -2.0f, nan, inf, -inf, 0.0f};
  std::vector<fp8_e4m3_code> codes(row.size());
  const float scale = fp8_e4m3::row_scale(row);
  EXPECT_EQ(scale, 2.0f / 448.0f);
  fp8_e4m3::quantize_row(row, scale, codes.data());
  std::vector<float> stored;
  for (auto code : codes) stored.push_back(fp8_e4m3::decode(code) * scale);
  EXPECT_EQ(stored, (std::vector<float>{1.0f, -2.0f, 0.0f, 2.0f, -2.0f, 0.0f}));
  const std::vector<float> zeros(8, 0.0f);
  EXPECT_EQ(fp8_e5m2::row_scale(zeros), 0.0f);
  std::vector<fp8_e5m2_code> zero_codes(8, fp8_e5m2_code{0x55});
  fp8_e5m2::quantize_row(zeros, 0.0f, zero_codes.data());
  for (auto code : zero_codes) EXPECT_EQ(fp8_e5m2::decode(code), 0.0f);
}

TEST(Int8Element, IsTheInt8RowCodec) {
  static_assert(QuantizedElement<int8> && QuantizedElement<fp8_e4m3> && QuantizedElement<fp8_e5m2>);
  static_assert(!FloatElement<int8> && CacheElement<int8> && CacheElement<f16>);
  const std::vector<float> row{0.5f, -1.27f, 0.0f, 1.0f};
  std::vector<std::int8_t> codes(4);
  int8::quantize_row(row, int8::row_scale(row), codes.data());
  EXPECT_EQ(codes, (std::vector<std::int8_t>{50, -127, 0, 100}));
}

// ---------------------------------------------------------------------------------------------
// The scale search (dtype/scale_search.hpp): of the candidate scales each type documents, the row
// gets one whose round trip loses least, and over many rows clearly less than the absmax scale.

template <class Element>
double round_trip_squared_error(const std::vector<float>& row, float scale) {
  std::vector<typename Element::storage_type> codes(row.size());
  Element::quantize_row(row, scale, codes.data());
  double error = 0;
  for (std::size_t i = 0; i < row.size(); ++i) {
    const double miss = static_cast<double>(Element::decode(codes[i])) * scale - row[i];
    error += miss * miss;
  }
  return error;
}

// Returns the mean, over random rows of `elements` values, of the chosen scale's squared error
// over the plain absmax scale's, after checking that no candidate beats the chosen one.
template <class Element>
double check_scale_search(int elements, const std::vector<float>& candidate_over_plain, float plain_over_absmax) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  double chosen_total = 0, plain_total = 0;
  for (int trial = 0; trial < 400; ++trial) {
    std::vector<float> row(static_cast<std::size_t>(elements));
    for (std::size_t i = 0; i < row.size(); ++i) row[i] = normal(rng) * (i % 4 == 1 ? 4.0f : 1.0f);  // an outlier channel
    float absmax = 0;
    for (float x : row) absmax = std::max(absmax, std::abs(x));
    const float plain = absmax * plain_over_absmax;
    const float chosen = Element::row_scale(row);
    const double chosen_error = round_trip_squared_error<Element>(row, chosen);
    bool is_a_candidate = false;
    for (const float stretch : candidate_over_plain) {
      const float candidate = plain * stretch;
      is_a_candidate |= std::abs(chosen - candidate) <= candidate * 1e-6f;
      // The search estimates in float what this measures in double: near-ties may go either way.
      EXPECT_LE(chosen_error, round_trip_squared_error<Element>(row, candidate) * (1 + 1e-4) + 1e-12)
          << Element::name << " candidate " << stretch;
    }
    EXPECT_TRUE(is_a_candidate) << Element::name << " chose " << chosen / plain << " times the absmax scale";
    // The CUDA append kernel weighs each candidate in a thread of its own, with candidate_error:
    // it must choose exactly what row_scale (a SIMD register of candidates at a time) chose.
    float errors[Element::scale_candidates];
    for (int k = 0; k < Element::scale_candidates; ++k) errors[k] = detail::candidate_error<Element>(row, 1.0f / absmax, k);
    EXPECT_EQ(chosen, Element::candidate_scale(absmax, detail::least(errors))) << Element::name;
    chosen_total += chosen_error;
    plain_total += round_trip_squared_error<Element>(row, plain);
  }
  return chosen_total / plain_total;
}

TEST(ScaleSearch, EachRowGetsTheCandidateThatLosesLeast) {
  std::vector<float> int8_candidates, fp8_candidates;
  for (int top = int8_max_code; top > int8_max_code - int8_scale_candidates; --top)
    int8_candidates.push_back(static_cast<float>(int8_max_code) / static_cast<float>(top));
  for (int k = 0; k < fp8_e4m3::scale_candidates; ++k)
    fp8_candidates.push_back(1.0f + static_cast<float>(k) / fp8_e4m3::scale_candidates);

  // The ratios README and scale_search.hpp quote, with some room: the search must pay off.
  EXPECT_LT(check_scale_search<int8>(8, int8_candidates, 1.0f / 127), 0.7);
  EXPECT_LT(check_scale_search<int8>(128, int8_candidates, 1.0f / 127), 0.98);
  EXPECT_LT(check_scale_search<fp8_e4m3>(8, fp8_candidates, 1.0f / 448), 0.5);
  EXPECT_LT(check_scale_search<fp8_e4m3>(128, fp8_candidates, 1.0f / 448), 0.8);
  EXPECT_LT(check_scale_search<fp8_e5m2>(8, fp8_candidates, 1.0f / 57344), 0.5);
}

// The int4 cache element: keys per channel over a group of 32 rows, values per row, each
// element within its own group's scale / 2; zeros, constants, NaN and inf as int4.hpp says.
TEST(Int4Element, KeysPerChannelValuesPerRowWithinTheirBounds) {
  static_assert(GroupQuantizedElement<int4> && CacheElement<int4> && !QuantizedElement<int4>);
  constexpr int group = int4_group_tokens, head_dim = 8;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> rows(group * head_dim);
  for (int r = 0; r < group; ++r)
    for (int d = 0; d < head_dim; ++d)  // channel d: offset d, spread 10^(d - 4); channel 0 all zero
      rows[r * head_dim + d] = d == 0 ? 0.0f : static_cast<float>(d) + normal(rng) * std::pow(10.0f, static_cast<float>(d - 4));
  for (int r = 0; r < group; ++r) rows[r * head_dim + 1] = 2.5f;  // a constant channel
  rows[5 * head_dim + 2] = nan;   // read as 0: the channel's range reaches down to 0
  rows[6 * head_dim + 3] = inf;   // saturates at the channel's maximum
  rows[7 * head_dim + 3] = -inf;  // and its minimum
  std::vector<float> params(2 * head_dim);
  std::vector<int4x2> codes(group * head_dim / 2);
  quantize_int4_keys(rows.data(), head_dim, params.data(), codes.data());
  for (int d = 0; d < head_dim; ++d) {
    float low = inf, high = -inf;
    for (int r = 0; r < group; ++r) {
      const float x = std::isnan(rows[r * head_dim + d]) ? 0.0f : rows[r * head_dim + d];
      if (std::isfinite(x)) low = std::min(low, x), high = std::max(high, x);
    }
    const float scale = params[d], minimum = params[head_dim + d];
    EXPECT_EQ(minimum, low) << "channel " << d;
    EXPECT_NEAR(scale, (high - low) / 15, 1e-6 * (high - low)) << "channel " << d;
    for (int r = 0; r < group; ++r) {
      const float x = rows[r * head_dim + d];
      const float stored = minimum + int4_key_code_at(codes.data(), r, d) * scale;
      if (std::isinf(x)) EXPECT_EQ(stored, x > 0 ? minimum + 15 * scale : minimum);
      else EXPECT_LE(std::abs((std::isnan(x) ? 0.0f : x) - stored), scale / 2 * (1 + 1e-5) + 1e-30f) << "channel " << d << ", row " << r;
    }
  }
  EXPECT_EQ(params[0], 0.0f);  // zeros and constants: scale 0, stored exactly
  EXPECT_EQ(params[1], 0.0f);
  EXPECT_EQ(params[head_dim + 1], 2.5f);

  const std::vector<float> row{-3.0f, 1.0f, 0.5f, nan, 12.0f, 0.0f, -inf, 7.0f};
  std::vector<float> row_params(2);
  std::vector<int4x2> row_codes(4);
  quantize_int4_values(row.data(), head_dim, row_params.data(), row_codes.data());
  EXPECT_EQ(row_params[1], -3.0f);
  EXPECT_EQ(row_params[0], 1.0f);  // (12 - -3) / 15
  // 0.5 is 3.5 steps above the minimum, a tie, rounded to the even 4; NaN is 0, -inf the minimum.
  const std::vector<float> expected{-3.0f, 1.0f, 1.0f, 0.0f, 12.0f, 0.0f, -3.0f, 7.0f};
  for (int d = 0; d < head_dim; ++d)
    EXPECT_EQ(row_params[1] + int4_code_at(row_codes.data(), d) * row_params[0], expected[static_cast<std::size_t>(d)]) << d;
  EXPECT_EQ(int4::token_bytes(128), 168u);
}

}  // namespace
}  // namespace kvcache
