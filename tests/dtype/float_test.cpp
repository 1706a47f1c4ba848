#include <kvcache/dtype/float.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace kvcache {
namespace {

TEST(FloatTypes, RoundTripWithinUnitRoundoff) {
  // Relative error of one rounding to nearest: 2^-11 for f16, 2^-8 for bf16, 0 for f32.
  for (float value = 1e-3f; value < 6e4f; value *= 1.37f) {
    EXPECT_EQ(f32::to_float(f32::from_float(value)), value);
    EXPECT_LE(std::abs(f16::to_float(f16::from_float(value)) - value), value * 0x1p-11f);
    EXPECT_LE(std::abs(bf16::to_float(bf16::from_float(-value)) + value), value * 0x1p-8f);
  }
}

TEST(FloatTypes, ExtremesAreIeee) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f16::to_float(f16::from_float(70000.0f)), inf);   // f16 max is 65504
  EXPECT_EQ(f16::to_float(f16::from_float(65504.0f)), 65504.0f);
  EXPECT_EQ(bf16::to_float(bf16::from_float(1e38f)), 0x1.2cp126f);  // in range for bf16
  EXPECT_TRUE(std::isnan(f16::to_float(f16::from_float(std::nanf("")))));
  EXPECT_TRUE(std::isnan(bf16::to_float(bf16::from_float(std::nanf("")))));
  EXPECT_EQ(f16::to_float(f16::from_float(0x1p-24f)), 0x1p-24f);  // smallest f16 subnormal
}

TEST(FloatTypes, TraitsMeasuredInBits) {
  static_assert(f32::bits == 32 && f16::bits == 16 && bf16::bits == 16);
  static_assert(row_bytes<f16>(128) == 256 && row_bytes<f32>(8) == 32);
  static_assert(sizeof(f16::storage_type) == 2 && sizeof(bf16::storage_type) == 2);
}

}  // namespace
}  // namespace kvcache
