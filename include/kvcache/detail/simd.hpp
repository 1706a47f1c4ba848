// The few SIMD operations the CPU kernels need, for AVX-512 and AVX2 (+FMA, F16C), with
// f16 and bf16 converted to fp32 in registers as they are loaded. Without either instruction
// set `simd::width` is 0 and the kernels take their portable Eigen path.
#pragma once

#include <Eigen/Core>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace detail::simd {

#if defined(__AVX512F__)

inline constexpr int width = 16;  // floats per register
using floats = __m512;

inline floats load(const float* p) { return _mm512_loadu_ps(p); }
inline floats load(const Eigen::half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline floats load(const Eigen::bfloat16* p) {  // bf16 is the upper half of an fp32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store(float* p, floats v) { _mm512_storeu_ps(p, v); }
inline floats zero() { return _mm512_setzero_ps(); }
inline floats broadcast(float x) { return _mm512_set1_ps(x); }
inline floats fma(floats a, floats b, floats c) { return _mm512_fmadd_ps(a, b, c); }
inline floats add(floats a, floats b) { return _mm512_add_ps(a, b); }
inline floats mul(floats a, floats b) { return _mm512_mul_ps(a, b); }
inline float sum(floats v) { return _mm512_reduce_add_ps(v); }

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

inline constexpr int width = 8;
using floats = __m256;

inline floats load(const float* p) { return _mm256_loadu_ps(p); }
inline floats load(const Eigen::half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline floats load(const Eigen::bfloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline void store(float* p, floats v) { _mm256_storeu_ps(p, v); }
inline floats zero() { return _mm256_setzero_ps(); }
inline floats broadcast(float x) { return _mm256_set1_ps(x); }
inline floats fma(floats a, floats b, floats c) { return _mm256_fmadd_ps(a, b, c); }
inline floats add(floats a, floats b) { return _mm256_add_ps(a, b); }
inline floats mul(floats a, floats b) { return _mm256_mul_ps(a, b); }
inline float sum(floats v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

#else

inline constexpr int width = 0;

#endif

}  // namespace detail::simd

KVCACHE_END_NAMESPACE
