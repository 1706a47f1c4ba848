// Choosing a row's scale by the rounding it causes, not by its absmax alone.
//
// Scaling a row so that its largest element lands on the largest code (absmax scaling) fixes
// where every other element falls between codes by chance. Of a handful of slightly different
// scales, one usually rounds the whole row closer: on random normal rows of 8 elements (every
// fourth 4x larger, as tests/dtype/quant_test.cpp draws them) the best of int8's 16 candidates
// has 0.54 of the absmax scale's squared error, the best of fp8_e4m3's 32 has 0.4 (0.94 and
// 0.69 at 128 elements: fp8's relative grid rewards the search even in long rows, whose few
// large elements carry most of the error). On stories260K's keys (head_dim 8,
// examples/kv_accuracy) it halves int8's mean KLD and fp8_e4m3's.
//
// An element type that searches declares (int8.hpp, fp8.hpp):
//   scale_candidates             how many scales it weighs; candidate 0 is the absmax scale
//   search_gain(k)               candidate k codes x as x / absmax * search_gain(k) ...
//   nearest_code(y)              ... rounded to the type's grid by this (a float, and on SIMD
//                                hosts a search_simd::floats lane by lane)
//   candidate_scale(absmax, k)   the scale candidate k stores
//   min_searched_absmax, max_searched_absmax: rows outside, and rows holding inf, get candidate 0
//
// The search runs once per appended row, outside attention. On AVX-512 and AVX2 hosts the
// candidates are SIMD lanes (a multiply, a rounding and a multiply-add per element and register
// of candidates): the whole row_scale takes about 0.3 us per int8 row of 128 on the Xeon of
// README.md and 0.6 us for fp8's 32 candidates, where a portable build's plain loop takes 3.2
// and 2.4 us. The CUDA append kernel gives each candidate a thread. Every path accumulates each
// candidate's error in the same order with the same fused multiply-adds, so CPU and GPU store
// the same codes (unless nvcc's --use_fast_math approximates the device's divisions).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <span>

#include "../config.hpp"
#include "concept.hpp"

// The search's SIMD width on this host: 16 lanes with AVX-512, 8 with AVX2 and FMA, else none.
#if !defined(__CUDA_ARCH__) && defined(__AVX512F__)
#include <immintrin.h>
#define KVCACHE_SCALE_SEARCH_LANES 16
#elif !defined(__CUDA_ARCH__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVCACHE_SCALE_SEARCH_LANES 8
#else
#define KVCACHE_SCALE_SEARCH_LANES 0
#endif

KVCACHE_BEGIN_NAMESPACE

template <class T>
concept ScaleSearchingElement = requires(std::span<const float> row, float value, int k) {
  { T::scale_candidates } -> std::convertible_to<int>;
  { T::search_gain(k) } -> std::same_as<float>;
  { T::nearest_code(value) } -> std::same_as<float>;
  { T::candidate_scale(value, k) } -> std::same_as<float>;
  { T::min_searched_absmax } -> std::convertible_to<float>;
  { T::max_searched_absmax } -> std::convertible_to<float>;
};

