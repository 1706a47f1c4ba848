// Hadamard rotation for quantized K/V: rows are multiplied by the orthonormal Walsh-Hadamard
// matrix H (H = H^T = H^-1) before quantization.
//
// Quantization error grows with a row's largest element, and K rows have outlier channels.
// Rotating spreads every channel over all the others, so a row's absmax comes close to its
// typical magnitude and the same bits carry more precision. Attention needs no un-rotation of
// K: q.k = (Hq).(Hk), so the kernel rotates q once per call. V is un-rotated after the
// weighted sum, sum p_i v_i = H^T sum p_i (H v_i), once per output row. Results are unchanged
// up to quantization error and float rounding. head_dim must be a power of two.
#pragma once

#include <cmath>

#include "../config.hpp"
#include "concept.hpp"
#include "fp8.hpp"
#include "int4.hpp"
#include "int8.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace detail {

// x <- H x for the orthonormal Hadamard matrix of order n (a power of two), in place.
inline void hadamard_transform(float* x, int n) {
  for (int half = 1; half < n; half *= 2)
    for (int block = 0; block < n; block += 2 * half)
      for (int i = block; i < block + half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a + b;
        x[i + half] = a - b;
      }
  const float normalize = 1.0f / std::sqrt(static_cast<float>(n));
  for (int i = 0; i < n; ++i) x[i] *= normalize;
}

}  // namespace detail

// Element type E with every K and V row rotated by H before it is quantized.
template <class E, const char* Name>
  requires QuantizedElement<E> || GroupQuantizedElement<E>
struct hadamard_rotated : E {
  static constexpr const char* name = Name;
  static constexpr bool hadamard = true;
};

// Whether an element type stores rows rotated by H.
template <class T>
inline constexpr bool is_hadamard_rotated = requires { requires T::hadamard; };

namespace detail {
inline constexpr char int8_hadamard_name[] = "int8_hadamard";
inline constexpr char fp8_e4m3_hadamard_name[] = "fp8_e4m3_hadamard";
inline constexpr char int4_hadamard_name[] = "int4_hadamard";
}  // namespace detail

using int8_hadamard = hadamard_rotated<int8, detail::int8_hadamard_name>;
using fp8_e4m3_hadamard = hadamard_rotated<fp8_e4m3, detail::fp8_e4m3_hadamard_name>;
// int4 with rotated rows: channel outliers spread over the row before the per-channel groups
// see them (the residual rows are kept rotated too).
using int4_hadamard = hadamard_rotated<int4, detail::int4_hadamard_name>;

KVCACHE_END_NAMESPACE
