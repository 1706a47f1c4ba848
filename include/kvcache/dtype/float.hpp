// Floating element types f32, f16 and bf16: IEEE binary32, binary16 and bfloat16.
//
// On the host the 16-bit types are Eigen::half and Eigen::bfloat16, so Eigen's vectorized
// conversions apply. Conversion from float rounds to nearest even; overflow gives +-inf for f16
// and is exact in range for bf16, NaN stays NaN.
#pragma once

#include <Eigen/Core>

#include "concept.hpp"

KVCACHE_BEGIN_NAMESPACE

struct f32 {
  using storage_type = float;
  static constexpr std::string_view name = "f32";
  static constexpr int bits = 32;
  static constexpr int scale_bits = 0;
  KVCACHE_HOST_DEVICE static float to_float(float stored) { return stored; }
  KVCACHE_HOST_DEVICE static float from_float(float value) { return value; }
};

struct f16 {
  using storage_type = Eigen::half;
  static constexpr std::string_view name = "f16";
  static constexpr int bits = 16;
  static constexpr int scale_bits = 0;
  KVCACHE_HOST_DEVICE static float to_float(Eigen::half stored) { return static_cast<float>(stored); }
  KVCACHE_HOST_DEVICE static Eigen::half from_float(float value) { return Eigen::half(value); }
};

struct bf16 {
  using storage_type = Eigen::bfloat16;
  static constexpr std::string_view name = "bf16";
  static constexpr int bits = 16;
  static constexpr int scale_bits = 0;
  KVCACHE_HOST_DEVICE static float to_float(Eigen::bfloat16 stored) {
    return static_cast<float>(stored);
  }
  KVCACHE_HOST_DEVICE static Eigen::bfloat16 from_float(float value) {
    return Eigen::bfloat16(value);
  }
};

static_assert(FloatElement<f32> && FloatElement<f16> && FloatElement<bf16>);

// Reads any host scalar the attention API accepts for queries and outputs as float.
KVCACHE_HOST_DEVICE float to_float(float value) { return value; }
KVCACHE_HOST_DEVICE float to_float(Eigen::half value) { return static_cast<float>(value); }
KVCACHE_HOST_DEVICE float to_float(Eigen::bfloat16 value) { return static_cast<float>(value); }

// Writes a float into any of those scalar types, rounding to nearest even.
template <class T>
KVCACHE_HOST_DEVICE T from_float(float value) {
  return static_cast<T>(value);
}

KVCACHE_END_NAMESPACE
