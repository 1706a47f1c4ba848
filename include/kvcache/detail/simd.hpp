// The few SIMD operations the CPU kernels need, for AVX-512 and AVX2 (+FMA, F16C), with
// f16, bf16, int8, fp8 and int4 codes converted to fp32 in registers as they are loaded, and,
// with AVX-512 VNNI or AVX2, int8 and int4 codes widened to 16-bit words for integer dot products.
// Without either instruction set `simd::width` is 0 and the kernels take their portable Eigen path.
#pragma once

#include <Eigen/Core>
#include <concepts>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

#include "../config.hpp"
#include "../dtype/fp8.hpp"
#include "../dtype/int4.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace detail::simd {

#if defined(__AVX512F__)

#define KVCACHE_SIMD_WIDTH 16
inline constexpr int width = 16;  // floats per register
using floats = __m512;

inline floats load(const float* p) { return _mm512_loadu_ps(p); }
inline floats load_first(const float* p, int count) {  // p[0, count), zeros after; count <= 16
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
}
inline void store_first(float* p, floats v, int count) {  // lanes [0, count) to p; count <= 16
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), v);
}
inline floats load(const Eigen::half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline floats load(const Eigen::bfloat16* p) {  // bf16 is the upper half of an fp32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline floats load(const std::int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline floats load(const fp8_e5m2_code* p) {  // E5M2 is the upper byte of an f16
  const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_cvtph_ps(_mm256_slli_epi16(bytes, 8));
}
// E4M3's exponent and mantissa moved into an f16's are the value times 2^-8, subnormals too
// (codes are never NaN in a cache: quantization stores NaN as 0). A sign-extended code shifted
// left by 7 has them in place and the sign in bits 15 and 14; bit 14 is cleared.
inline floats load(const fp8_e4m3_code* p) {
  const __m256i words = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 7);
  return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_and_si256(words, _mm256_set1_epi16(~0x4000))), _mm512_set1_ps(256.0f));
}
// Bytes b0 b1 ... as 16-bit lanes -> bytes (b0 & 15) (b0 >> 4) (b1 & 15) ...: the int4 codes in order.
inline __m128i unpack_nibbles(__m128i byte_lanes) {
  return _mm_and_si128(_mm_or_si128(byte_lanes, _mm_slli_epi16(byte_lanes, 4)), _mm_set1_epi16(0x0F0F));
}
inline floats load(const int4x2* p) {  // 16 codes from 8 bytes
  const __m128i bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(unpack_nibbles(bytes)));
}
// 64 codes from 32 bytes, in order, as four vectors: each byte's nibbles side by side (low
// first), then widened; fewer instructions per code than four loads.
inline void load_block(const int4x2* p, floats (&out)[4]) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), nibble = _mm256_set1_epi8(0x0F);
  const __m256i low = _mm256_and_si256(bytes, nibble), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
  const __m256i first = _mm256_unpacklo_epi8(low, high);  // codes 0-15 and 32-47
  const __m256i second = _mm256_unpackhi_epi8(low, high);  // codes 16-31 and 48-63
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(first)));
  out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(second)));
  out[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(first, 1)));
  out[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(second, 1)));
}
// Key codes of 16 tokens of a block of 8 channels of an int4 key group (int4_key_code_at: a
// 32-bit word per token) as floats: out[j] holds channel 8c + j of each token.
inline void load_key_block(const int4x2* p, floats (&out)[8]) {
  const __m512i x = _mm512_loadu_si512(p), nibble = _mm512_set1_epi32(0xF);
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(x, 4 * i), nibble));
    out[2 * i + 1] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(x, 16 + 4 * i), nibble));
  }
}
inline void store(float* p, floats v) { _mm512_storeu_ps(p, v); }
inline floats zero() { return _mm512_setzero_ps(); }
inline floats broadcast(float x) { return _mm512_set1_ps(x); }
inline floats fma(floats a, floats b, floats c) { return _mm512_fmadd_ps(a, b, c); }
inline floats add(floats a, floats b) { return _mm512_add_ps(a, b); }
inline floats mul(floats a, floats b) { return _mm512_mul_ps(a, b); }
inline float sum(floats v) { return _mm512_reduce_add_ps(v); }
inline floats max(floats a, floats b) { return _mm512_max_ps(a, b); }
inline float max(floats v) { return _mm512_reduce_max_ps(v); }
inline bool any_greater(floats a, floats b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
inline floats abs(floats v) { return _mm512_abs_ps(v); }
inline floats sub(floats a, floats b) { return _mm512_sub_ps(a, b); }
inline floats round(floats v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline floats times_two_to(floats y, floats n) { return _mm512_scalef_ps(y, n); }  // y * 2^n
inline floats zero_below(floats y, floats x, float limit) {  // y where x >= limit, else 0
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(limit), _CMP_GE_OQ), y);
}
inline floats first_or(floats v, int count, float fill) {  // v's lanes [0, count), fill after
  return _mm512_mask_mov_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << count) - 1), v);
}