namespace detail {

#if KVCACHE_SCALE_SEARCH_LANES
// The few lane operations the search needs, a candidate per lane.
namespace search_simd {
inline constexpr int width = KVCACHE_SCALE_SEARCH_LANES;
#if KVCACHE_SCALE_SEARCH_LANES == 16
using floats = __m512;
using ints = __m512i;
inline floats load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, floats v) { _mm512_storeu_ps(p, v); }
inline floats broadcast(float x) { return _mm512_set1_ps(x); }
inline floats zero() { return _mm512_setzero_ps(); }
inline floats mul(floats a, floats b) { return _mm512_mul_ps(a, b); }
inline floats sub(floats a, floats b) { return _mm512_sub_ps(a, b); }
inline floats div(floats a, floats b) { return _mm512_div_ps(a, b); }
inline floats fma(floats a, floats b, floats c) { return _mm512_fmadd_ps(a, b, c); }
inline floats nearest_integer(floats v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline ints bits(floats v) { return _mm512_castps_si512(v); }
inline floats from_bits(ints v) { return _mm512_castsi512_ps(v); }
inline ints splat(std::uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline ints add(ints a, ints b) { return _mm512_add_epi32(a, b); }
inline ints bit_and(ints a, ints b) { return _mm512_and_si512(a, b); }
template <int Count>
inline ints shift_right(ints a) { return _mm512_srli_epi32(a, Count); }
#else
using floats = __m256;
using ints = __m256i;
inline floats load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, floats v) { _mm256_storeu_ps(p, v); }
inline floats broadcast(float x) { return _mm256_set1_ps(x); }
inline floats zero() { return _mm256_setzero_ps(); }
inline floats mul(floats a, floats b) { return _mm256_mul_ps(a, b); }
inline floats sub(floats a, floats b) { return _mm256_sub_ps(a, b); }
inline floats div(floats a, floats b) { return _mm256_div_ps(a, b); }
inline floats fma(floats a, floats b, floats c) { return _mm256_fmadd_ps(a, b, c); }
inline floats nearest_integer(floats v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline ints bits(floats v) { return _mm256_castps_si256(v); }
inline floats from_bits(ints v) { return _mm256_castsi256_ps(v); }
inline ints splat(std::uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline ints add(ints a, ints b) { return _mm256_add_epi32(a, b); }
inline ints bit_and(ints a, ints b) { return _mm256_and_si256(a, b); }
template <int Count>
inline ints shift_right(ints a) { return _mm256_srli_epi32(a, Count); }
#endif

// fp8_codec::round_significand, lane by lane.
template <int MantissaBits>
inline floats round_significand(floats v) {
  constexpr int dropped = 23 - MantissaBits;
  const ints odd = bit_and(shift_right<dropped>(bits(v)), splat(1));
  const ints half = add(splat((std::uint32_t{1} << (dropped - 1)) - 1), odd);
  return from_bits(bit_and(add(bits(v), half), splat(~((std::uint32_t{1} << dropped) - 1))));
}
}  // namespace search_simd
#endif

// a * b + c rounded once, as the SIMD search's multiply-adds do.
KVCACHE_HOST_DEVICE float fused_multiply_add(float a, float b, float c) noexcept {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#elif defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  // No FMA instruction (x86-64 before v3), where std::fma is a library call. The product is
  // exact in double, so this rounds as a fused multiply-add but in double rounding's rare cases
  // (about 2^-29 of operations).
  return static_cast<float>(static_cast<double>(a) * b + c);
#endif
}

// a * b rounded on its own: nvcc would fuse it into the subtraction after it.
KVCACHE_HOST_DEVICE float multiply(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // host compilers fuse a product only into its single use, and y has two
#endif
}

// Whether the row holds +-inf.
KVCACHE_HOST_DEVICE constexpr bool has_infinity(std::span<const float> row) noexcept {
  bool found = false;  // no early exit: a branch-free loop vectorizes
  for (const float x : row) found |= (std::bit_cast<std::uint32_t>(x) & 0x7FFFFFFFu) == 0x7F800000u;
  return found;
}

// Whether a row whose finite elements reach `absmax` weighs T's candidates at all. Rows holding
// inf keep the absmax scale, so that inf saturates to +-absmax as each element type documents.
template <ScaleSearchingElement T>
KVCACHE_HOST_DEVICE bool searches_scale(std::span<const float> row, float absmax) noexcept {
  return absmax >= T::min_searched_absmax && absmax <= T::max_searched_absmax && !has_infinity(row);
}

// error + (y - nearest_code(y))^2 for y = relative * gain: one element's part of a candidate's loss.
template <ScaleSearchingElement T>
KVCACHE_HOST_DEVICE float add_rounding_error(float relative, float gain, float error) noexcept {
  const float y = multiply(relative, gain);
  const float miss = y - T::nearest_code(y);
  return fused_multiply_add(miss, miss, error);
}

// Candidate k's loss on the row: the sum of (y - nearest_code(y))^2 over y = x / absmax * gain
// (NaN elements skipped: they are stored as 0, which every scale codes exactly), over gain^2.
template <ScaleSearchingElement T>
KVCACHE_HOST_DEVICE float candidate_error(std::span<const float> row, float inverse_absmax, int k) noexcept {
  const float gain = T::search_gain(k);
  float error = 0.0f;
  for (const float x : row)
    if (is_finite(x)) error = add_rounding_error<T>(x * inverse_absmax, gain, error);
  return error / (gain * gain);
}

// The index of the least error, the first of equals.
template <int Count>
KVCACHE_HOST_DEVICE int least(const float (&errors)[Count]) noexcept {
  int best = 0;
  for (int k = 1; k < Count; ++k)
    if (errors[k] < errors[best]) best = k;
  return best;
}

// T's row scale: the candidate whose rounding loses least, or candidate 0 where searches_scale
// says no.
template <ScaleSearchingElement T>
KVCACHE_HOST_DEVICE float searched_row_scale(std::span<const float> row) noexcept {
  const float absmax = finite_absmax(row);
  if (!searches_scale<T>(row, absmax)) return T::candidate_scale(absmax, 0);
  const float inverse_absmax = 1.0f / absmax;
  float errors[T::scale_candidates];
#if KVCACHE_SCALE_SEARCH_LANES
  if constexpr (T::scale_candidates % search_simd::width == 0) {  // the loop below, a register of candidates at once
    namespace simd = search_simd;
    constexpr int vectors = T::scale_candidates / simd::width;
    simd::floats gains[vectors], sums[vectors];
    for (int k = 0; k < T::scale_candidates; ++k) errors[k] = T::search_gain(k);
    for (int v = 0; v < vectors; ++v) gains[v] = simd::load(errors + simd::width * v), sums[v] = simd::zero();
    for (const float x : row) {
      if (!is_finite(x)) continue;
      const simd::floats relative = simd::broadcast(x * inverse_absmax);
      for (int v = 0; v < vectors; ++v) {
        const simd::floats y = simd::mul(relative, gains[v]);
        const simd::floats miss = simd::sub(y, T::nearest_code(y));
        sums[v] = simd::fma(miss, miss, sums[v]);
      }
    }
    for (int v = 0; v < vectors; ++v)
      simd::store(errors + simd::width * v, simd::div(sums[v], simd::mul(gains[v], gains[v])));
  } else
#endif
  {
    for (int k = 0; k < T::scale_candidates; ++k) errors[k] = 0.0f;
    for (const float x : row) {  // candidate_error, all candidates at once: independent sums
      if (!is_finite(x)) continue;
      for (int k = 0; k < T::scale_candidates; ++k)
        errors[k] = add_rounding_error<T>(x * inverse_absmax, T::search_gain(k), errors[k]);
    }
    for (int k = 0; k < T::scale_candidates; ++k) errors[k] /= T::search_gain(k) * T::search_gain(k);
  }
  return T::candidate_scale(absmax, least(errors));
}

}  // namespace detail
KVCACHE_END_NAMESPACE