// Lane r of the result is add-reduction of the lanes of v[r], for width vectors: a transposing
// reduction tree, 4 shuffle levels for 16 sums instead of 16 separate reductions. `add` sees
// the lanes as floats; integer lanes pass through it bit for bit.
template <class Add>
inline floats reduce_each(const floats* v, Add add) {
  floats halves[8], quarters[4], eighths[2];
  for (int i = 0; i < 8; ++i)  // 128-bit blocks 0,1 of v[i] + blocks 2,3, beside those of v[i + 8]
    halves[i] = add(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    quarters[i] = add(_mm512_shuffle_f32x4(halves[i], halves[i + 4], 0x88),
                      _mm512_shuffle_f32x4(halves[i], halves[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    eighths[i] = add(_mm512_shuffle_ps(quarters[i], quarters[i + 2], 0x44),
                     _mm512_shuffle_ps(quarters[i], quarters[i + 2], 0xEE));
  const floats sums = add(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88), _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
  // The tree leaves the sum of v[r] in lane order[r]; the order is its own inverse.
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, sums);
}
inline floats sum_each(const floats* v) { return reduce_each(v, [](floats a, floats b) { return _mm512_add_ps(a, b); }); }

// Transposes 16 x 16 floats in place: lane j of rows[i] becomes lane i of rows[j]. Pairs of
// rows interleaved by floats, then by float pairs, then by 128-bit blocks twice: 64 shuffles.
inline void transpose(floats (&rows)[16]) {
  floats t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
  }
  auto pairs = [](floats a, floats b, bool high) {
    const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
    return _mm512_castpd_ps(high ? _mm512_unpackhi_pd(x, y) : _mm512_unpacklo_pd(x, y));
  };
  for (int i = 0; i < 16; i += 4) {
    rows[i] = pairs(t[i], t[i + 2], false);
    rows[i + 1] = pairs(t[i], t[i + 2], true);
    rows[i + 2] = pairs(t[i + 1], t[i + 3], false);
    rows[i + 3] = pairs(t[i + 1], t[i + 3], true);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(rows[i], rows[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(rows[i], rows[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(rows[i + 8], rows[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(rows[i + 8], rows[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    rows[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    rows[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    rows[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    rows[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Integer dot products (VNNI) for integer codes: 16-bit words multiplied in adjacent pairs and
// summed into 32-bit lanes, 32 products per instruction where an fp32 FMA makes 16, and codes
// widen to words in one instruction where fp32 takes two or more.
#define KVCACHE_SIMD_INTEGER_DOT 1
inline constexpr int word_width = 32;  // 16-bit words per register
inline constexpr int pair_vectors = 4;  // vectors of word pairs per load_word_pairs: 64 elements
using words = __m512i;
using ints = __m512i;  // 16 int32 lanes

inline words load_words(const std::int16_t* p) { return _mm512_loadu_si512(p); }
inline void store(std::int16_t* p, words v) { _mm512_storeu_si512(p, v); }
inline ints load_ints(const std::int32_t* p) { return _mm512_loadu_si512(p); }
inline void store(std::int32_t* p, ints v) { _mm512_storeu_si512(p, v); }
// 32 int8 codes as words, in order.
inline words load_words(const std::int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// Key codes of 16 tokens of a block of 8 channels of an int4 key group (int4_key_code_at: 64
// bytes, a 32-bit word per token) as the four vectors of word pairs (channel 8c + 2i, 8c + 2i + 1),
// i = 0..3, to be dotted with query word pairs: vectors 1 and 3 hold their codes times 16 (a
// mask without a shift; their sums are divided by 16 exactly, being multiples of it).
inline void load_key_pairs(const int4x2* p, words (&out)[4]) {
  const __m512i x = _mm512_loadu_si512(p), y = _mm512_srli_epi32(x, 8);
  const __m512i low = _mm512_set1_epi32(0x000F000F), high = _mm512_set1_epi32(0x00F000F0);
  out[0] = _mm512_and_si512(x, low);
  out[1] = _mm512_and_si512(x, high);
  out[2] = _mm512_and_si512(y, low);
  out[3] = _mm512_and_si512(y, high);
}
// Codes of 64 elements of two rows, `a` and `b`, as four vectors of word pairs: each 32-bit lane
// holds one element's code in a (low word) and in b (high word), to be dotted with a pair of
// row weights (dot_add, broadcast_pair): two rows' multiply-adds in one. The lanes come in the
// order of the in-lane byte unpacks; pair_sums_in_order puts their sums back in element order.
inline void load_word_pairs(const std::int8_t* a, const std::int8_t* b, words (&out)[4]) {
  for (int half = 0; half < 2; ++half) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * half));
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * half));
    out[2 * half] = _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(x, y));      // elements 0-7, 16-23 (+ 32 * half)
    out[2 * half + 1] = _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(x, y));  // 8-15, 24-31
  }
}
inline void load_word_pairs(const int4x2* a, const int4x2* b, words (&out)[4]) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  const __m512i low = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(x, y));   // bytes 0-7, 16-23 of each
  const __m512i high = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(x, y));  // bytes 8-15, 24-31
  const __m512i nibble = _mm512_set1_epi16(0x0F);
  out[0] = _mm512_and_si512(low, nibble);   // elements 0, 2, ..., 14 and 32, 34, ..., 46
  out[1] = _mm512_srli_epi16(low, 4);       // 1, 3, ..., 15 and 33, ..., 47 (a word's high byte is 0)
  out[2] = _mm512_and_si512(high, nibble);  // 16, ..., 30 and 48, ..., 62
  out[3] = _mm512_srli_epi16(high, 4);      // 17, ..., 31 and 49, ..., 63
}
// The int32 sums of the lanes of load_word_pairs(Storage) as floats, elements 0-63 in order.
template <class Storage>
inline void pair_sums_in_order(const ints (&sums)[4], floats (&out)[4]) {
  floats lanes[4];
  for (int i = 0; i < 4; ++i) lanes[i] = _mm512_cvtepi32_ps(sums[i]);
  if constexpr (std::same_as<Storage, std::int8_t>) {  // 128-bit blocks of four elements
    out[0] = _mm512_shuffle_f32x4(lanes[0], lanes[1], 0x44);
    out[1] = _mm512_shuffle_f32x4(lanes[0], lanes[1], 0xEE);
    out[2] = _mm512_shuffle_f32x4(lanes[2], lanes[3], 0x44);
    out[3] = _mm512_shuffle_f32x4(lanes[2], lanes[3], 0xEE);
  } else {  // even and odd elements interleaved
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
    out[0] = _mm512_permutex2var_ps(lanes[0], low, lanes[1]);
    out[1] = _mm512_permutex2var_ps(lanes[2], low, lanes[3]);
    out[2] = _mm512_permutex2var_ps(lanes[0], high, lanes[1]);
    out[3] = _mm512_permutex2var_ps(lanes[2], high, lanes[3]);
  }
}
// Words p[0], p[1] as the pair in every 32-bit lane.
inline words broadcast_pair(const std::int16_t* p) {
  std::int32_t pair;
  std::memcpy(&pair, p, sizeof pair);
  return _mm512_set1_epi32(pair);
}
// The 16 lanes of v rounded to words (ties to even, saturating) at out.
inline void store_words(std::int16_t* out, floats v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(v)));
}
inline ints zero_ints() { return _mm512_setzero_si512(); }
inline ints add(ints a, ints b) { return _mm512_add_epi32(a, b); }
inline ints shift_right(ints a, int bits) { return _mm512_srai_epi32(a, static_cast<unsigned>(bits)); }  // arithmetic
inline floats to_float(ints a) { return _mm512_cvtepi32_ps(a); }
inline ints dot_add(ints sums, words a, words b) {
#if defined(__GNUC__) && !defined(__clang__)
  // GCC 12 copies each accumulator of the intrinsic to a new register and back (and spills
  // them), doubling the instructions of an accumulation loop; in asm it stays in place.
  asm("vpdpwssd %2, %1, %0" : "+v"(sums) : "v"(a), "v"(b));
  return sums;
#else
  return _mm512_dpwssd_epi32(sums, a, b);
#endif
}

// Lane r of the result is the sum of the int32 lanes of v[r], for width vectors, as a float.
inline floats sum_each_to_float(const ints* v) {
  floats lanes[16];
  for (int i = 0; i < 16; ++i) lanes[i] = _mm512_castsi512_ps(v[i]);
  const floats sums = reduce_each(lanes, [](floats a, floats b) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  });
  return _mm512_cvtepi32_ps(_mm512_castps_si512(sums));
}

// Rounds `count` floats times `factor` to words at `out` (ties to even, saturating; count a
// multiple of 16).
inline void round_to_words(const float* in, int count, float factor, std::int16_t* out) {
  const floats times = _mm512_set1_ps(factor);
  for (int at = 0; at < count; at += 16) store_words(out + at, _mm512_mul_ps(_mm512_loadu_ps(in + at), times));
}
#endif

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#define KVCACHE_SIMD_WIDTH 8
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
inline floats load(const std::int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline floats load(const fp8_e5m2_code* p) {  // E5M2 is the upper byte of an f16
  return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 8));
}
// E4M3's exponent and mantissa moved into an f16's are the value times 2^-8, subnormals too
// (codes are never NaN in a cache: quantization stores NaN as 0). A sign-extended code shifted
// left by 7 has them in place and the sign in bits 15 and 14; bit 14 is cleared.
inline floats load(const fp8_e4m3_code* p) {
  const __m128i words = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 7);
  return _mm256_mul_ps(_mm256_cvtph_ps(_mm_and_si128(words, _mm_set1_epi16(~0x4000))), _mm256_set1_ps(256.0f));
}
// Bytes b0 b1 ... as 16-bit lanes -> bytes (b0 & 15) (b0 >> 4) (b1 & 15) ...: the int4 codes in order.
inline __m128i unpack_nibbles(__m128i byte_lanes) {
  return _mm_and_si128(_mm_or_si128(byte_lanes, _mm_slli_epi16(byte_lanes, 4)), _mm_set1_epi16(0x0F0F));
}
inline floats load(const int4x2* p) {  // 8 codes from 4 bytes
  std::int32_t word;
  std::memcpy(&word, p, sizeof word);
  const __m128i bytes = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(word));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(unpack_nibbles(bytes)));
}
// As the AVX-512 load_key_block, for 8 tokens (32 bytes).
inline void load_key_block(const int4x2* p, floats (&out)[8]) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), nibble = _mm256_set1_epi32(0xF);
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(x, 4 * i), nibble));
    out[2 * i + 1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(x, 16 + 4 * i), nibble));
  }
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

inline floats max(floats a, floats b) { return _mm256_max_ps(a, b); }
inline bool any_greater(floats a, floats b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0; }
inline float max(floats v) {
  const __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}
inline floats sub(floats a, floats b) { return _mm256_sub_ps(a, b); }
inline floats round(floats v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline floats times_two_to(floats y, floats n) {  // y * 2^n for n in [-126, 127]
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}
inline floats zero_below(floats y, floats x, float limit) {
  return _mm256_and_ps(y, _mm256_cmp_ps(x, _mm256_set1_ps(limit), _CMP_GE_OQ));
}
inline floats first_or(floats v, int count, float fill) {
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(count)), _CMP_LT_OQ));
}

// Lane r of the result is the sum of the lanes of v[r], for width vectors.
inline floats sum_each(const floats* v) {
  const floats pairs0 = _mm256_hadd_ps(v[0], v[1]), pairs1 = _mm256_hadd_ps(v[2], v[3]);
  const floats pairs2 = _mm256_hadd_ps(v[4], v[5]), pairs3 = _mm256_hadd_ps(v[6], v[7]);
  const floats low = _mm256_hadd_ps(pairs0, pairs1), high = _mm256_hadd_ps(pairs2, pairs3);
  return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}
inline floats abs(floats v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
// A mask of lanes [0, count), count <= 8.
inline __m256i first_lanes(int count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline floats load_first(const float* p, int count) {  // p[0, count), zeros after
  return count == width ? load(p) : _mm256_maskload_ps(p, first_lanes(count));
}
inline void store_first(float* p, floats v, int count) {  // lanes [0, count) to p
  if (count == width) return store(p, v);
  _mm256_maskstore_ps(p, first_lanes(count), v);
}

// Integer dot products for integer codes, as with VNNI above but in two instructions: 16-bit
// words multiplied in adjacent pairs and summed into 32-bit lanes (vpmaddwd), then added. That
// is no more multiply-adds per instruction than fp32 FMAs, but codes widen to words in one
// instruction per 16 where fp32 takes two per 8, and the products leave the FMA ports free.
#define KVCACHE_SIMD_INTEGER_DOT 1
inline constexpr int word_width = 16;  // 16-bit words per register
inline constexpr int pair_vectors = 2;  // vectors of word pairs per load_word_pairs: 16 elements
using words = __m256i;
using ints = __m256i;  // 8 int32 lanes

inline words load_words(const std::int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store(std::int16_t* p, words v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline ints load_ints(const std::int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store(std::int32_t* p, ints v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline words load_words(const std::int8_t* p) {  // 16 int8 codes as words, in order
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// As the AVX-512 load_key_pairs, for 8 tokens (32 bytes).
inline void load_key_pairs(const int4x2* p, words (&out)[4]) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), y = _mm256_srli_epi32(x, 8);
  const __m256i low = _mm256_set1_epi32(0x000F000F), high = _mm256_set1_epi32(0x00F000F0);
  out[0] = _mm256_and_si256(x, low);
  out[1] = _mm256_and_si256(x, high);
  out[2] = _mm256_and_si256(y, low);
  out[3] = _mm256_and_si256(y, high);
}
// Codes of 16 elements of two rows, `a` and `b`, as two vectors of word pairs (element's code in
// a: low word, in b: high word), for two rows' multiply-adds in one (as the AVX-512 version).
inline void load_word_pairs(const std::int8_t* a, const std::int8_t* b, words (&out)[2]) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  out[0] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x, y));  // elements 0-7, in order
  out[1] = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(x, y));  // 8-15
}
inline void load_word_pairs(const int4x2* a, const int4x2* b, words (&out)[2]) {
  const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a));
  const __m128i y = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b));
  const __m256i pairs = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(x, y));  // bytes 0-7 of each
  out[0] = _mm256_and_si256(pairs, _mm256_set1_epi16(0x0F));  // elements 0, 2, ..., 14
  out[1] = _mm256_srli_epi16(pairs, 4);                       // 1, 3, ..., 15 (a word's high byte is 0)
}
// The int32 sums of the lanes of load_word_pairs(Storage) as floats, elements 0-15 in order.
template <class Storage>
inline void pair_sums_in_order(const ints (&sums)[2], floats (&out)[2]) {
  const floats first = _mm256_cvtepi32_ps(sums[0]), second = _mm256_cvtepi32_ps(sums[1]);
  if constexpr (std::same_as<Storage, std::int8_t>) {
    out[0] = first, out[1] = second;
  } else {  // even and odd elements interleaved
    const floats low = _mm256_unpacklo_ps(first, second);    // elements 0-3, 8-11
    const floats high = _mm256_unpackhi_ps(first, second);  // 4-7, 12-15
    out[0] = _mm256_permute2f128_ps(low, high, 0x20);
    out[1] = _mm256_permute2f128_ps(low, high, 0x31);
  }
}
// Words p[0], p[1] as the pair in every 32-bit lane.
inline words broadcast_pair(const std::int16_t* p) {
  std::int32_t pair;
  std::memcpy(&pair, p, sizeof pair);
  return _mm256_set1_epi32(pair);
}
// The 8 lanes of v rounded to words (ties to even, saturating) at out.
inline void store_words(std::int16_t* out, floats v) {
  const __m256i rounded = _mm256_cvtps_epi32(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packs_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
}
inline ints zero_ints() { return _mm256_setzero_si256(); }
inline ints add(ints a, ints b) { return _mm256_add_epi32(a, b); }
inline ints shift_right(ints a, int bits) { return _mm256_srai_epi32(a, bits); }  // arithmetic
inline floats to_float(ints a) { return _mm256_cvtepi32_ps(a); }
inline ints dot_add(ints sums, words a, words b) {
#if defined(__GNUC__) && !defined(__clang__)
  // As with VNNI's intrinsic, GCC 12 copies the accumulators around the intrinsics' pair (and
  // spills one of 8): int8 decode in L2 took 1.2x as long.
  words products;
  asm("vpmaddwd %2, %3, %1\n\tvpaddd %1, %0, %0" : "+v"(sums), "=&v"(products) : "vm"(a), "v"(b));
  return sums;
#else
  return _mm256_add_epi32(sums, _mm256_madd_epi16(a, b));
#endif
}

// Lane r of the result is the sum of the int32 lanes of v[r], for width vectors, as a float.
inline floats sum_each_to_float(const ints* v) {
  const __m256i pairs0 = _mm256_hadd_epi32(v[0], v[1]), pairs1 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i pairs2 = _mm256_hadd_epi32(v[4], v[5]), pairs3 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i low = _mm256_hadd_epi32(pairs0, pairs1), high = _mm256_hadd_epi32(pairs2, pairs3);
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20),
                                             _mm256_permute2x128_si256(low, high, 0x31)));
}

// Rounds `count` floats times `factor` to words at `out` (ties to even, saturating; count a
// multiple of 8).
inline void round_to_words(const float* in, int count, float factor, std::int16_t* out) {
  const floats times = _mm256_set1_ps(factor);
  for (int at = 0; at < count; at += 8) store_words(out + at, _mm256_mul_ps(_mm256_loadu_ps(in + at), times));
}

#else

#define KVCACHE_SIMD_WIDTH 0
inline constexpr int width = 0;

#endif

#if KVCACHE_SIMD_WIDTH > 0
// Count consecutive vectors of codes from p, as floats in registers (a block load where the
// type has one), for several uses each.
template <int Count, class Storage>
inline void load_vectors(const Storage* p, floats (&out)[Count]) {
#if KVCACHE_SIMD_WIDTH == 16
  if constexpr (Count == 4 && std::same_as<Storage, int4x2>) return load_block(p, out);
#endif
  constexpr int units = std::same_as<Storage, int4x2> ? 2 : 1;  // elements per stored unit
  for (int i = 0; i < Count; ++i) {
    out[i] = load(p + i * width / units);
#if defined(__GNUC__)
    // fp32 needs no conversion, and GCC would re-read the vector as a memory operand of each
    // multiply-add that uses it: then the loads, not the FMAs, bound decode (one thread: 24
    // instead of 19 cycles per row to score 4 heads, in L1).
    if constexpr (std::same_as<Storage, float>) asm("" : "+v"(out[i]));
#endif
  }
}

// e^x to about 2 ulp (Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6 polynomial);
// exactly 0 below -87.3, where e^x leaves the normal floats (so e^-inf = 0).
inline floats exp(floats x) {
  const floats n = round(mul(x, broadcast(1.44269504f)));               // x / ln 2
  floats r = fma(n, broadcast(-0.693359375f), x);                       // x - n ln 2, in two
  r = fma(n, broadcast(2.12194440e-4f), r);                              // parts for accuracy
  floats p = broadcast(1.9875691500e-4f);
  p = fma(p, r, broadcast(1.3981999507e-3f));
  p = fma(p, r, broadcast(8.3334519073e-3f));
  p = fma(p, r, broadcast(4.1665795894e-2f));
  p = fma(p, r, broadcast(1.6666665459e-1f));
  p = fma(p, r, broadcast(5.0000001201e-1f));
  const floats y = add(fma(mul(p, r), r, r), broadcast(1.0f));          // e^r
  return zero_below(times_two_to(y, n), x, -87.3f);
}
#endif

}  // namespace detail::simd

KVCACHE_END_NAMESPACE
