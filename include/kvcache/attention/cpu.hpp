// CPU attention kernels over SequenceView.
//
// Decode is bound by memory: every K/V byte of a sequence is read once per generated token.
// So for one kv-head the query heads of its group share one pass over its rows. K rows are read
// from the cache once per up to four heads, converted to fp32 in registers (f16, bf16; int8
// and fp8 codes, whose per-row scales then multiply the scores of K rows and the weights of V
// rows; int4 codes, whose key group's channel scales and minima are folded into the query and a
// bias once per group, and whose value minima into one sum per tile) and never stored; the per-row
// partial dot products are summed by one transposing reduction (int4 key groups, stored a block
// of channels at a time, are dotted a token per SIMD lane and need none). Scores are folded into an
// online softmax (fp32 state) a tile of 2-4 KiB of K at a time (row_tile_bytes), then each V row is read
// once and accumulated for every head with the accumulators in registers. With AVX-512 VNNI or
// AVX2, int8 and int4 codes are instead widened to 16-bit integers: K rows are dotted with
// queries rounded to 16-bit integers, V rows two at a time with softmax weights rounded likewise
// (uses_integer_dot_products), 32 multiply-adds per instruction (VNNI; AVX2: 16 per two). The
// next tile's rows are prefetched one row per row computed (shared out among the passes over a
// tile of more than 4 heads), and its scales with them; its first lines of K and V are asked
// into L2 as the tile starts. Work is split over (sequence, kv-head)
// and over token ranges of long sequences (fixed by the sequence, so results are
// batch-invariant), whose partial softmax states are merged in order.
// Prefill runs the same kernel with a block of queries as extra rows: keys before the block are
// visible to all of its queries and read once for all of them. Passes of more than 4 rows
// (prefill, MQA) are bound by the FMAs, not memory: with AVX-512 they score a K tile as a small
// matrix product with the heads in SIMD lanes (score_product; int8 with integer multiply-adds,
// score_product_integer) and convert a V tile once (integer codes: interleave it once,
// pack_word_pairs).
//
// The fast path needs AVX-512 or AVX2+FMA+F16C and head_dim 64, 128 or 256; every other case
// takes a portable Eigen path with the same structure. Nothing here allocates once a thread has
// served its largest call (the per-thread scratch only grows).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "../backend/cpu.hpp"
#include "../detail/simd.hpp"
#include "../dtype/float.hpp"
#include "../dtype/fp8.hpp"
#include "../dtype/hadamard.hpp"
#include "../dtype/int4.hpp"
#include "../dtype/int8.hpp"
#include "../shape.hpp"
#include "../view.hpp"
#include "online_softmax.hpp"
#include "params.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace attention::cpu {

namespace detail {

namespace simd = kvcache::detail::simd;

inline constexpr int heads_per_pass = 64;  // rows (query heads, or heads x queries in prefill)
                                           // sharing one read of K/V; larger groups take passes
inline constexpr int tile_rows = 64;      // the most key rows scored before one softmax update
inline constexpr std::size_t inline_elements = std::size_t{1} << 16;  // K elements below which a call stays on one thread
inline constexpr int small_head_dim = 32;  // the portable path scores up to this head_dim by keys transposed
inline constexpr int split_rows = 1024;  // decode splits a sequence into ranges of at least this many keys

// Storage whose K rows are quantized per channel over groups of tokens (int4).
template <class Storage>
concept GroupQuantizedStorage = std::same_as<Storage, int4x2>;

// Key rows per softmax update. Passes of up to 4 heads (decode) are bound by memory on the
// Xeon (on the Zen 5 EPYC about as much by their own work: AttentionInCache), and the
// next tile's rows are requested while a tile is computed, so the tile sets how far ahead the
// requests run. Row types take row_tile_bytes() of K (at least 8 rows), which depends on the
// CPU. On the Sapphire Rapids Xeon, 2 KiB, so that a tile of K and V and the next one's stay in
// L1: against 4 KiB, one thread at T = 16k, Llama-3-8B, 1.05x faster for f16, 1.08x for bf16,
// 1.13x for int8, 1.24x for fp8_e4m3 (1.04-1.16x on two threads); 1 KiB was 1.25x slower for
// int8, whose tile of 8 rows is then mostly the softmax update. On AMD EPYCs, whose cores read
// about twice as fast (42 against 18 GB/s), 4 KiB: on a Zen 5 one, three runs against 2 KiB
// (T = 16k and 4k, one and two threads, contiguous and paged) found f16 1.05-1.44x faster in
// all 16 cases and bf16 faster in 9 of 10 (up to 1.37x), f32, int8 and fp8_e4m3 about even
// (0.87-1.16x the time, either way in each); 8 KiB was 1.1-1.5x slower than 4 KiB, and the
// 2 KiB change had made f16 1.13-1.20x slower there. Group-quantized keys (int4) take 4 KiB:
// 1.03x faster than 2 KiB on the Xeon, each tile's softmax update costing latency that the
// next tile's work cannot hide (64 rows of 64 bytes: 39.8 -> 36.6 cycles per row in L2 against
// 32). Passes of more heads (prefill, MQA) are bound by the FMAs and load and store their
// accumulators once per tile: 32 rows (f32 prefill measured 0.25 of the FMA peak with 8 rows,
// 0.53 with 32). Such passes over integer codes with AVX-512 take 64 (tile_rows): their work
// per row is half the FMAs', so the per-tile work (rounding the weights, adding the sums to
// acc) weighs twice as much. MQA at T = 16k (one pinned thread of the Zen 5 EPYC, medians of 4
// runs taken in turn) took 0.97 of the time with int8 and 0.91 with int4; f16 was even with
// 64 rows and bf16 1.05x slower.
inline constexpr int product_rows = 32;  // rows per tile of a pass of more than 4 heads

// Whether this is an AMD processor, whose decode settings differ (row_tile_bytes,
// ask_in_parts); false in files nvcc compiles (its front end need not know GCC's CPU
// builtins) and off x86.
inline bool amd_processor() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__CUDACC__)
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}

// K bytes per decode tile of a row type (above): 4 KiB on AMD processors, 2 KiB elsewhere.
inline std::size_t row_tile_bytes() { return amd_processor() ? 4096 : 2048; }

inline int rows_per_tile(std::size_t row_bytes, int heads, bool group_quantized, bool integer_product) {
  const std::size_t tile_bytes = group_quantized ? 4096 : row_tile_bytes();
  if (heads > 4) return integer_product ? tile_rows : product_rows;
  return static_cast<int>(std::clamp<std::size_t>(tile_bytes / row_bytes, 8, tile_rows));
}

// Calls f with std::integral_constant<int, n> for the largest n in {4, 2, 1} not above
// `heads`; returns n. A kernel keeps n heads' work in registers: scoring holds a sum per head
// for each row of a block (score_rows), accumulation four vectors per head. Scoring 8 heads at once
// fits in 32 registers, but measured 3x slower per head than 4 (f32, in L1: 100 against 33.6
// cycles per row) on the Sapphire Rapids machine, and many-head passes (prefill, MQA) with it
// 1.1-1.15x slower end to end.
inline constexpr int most_heads = 4;  // per call of dispatch_heads: a pass over a tile

template <class F>
int dispatch_heads(int heads, F&& f) {
  if (heads >= most_heads) return f(std::integral_constant<int, most_heads>{}), most_heads;
  if (heads >= 2) return f(std::integral_constant<int, 2>{}), 2;
  return f(std::integral_constant<int, 1>{}), 1;
}

// The cache level a prefetch asks a line into.
enum class Into { l1, l2 };

// Asks for the cache line holding `address` (nothing where the target has no prefetch hint).
template <Into level = Into::l1>
inline void prefetch_line(const void* address) {
#if defined(__SSE__)
  if constexpr (level == Into::l1)
    _mm_prefetch(static_cast<const char*>(address), _MM_HINT_T0);
  else
    _mm_prefetch(static_cast<const char*>(address), _MM_HINT_T1);
#else
  (void)address;
#endif
}

// Asks for every cache line of [begin, begin + bytes).
inline void prefetch_lines(const void* begin, std::size_t bytes) {
  const auto first = reinterpret_cast<std::uintptr_t>(begin) & ~std::uintptr_t{63};
  for (std::uintptr_t at = first; at < reinterpret_cast<std::uintptr_t>(begin) + bytes; at += 64)
    prefetch_line(reinterpret_cast<const void*>(at));
}

template <int HeadDim, class Storage>
inline constexpr int row_bytes = HeadDim * static_cast<int>(sizeof(Storage)) / elements_per_unit<Storage>;

// Asks for one row (of K or V) that a later tile will read. Issued once per row processed, so
// the requests are spread over the computation: the hardware prefetcher alone leaves one core
// far below its read bandwidth on this access pattern, and a burst of requests does too.
template <int HeadDim, class Storage>
inline void prefetch_row(const Storage* row) {
  if (row == nullptr) return;
  for (int at = 0; at < row_bytes<HeadDim, Storage>; at += 64) prefetch_line(reinterpret_cast<const char*>(row) + at);
}

// Rows of 8 cache lines and more (f32 at head_dim 128) are asked for a part at a time by a
// pass of its own, the parts spread over the row's multiply-adds: with the 8 requests in a row,
// Llama-3-8B f32 decode (T = 16k, from memory) was 1.1-1.24x slower on one thread and 1.17x on
// two. Shorter rows are asked for whole: spreading the 4 lines of an f16 row measured 1.05-1.1x
// slower. Passes that share a tile's rows out (MQA) ask for them whole too: in parts, with the
// pass test per part, MQA f32 decode was 1.29x slower. The two ways stay side by side in the
// kernels, the whole row asked before its loads: folded into one call after them, f16 and f32
// decode measured 1.2x slower and MQA f32 1.18x.
// That was the Sapphire Rapids Xeon. On the Zen 5 EPYC whole rows are faster (ask_in_parts
// says no on AMD): f32 in L2 (AttentionInCache) 0.67-0.73 of the time; from memory at
// T = 4k and 16k, contiguous and paged, one and two threads (one run, medians of 3 alternating
// rounds), Llama-3-8B f32 0.82-1.01 of the time (7 of 8 below 0.97), Llama-2-7B 0.93-1.06.
// The kernels take the choice as a template argument: tested inside their loops, it kept
// f32 in L2 at 0.95.
template <int HeadDim, class Storage>
inline constexpr bool may_ask_in_parts = row_bytes<HeadDim, Storage> >= 512;
// Whether a pass over rows of Storage asks for them in parts: rows that may be, a pass of its
// own, not on AMD.
template <int HeadDim, class Storage>
bool ask_in_parts(int passes) {
  return may_ask_in_parts<HeadDim, Storage> && passes == 1 && !amd_processor();
}

// The rows of the tile a pass reads next (null: none), shared out among the passes over one
// tile's chunks of heads: this pass asks for the rows r with r % passes == pass. Where the
// first pass asked for all of them (32 heads in 8 passes: a tile's requests made in an eighth of
// its time), MQA decode at T = 16k was slower than with the requests shared out: 1.32x for f32
// and 1.16x for f16 on one thread, 1.29x and 1.20x on two.
template <class Storage>
struct RowsAhead {
  using storage = Storage;
  const Storage* rows = nullptr;
  int pass = 0, passes = 1;

  // Asks for row r of the next tile if it falls to this pass.
  template <int HeadDim>
  void ask(int r) const {
    if (rows != nullptr && (passes == 1 || r % passes == pass))  // no division for a pass of its own
      prefetch_row<HeadDim>(rows + r * HeadDim / elements_per_unit<Storage>);
  }
  // Asks for part `part` of Parts equal parts of row r's cache lines. For a pass of its own
  // only: passes sharing the rows out ask for them whole (ask).
  template <int HeadDim, int Parts>
  void ask_part(int r, int part) const {
    if (rows == nullptr) return;
    constexpr int lines = (row_bytes<HeadDim, Storage> + 63) / 64;
    const char* row = reinterpret_cast<const char*>(rows + r * HeadDim / elements_per_unit<Storage>);
    for (int line = part * lines / Parts; line < (part + 1) * lines / Parts; ++line) prefetch_line(row + 64 * line);
  }
};

template <int HeadDim>
inline constexpr bool use_simd = simd::width > 0 && HeadDim > 0 && HeadDim % (2 * std::max(simd::width, 1)) == 0;

#if KVCACHE_SIMD_WIDTH > 0

// Folds one tile of scores into the online softmax of each head: raises the running max
// (rescaling acc), turns scores into exp(score - max) in place and adds them to the running
// sum. Each step runs for every head before the next, so the heads' reductions and
// exponentials, each a long dependency chain, overlap (one head at a time: 6.2 instead of 2.1
// cycles per row for 4 heads, in L1). A head's max is reduced across lanes only where a score
// exceeds its running max, which after the first tiles is rare: the exponentials then wait on
// no reduction (Zen 5, in L2: f16 0.98, int8 0.95 of the time). Nor is a tile's sum: each head's
// sums stay a vector, in `lanes`, rescaled with acc, until the caller adds them to state.sum
// (Zen 5, in L2, one pinned core: f16 0.94-0.99, int8 0.97 of the time; f32, bf16, int4 even).
//   scores: [heads][tile_rows], the first `rows` of each valid
//   acc:    [heads][HeadDim]
//   lanes:  [heads][simd::width], the sums of exp(score - max) not yet in state.sum
template <int HeadDim>
void softmax_tile(float (*scores)[tile_rows], int heads, int rows, OnlineSoftmax* state, float* acc, float* lanes) {
  {
    constexpr int width = simd::width;
    // The tail vector's lanes past `rows` are masked in registers: scalar stores there would
    // stall the vector loads that follow (no store forwarding from several stores).
    const int whole = rows / width * width, tail = rows - whole;
    const float lowest = -std::numeric_limits<float>::infinity();
    alignas(64) float top[heads_per_pass];
    bool rises[heads_per_pass];
    for (int h = 0; h < heads; ++h) {
      simd::floats most = tail > 0 ? simd::first_or(simd::load(scores[h] + whole), tail, lowest) : simd::broadcast(lowest);
      for (int at = 0; at < whole; at += width) most = simd::max(most, simd::load(scores[h] + at));
      rises[h] = simd::any_greater(most, simd::broadcast(state[h].max));
      if (rises[h]) top[h] = simd::max(most);
    }
    for (int h = 0; h < heads; ++h) {
      if (!rises[h]) continue;
      const float factor = state[h].raise_max(top[h]);
      if (factor != 1.0f) {
        const simd::floats scale = simd::broadcast(factor);
        for (int d = 0; d < HeadDim; d += width) {
          float* at = acc + h * HeadDim + d;
          simd::store(at, simd::mul(scale, simd::load(at)));
        }
        simd::store(lanes + h * width, simd::mul(scale, simd::load(lanes + h * width)));
      }
    }
    for (int h = 0; h < heads; ++h) {
      const simd::floats max = simd::broadcast(state[h].max);
      simd::floats total = simd::zero();
      for (int at = 0; at < whole; at += width) {
        const simd::floats p = simd::exp(simd::sub(simd::load(scores[h] + at), max));
        simd::store(scores[h] + at, p);
        total = simd::add(total, p);
      }
      if (tail > 0) {
        const simd::floats p = simd::first_or(simd::exp(simd::sub(simd::load(scores[h] + whole), max)), tail, 0.0f);
        simd::store(scores[h] + whole, p);
        total = simd::add(total, p);
      }
      simd::store(lanes + h * width, simd::add(total, simd::load(lanes + h * width)));
    }
  }
}

// scores[h][r] = q_h . k_r for `Heads` heads and `rows` rows of k ([rows][HeadDim]). A block of
// rows is converted to fp32 in registers two vectors at a time, and each query vector, loaded
// once, is multiplied into every row of the block (each row of a block loaded once per Heads
// heads and never stored); the per-row partial dot products of simd::width rows are summed by
// one transposing reduction per head. Scores past `rows`, up to the next multiple of
// simd::width, are overwritten too (the last block repeats the last row).
// One row at a time, with the queries re-read for every row, took 40 loads per 32 FMAs (f16, 4
// heads); a block of 4 rows takes 16. On the Zen 5 EPYC, Llama-3-8B f16 decode at T = 16k
// (from memory, best of 6 runs taken in turn) took 0.92-0.94 of the time, contiguous and paged,
// one and two threads; bf16 and f32 about the same as before. score_rows_asking asks for the
// next rows in parts or whole (in_parts); score_rows chooses (ask_in_parts).
template <int HeadDim, int Heads, class Storage, bool in_parts>
void score_rows_asking(const Storage* k, int rows, const float* q, float (*scores)[tile_rows], RowsAhead<Storage> ahead) {
  {
    constexpr int width = simd::width, vectors = HeadDim / width, units = elements_per_unit<Storage>;
    constexpr int block = width == 16 ? 4 : 2;  // rows; their sums, keys and a query fit the registers
    constexpr int chunk = 2, steps = vectors / chunk;  // row vectors per step
    static_assert(width % block == 0 && vectors % chunk == 0);
    for (int first = 0; first < rows; first += width) {
      const int count = std::min(width, rows - first);
      simd::floats partial[Heads][width];
      for (int r0 = 0; r0 < width; r0 += block) {
        simd::floats sums[block][Heads];
        for (int i = 0; i < block; ++i)
          for (int h = 0; h < Heads; ++h) sums[i][h] = simd::zero();
        if (r0 < count) {
          const Storage* row[block];
          for (int i = 0; i < block; ++i) row[i] = k + (first + std::min(r0 + i, count - 1)) * HeadDim / units;
          for (int s = 0; s < steps; ++s) {
            if constexpr (!in_parts)  // the block's rows asked for over its first steps
              for (int i = s; i < block; i += steps)
                if (r0 + i < count) ahead.template ask<HeadDim>(first + r0 + i);
            simd::floats key[block][chunk];
            for (int i = 0; i < block; ++i) simd::load_vectors(row[i] + s * chunk * width / units, key[i]);
            for (int h = 0; h < Heads; ++h) {
              if constexpr (in_parts) {  // the block's rows asked for a part per step and head
                constexpr int slots = steps * Heads, parts = slots / block;
                static_assert(slots % block == 0);
                const int slot = s * Heads + h;
                if (r0 + slot / parts < count)
                  ahead.template ask_part<HeadDim, parts>(first + r0 + slot / parts, slot % parts);
              }
              for (int j = 0; j < chunk; ++j) {
                simd::floats query = simd::load(q + h * HeadDim + (s * chunk + j) * width);
#if defined(__GNUC__)
                asm("" : "+v"(query));  // else GCC re-reads it as a memory operand of every FMA
#endif
                for (int i = 0; i < block; ++i) sums[i][h] = simd::fma(query, key[i][j], sums[i][h]);
              }
            }
          }
        }
        for (int i = 0; i < block; ++i)
          for (int h = 0; h < Heads; ++h) partial[h][r0 + i] = sums[i][h];
      }
      for (int h = 0; h < Heads; ++h) simd::store(scores[h] + first, simd::sum_each(partial[h]));
    }
  }
}
template <int HeadDim, int Heads, class Storage>
void score_rows(const Storage* k, int rows, const float* q, float (*scores)[tile_rows], RowsAhead<Storage> ahead) {
  if constexpr (may_ask_in_parts<HeadDim, Storage>)
    if (ask_in_parts<HeadDim, Storage>(ahead.passes)) return score_rows_asking<HeadDim, Heads, Storage, true>(k, rows, q, scores, ahead);
  score_rows_asking<HeadDim, Heads, Storage, false>(k, rows, q, scores, ahead);
}

// scores[h][r] = q_h . codes of token first + r, for `count` tokens of an int4 key group
// (int4_key_code_at) from token `first`, q already times the group's channel scales (the
// caller adds q . the channel minima). A token per SIMD lane, so no reduction across lanes.
template <int HeadDim, int Heads>
void score_key_group(const int4x2* group, int first, int count, const float* q, float (*scores)[tile_rows],
                     RowsAhead<int4x2> ahead) {
  constexpr int width = simd::width, blocks = HeadDim / 8;
  alignas(64) float group_scores[Heads][int4_group_tokens];
  for (int t = first / width; t * width < first + count; ++t) {
    simd::floats even[Heads], odd[Heads];  // two chains per head
    for (int h = 0; h < Heads; ++h) even[h] = odd[h] = simd::zero();
    for (int c = 0; c < blocks; ++c) {
      if (t == first / width)
        for (int r = c * count / blocks; r < (c + 1) * count / blocks; ++r) ahead.template ask<HeadDim>(r);
      simd::floats codes[8];
      simd::load_key_block(group + (c * int4_group_tokens + t * width) * 4, codes);
      for (int h = 0; h < Heads; ++h)
        for (int j = 0; j < 8; j += 2) {
          even[h] = simd::fma(simd::broadcast(q[h * HeadDim + 8 * c + j]), codes[j], even[h]);
          odd[h] = simd::fma(simd::broadcast(q[h * HeadDim + 8 * c + j + 1]), codes[j + 1], odd[h]);
        }
    }
    for (int h = 0; h < Heads; ++h) simd::store(group_scores[h] + t * width, simd::add(even[h], odd[h]));
  }
  for (int h = 0; h < Heads; ++h) std::copy_n(group_scores[h] + first, count, scores[h]);
}

// acc[h] += sum over rows r of p[h][r] * v_r for `Heads` heads and `rows` rows of v
// ([rows][HeadDim]), a few registers of every head's accumulator at a time. `ahead` says which
// rows to ask for (those of v's next tile, or where v is a converted copy, the stored ones'),
// in parts or whole (in_parts: accumulate_rows chooses, ask_in_parts).
template <int HeadDim, int Heads, bool in_parts, class Storage, class Ahead>
void accumulate_rows_asking(const Storage* v, int rows, const float (*p)[tile_rows], float* acc, Ahead ahead) {
  {
    constexpr int vectors = HeadDim / simd::width, units = elements_per_unit<Storage>;
    constexpr int step = simd::width == 16 ? 4 : 2;  // registers per head per pass: 4 x 4 + 4 of 32
    for (int j = 0; j < vectors; j += step) {
      simd::floats sums[Heads][step];
      for (int h = 0; h < Heads; ++h)
        for (int i = 0; i < step; ++i) sums[h][i] = simd::load(acc + h * HeadDim + (j + i) * simd::width);
      for (int r = 0; r < rows; ++r) {
        if constexpr (!in_parts)
          if (j == 0) ahead.template ask<HeadDim>(r);
        simd::floats value[step];
        simd::load_vectors(v + (r * HeadDim + j * simd::width) / units, value);
        for (int h = 0; h < Heads; ++h) {
          if constexpr (in_parts) ahead.template ask_part<HeadDim, vectors / step * Heads>(r, j / step * Heads + h);
          const simd::floats weight = simd::broadcast(p[h][r]);
          for (int i = 0; i < step; ++i) sums[h][i] = simd::fma(weight, value[i], sums[h][i]);
        }
      }
      for (int h = 0; h < Heads; ++h)
        for (int i = 0; i < step; ++i) simd::store(acc + h * HeadDim + (j + i) * simd::width, sums[h][i]);
    }
  }
}
template <int HeadDim, int Heads, class Storage, class Ahead = RowsAhead<Storage>>
void accumulate_rows(const Storage* v, int rows, const float (*p)[tile_rows], float* acc, Ahead ahead) {
  using Asked = typename Ahead::storage;  // the rows asked for
  if constexpr (may_ask_in_parts<HeadDim, Asked>)
    if (ask_in_parts<HeadDim, Asked>(ahead.passes)) return accumulate_rows_asking<HeadDim, Heads, true>(v, rows, p, acc, ahead);
  accumulate_rows_asking<HeadDim, Heads, false>(v, rows, p, acc, ahead);
}

// Rows [count][HeadDim] of Storage as fp32 rows at `out`, then zero rows up to `padded`.
template <int HeadDim, class Storage>
void pack_rows(const Storage* rows, int count, int padded, float* out) {
  constexpr int units = elements_per_unit<Storage>;
  for (int r = 0; r < padded; ++r)
    for (int d = 0; d < HeadDim; d += simd::width)
      simd::store(out + r * HeadDim + d, r < count ? simd::load(rows + (r * HeadDim + d) / units) : simd::zero());
}

#if KVCACHE_SIMD_WIDTH == 16
// Passes of more than 4 heads (prefill's queries x heads, MQA's group) are bound by the FMAs,
// and score_rows spends about half of its time there on the per-row reductions and on
// reloading the queries for every row (0.40-0.45 of the FMA peak for 32 and 64 heads, in L1).
// They score a tile as the small matrix product Q K^T instead (score_product): the keys
// converted once to fp32 rows (pack_rows), the queries transposed once per call so that a
// register holds one element of 16 heads, and each key element broadcast against them, a block
// of keys x heads summed in registers over the whole head (0.73-0.75 of the peak, in L1).

// q_t[d][lane] = q[lane][d] for the lanes below `heads`, 0 for the others up to `lanes`, heads
// rounded up to a multiple of 16.
//   q: [heads][HeadDim]; q_t: [HeadDim][lanes]
template <int HeadDim>
void transpose_queries(const float* q, int heads, float* q_t) {
  constexpr int width = simd::width;
  const int lanes = (heads + width - 1) / width * width;
  for (int first = 0; first < lanes; first += width)
    for (int d = 0; d < HeadDim; d += width) {
      simd::floats block[width];
      for (int h = 0; h < width; ++h) block[h] = first + h < heads ? simd::load(q + (first + h) * HeadDim + d) : simd::zero();
      simd::transpose(block);
      for (int i = 0; i < width; ++i) simd::store(q_t + (d + i) * lanes + first, block[i]);
    }
}

// scores_t[key][lane] = k_key . (column `lane` of q_t) for Keys fp32 rows of k ([Keys][HeadDim])
// and Vectors registers of lanes; q_t: [HeadDim][Vectors * 16].
template <int HeadDim, int Vectors, int Keys>
void score_keys(const float* k, const float* q_t, float* scores_t) {
  constexpr int width = simd::width, lanes = Vectors * width;
  simd::floats sums[Keys][Vectors];
  for (int key = 0; key < Keys; ++key)
    for (int i = 0; i < Vectors; ++i) sums[key][i] = simd::zero();
  for (int d = 0; d < HeadDim; ++d) {
    simd::floats query[Vectors];
    for (int i = 0; i < Vectors; ++i) query[i] = simd::load(q_t + d * lanes + i * width);
    for (int key = 0; key < Keys; ++key) {
      const simd::floats element = simd::broadcast(k[key * HeadDim + d]);
      for (int i = 0; i < Vectors; ++i) sums[key][i] = simd::fma(element, query[i], sums[key][i]);
    }
  }
  for (int key = 0; key < Keys; ++key)
    for (int i = 0; i < Vectors; ++i) simd::store(scores_t + key * lanes + i * width, sums[key][i]);
}

// scores[h][r] = scores_t[r][h] for the first `rows` rows (a multiple of 16) and Vectors
// registers of heads.
template <int Vectors>
void transpose_scores(const float (*scores_t)[Vectors * simd::width], int rows, float (*scores)[tile_rows]) {
  constexpr int width = simd::width;
  for (int first = 0; first < rows; first += width)
    for (int i = 0; i < Vectors; ++i) {
      simd::floats sums[width];
      for (int r = 0; r < width; ++r) sums[r] = simd::load(scores_t[first + r] + i * width);
      simd::transpose(sums);
      for (int h = 0; h < width; ++h) simd::store(scores[i * width + h] + first, sums[h]);
    }
}

// scores[h][r] = q_h . k_r for the heads of q_t (Vectors registers of lanes) and `rows` rows of
// k ([rows][HeadDim]), converted a block at a time, up to a multiple of 16 rows (the scores
// past `rows` are of zero rows). Blocks of 8 keys x 1-2 registers of heads or 4 x 3-4 keep 8-16
// sums in registers: fewer leave the FMAs waiting on their latency, more measured slower (the
// loads of q_t then outrun the FMAs). The next tile's rows are asked for a block at a time.
template <int HeadDim, int Vectors, class Storage>
void score_product(const Storage* k, int rows, const float* q_t, float (*scores)[tile_rows], RowsAhead<Storage> ahead) {
  constexpr int width = simd::width, lanes = Vectors * width, keys = Vectors <= 2 ? 8 : 4;
  constexpr int units = elements_per_unit<Storage>;
  alignas(64) float scores_t[product_rows][lanes];
  alignas(64) float block[keys * HeadDim];
  const int padded = (rows + width - 1) / width * width;
  for (int first = 0; first < padded; first += keys) {
    const int count = std::clamp(rows - first, 0, keys);
    for (int r = first; r < first + count; ++r) ahead.template ask<HeadDim>(r);
    pack_rows<HeadDim>(k + first * HeadDim / units, count, keys, block);
    score_keys<HeadDim, Vectors, keys>(block, q_t, scores_t[first]);
  }
  transpose_scores<Vectors>(scores_t, padded, scores);
}

// score_product for `heads` rows of q_t ([HeadDim][lanes], lanes = heads rounded up to 16).
template <int HeadDim, class Storage>
void score_product(const Storage* k, int rows, const float* q_t, int heads, float (*scores)[tile_rows],
                   RowsAhead<Storage> ahead) {
  switch ((heads + simd::width - 1) / simd::width) {
    case 1: return score_product<HeadDim, 1>(k, rows, q_t, scores, ahead);
    case 2: return score_product<HeadDim, 2>(k, rows, q_t, scores, ahead);
    case 3: return score_product<HeadDim, 3>(k, rows, q_t, scores, ahead);
    default: return score_product<HeadDim, 4>(k, rows, q_t, scores, ahead);
  }
}
#endif

#if defined(KVCACHE_SIMD_INTEGER_DOT)
// As score_rows, for int8 codes against queries rounded to 16-bit words (round_queries): each
// row's codes widen to words in registers and are dotted with every head's words by integer
// multiply-adds, summed exactly in 32-bit lanes (at most 256 * 127 * 32767 < 2^31), then scaled
// by the head's `unit` (the value of one query step) and, where given, by the row's scale and
// offset by the head's bias. Row r's scores go to column `column + r`.
//   q: [Heads][HeadDim] words; row_scale: [rows] or null; bias: [Heads] or null
template <int HeadDim, int Heads, class Storage>
void score_rows_integer(const Storage* k, int rows, const std::int16_t* q, const float* unit, const float* row_scale,
                        const float* bias, float (*scores)[tile_rows], int column, RowsAhead<Storage> ahead) {
  constexpr int width = simd::width, vectors = HeadDim / simd::word_width, units = elements_per_unit<Storage>;
  // The queries stay in registers across the rows where they take at most half of AVX-512's 32:
  // loaded for every row, one pinned Zen 5 core took 1.09x the time for Llama-3-8B's int8 rows
  // of 4 heads (in L2).
  constexpr bool held = simd::width == 16 && Heads * vectors <= 16;
  simd::words query[held ? Heads : 1][held ? vectors : 1];
  if constexpr (held)
    for (int h = 0; h < Heads; ++h)
      for (int j = 0; j < vectors; ++j) query[h][j] = simd::load_words(q + h * HeadDim + j * simd::word_width);
  auto query_words = [&](int h, int j) {
    if constexpr (held) return query[h][j];
    else return simd::load_words(q + h * HeadDim + j * simd::word_width);
  };
  for (int first = 0; first < rows; first += width) {
    const int count = std::min(width, rows - first);
    simd::ints partial[Heads][width];
    for (int r = 0; r < width; ++r) {
      simd::ints sums[Heads];
      for (int h = 0; h < Heads; ++h) sums[h] = simd::zero_ints();
      if (r < count) {
        const Storage* row = k + (first + r) * HeadDim / units;
        ahead.template ask<HeadDim>(first + r);
        simd::words key[vectors];
        for (int j = 0; j < vectors; j += 2) {
          key[j] = simd::load_words(row + j * simd::word_width);
          key[j + 1] = simd::load_words(row + (j + 1) * simd::word_width);
        }
        for (int h = 0; h < Heads; ++h)
          for (int j = 0; j < vectors; ++j)
            sums[h] = simd::dot_add(sums[h], query_words(h, j), key[j]);
      }
      for (int h = 0; h < Heads; ++h) partial[h][r] = sums[h];
    }
    const simd::floats scale = row_scale == nullptr ? simd::broadcast(1.0f) : simd::load_first(row_scale + first, count);
    for (int h = 0; h < Heads; ++h)
      simd::store_first(scores[h] + column + first,
                        simd::fma(simd::mul(simd::sum_each_to_float(partial[h]), scale), simd::broadcast(unit[h]),
                                  simd::broadcast(bias == nullptr ? 0.0f : bias[h])),
                        count);
  }
}

// scores[h][column + r] = q_h . k_(first + r) + bias[h] for `count` tokens of an int4 key group
// (int4_key_code_at) from token `first`, q already times the group's channel scales (the
// bias: q . its channel minima) and rounded to words per head (unit[h]: one step), in channel
// order. The group is dotted a token per 32-bit lane (simd::load_key_pairs), exactly in 32-bit
// lanes (the pairs times 16 sum at most 128 products of 240 * 32767 for head_dim 256: about
// 1.0e9 < 2^31); no reduction across lanes. With VNNI, 12.8 instead of 22.3 cycles per row for 4
// heads in L1, where rows of codes were dotted one at a time and reduced.
template <int HeadDim, int Heads>
void score_key_group_integer(const int4x2* group, int first, int count, const std::int16_t* q, const float* unit,
                             const float* bias, float (*scores)[tile_rows], int column, RowsAhead<int4x2> ahead) {
  constexpr int width = simd::width, vectors = int4_group_tokens / width, blocks = HeadDim / 8;
  // Token vectors summed in one pass over the group: both (32 registers of AVX-512 hold their
  // 16 accumulators); one at a time with AVX2's 16 registers.
  constexpr int together = width == 16 ? 2 : 1;
  alignas(64) float group_scores[Heads][int4_group_tokens];
  for (int t0 = 0; t0 < vectors; t0 += together) {
    simd::ints sums[together][Heads][2];  // [1]: the pairs whose codes are times 16
    for (int t = 0; t < together; ++t)
      for (int h = 0; h < Heads; ++h) sums[t][h][0] = sums[t][h][1] = simd::zero_ints();
    for (int c = 0; c < blocks; ++c) {
      if (t0 == 0)
        for (int r = c * count / blocks; r < (c + 1) * count / blocks; ++r) ahead.template ask<HeadDim>(r);
      simd::words codes[together][4];
      for (int t = 0; t < together; ++t)
        simd::load_key_pairs(group + (c * int4_group_tokens + (t0 + t) * width) * 4, codes[t]);
      for (int i = 0; i < 4; ++i)
        for (int h = 0; h < Heads; ++h) {
          const simd::words pair = simd::broadcast_pair(q + h * HeadDim + 8 * c + 2 * i);
          for (int t = 0; t < together; ++t) sums[t][h][i % 2] = simd::dot_add(sums[t][h][i % 2], codes[t][i], pair);
        }
    }
    for (int t = 0; t < together; ++t)
      for (int h = 0; h < Heads; ++h)
        simd::store(group_scores[h] + (t0 + t) * width,
                    simd::fma(simd::to_float(simd::add(sums[t][h][0], simd::shift_right(sums[t][h][1], 4))),
                              simd::broadcast(unit[h]), simd::broadcast(bias[h])));
  }
  for (int h = 0; h < Heads; ++h) std::copy_n(group_scores[h] + first, count, scores[h] + column);
}

// Where pack_word_pairs (below) puts the codes of rows r and r + 1 (r even), elements from j (a
// multiple of the pair_vectors * simd::width that load_word_pairs takes): the first word of
// their pair_vectors vectors.
template <int HeadDim>
constexpr int word_pairs_at(int r, int j) {
  constexpr int block = simd::pair_vectors * simd::width;
  return (r / 2 * HeadDim + j) / block * simd::pair_vectors * simd::word_width;
}

// As accumulate_rows, for integer codes (int8, int4): each head's weights are rounded to 16-bit
// words (unit = its largest weight / 32767), and the codes of two rows at a time are
// interleaved into word pairs and dotted with the two rows' weights, so one integer multiply-add
// does the work of two FMAs. The sums are exact in 32-bit lanes (at most tile_rows * 128 *
// 32767 < 2^31) and added to acc, times the unit, once per tile. A weight moves by at most its
// unit / 2: 2^-16 of the tile's largest weight.
// Packed: v's codes are read as pack_word_pairs left them at `packed` instead (a test in the
// loop made MHA's passes of one head 1.03x slower).
template <int HeadDim, int Heads, bool Packed, class Storage>
void accumulate_rows_integer(const Storage* v, int rows, const float (*p)[tile_rows], float* acc,
                             RowsAhead<Storage> ahead, const std::int16_t* packed) {
  constexpr int pairs = simd::pair_vectors, block = pairs * simd::width;  // elements per load_word_pairs
  constexpr int units = elements_per_unit<Storage>;
  static_assert(HeadDim % block == 0);
  alignas(64) std::int16_t weight[Heads][tile_rows];  // a weight of 0 past `rows`
  float unit[Heads];
  constexpr int width = simd::width, vectors = tile_rows / width;
  const int used = (rows + width - 1) / width;  // vectors holding weights; the row pairs read no further
  for (int h = 0; h < Heads; ++h) {
    simd::floats weights[vectors];
    simd::floats top = simd::zero();
    for (int i = 0; i < used; ++i) {
      const int first = i * width;
      weights[i] = simd::first_or(simd::load(p[h] + first), std::min(rows - first, width), 0.0f);
      top = simd::max(top, weights[i]);
    }
    const float largest = simd::max(top);  // weights are >= 0
    const simd::floats factor = simd::broadcast(largest > 0.0f ? 32767.0f / largest : 0.0f);
    for (int i = 0; i < used; ++i) simd::store_words(weight[h] + i * width, simd::mul(weights[i], factor));
    unit[h] = largest / 32767.0f;
  }
  for (int j = 0; j < HeadDim; j += block) {
    simd::ints sums[Heads][pairs];
    for (int h = 0; h < Heads; ++h)
      for (int i = 0; i < pairs; ++i) sums[h][i] = simd::zero_ints();
    for (int r = 0; r < rows; r += 2) {
      if (j == 0) {
        ahead.template ask<HeadDim>(r);
        if (r + 1 < rows) ahead.template ask<HeadDim>(r + 1);
      }
      simd::words codes[pairs];
      if constexpr (!Packed) {
        const Storage* a = v + (r * HeadDim + j) / units;
        const Storage* b = r + 1 < rows ? a + HeadDim / units : a;  // an odd last row pairs with itself, weight 0
        simd::load_word_pairs(a, b, codes);
      } else {
        for (int i = 0; i < pairs; ++i)
          codes[i] = simd::load_words(packed + word_pairs_at<HeadDim>(r, j) + i * simd::word_width);
      }
      for (int h = 0; h < Heads; ++h) {
        const simd::words pair = simd::broadcast_pair(weight[h] + r);
        for (int i = 0; i < pairs; ++i) sums[h][i] = simd::dot_add(sums[h][i], codes[i], pair);
      }
    }
    for (int h = 0; h < Heads; ++h) {
      simd::floats in_order[pairs];
      simd::pair_sums_in_order<Storage>(sums[h], in_order);
      const simd::floats scale = simd::broadcast(unit[h]);
      for (int i = 0; i < pairs; ++i) {
        float* at = acc + h * HeadDim + j + i * simd::width;
        simd::store(at, simd::fma(in_order[i], scale, simd::load(at)));
      }
    }
  }
}
#endif

#if defined(KVCACHE_SIMD_INTEGER_DOT) && KVCACHE_SIMD_WIDTH == 16
// Passes of more than 4 heads over int8 keys (MQA's group, prefill's queries x heads) score a
// tile as score_product does, with integers: the queries' words transposed once per call into
// pairs (transpose_query_pairs), so that a register holds one pair of elements of 16 heads, and
// each key's pair of codes broadcast against them. The codes widen to words once per tile, not
// once per chunk of 4 heads, and no per-row reductions are left.

// q_pairs[p][lane] = the words q[lane][2p], q[lane][2p + 1] as one 32-bit pair (the first in the
// low half), for the lanes below `heads`, 0 for the others up to `lanes` (heads rounded up to
// simd::width); unit[lane] = 0 for those others.
//   q: [heads][HeadDim] words; q_pairs: [HeadDim / 2][lanes]
template <int HeadDim>
void transpose_query_pairs(const std::int16_t* q, int heads, std::int32_t* q_pairs, float* unit) {
  const int lanes = (heads + simd::width - 1) / simd::width * simd::width;
  for (int lane = 0; lane < lanes; ++lane)
    for (int p = 0; p < HeadDim / 2; ++p) {
      std::int32_t pair = 0;
      if (lane < heads) std::memcpy(&pair, q + lane * HeadDim + 2 * p, sizeof pair);
      q_pairs[p * lanes + lane] = pair;
    }
  std::fill(unit + heads, unit + lanes, 0.0f);
}

// sums_t[key][lane] = k_key . (column `lane` of q_pairs), exactly, for Keys rows of words
// ([Keys][HeadDim]) and Vectors registers of lanes; q_pairs: [HeadDim / 2][Vectors * 16].
// (A function of its own, as score_keys: inlined into its caller, GCC 12 moved the sums
// between registers and the stack every step, and MQA int8 took 1.23x the time in L2.)
template <int HeadDim, int Vectors, int Keys>
void score_key_pairs(const std::int16_t* k, const std::int32_t* q_pairs, std::int32_t* sums_t) {
  constexpr int width = simd::width, lanes = Vectors * width;
  simd::ints sums[Keys][Vectors];
  for (int key = 0; key < Keys; ++key)
    for (int i = 0; i < Vectors; ++i) sums[key][i] = simd::zero_ints();
  for (int p = 0; p < HeadDim / 2; ++p) {
    simd::words query[Vectors];
    for (int i = 0; i < Vectors; ++i)
      query[i] = simd::load_words(reinterpret_cast<const std::int16_t*>(q_pairs + p * lanes + i * width));
    for (int key = 0; key < Keys; ++key) {
      const simd::words pair = simd::broadcast_pair(k + key * HeadDim + 2 * p);
      for (int i = 0; i < Vectors; ++i) sums[key][i] = simd::dot_add(sums[key][i], query[i], pair);
    }
  }
  for (int key = 0; key < Keys; ++key)
    for (int i = 0; i < Vectors; ++i) simd::store(sums_t + key * lanes + i * width, sums[key][i]);
}

// score_product for int8 rows of k: scores[h][r] = q_h . k_r times unit[h] and the row's scale,
// for the heads of q_pairs (Vectors registers of lanes), up to a multiple of simd::width rows
// (those past `rows` are of zero codes). The codes widen to words a block of keys at a time.
template <int HeadDim, int Vectors>
void score_product_integer(const std::int8_t* k, int rows, const std::int32_t* q_pairs, const float* unit,
                           const float* row_scale, float (*scores)[tile_rows], RowsAhead<std::int8_t> ahead) {
  constexpr int width = simd::width, lanes = Vectors * width, keys = Vectors <= 2 ? 8 : 4;
  constexpr int vectors = HeadDim / simd::word_width;  // of words per row
  alignas(64) float scores_t[tile_rows][lanes];
  alignas(64) std::int32_t sums_t[keys][lanes];
  alignas(64) std::int16_t block[keys * HeadDim];
  const int padded = (rows + width - 1) / width * width;
  for (int first = 0; first < padded; first += keys) {
    const int count = std::clamp(rows - first, 0, keys);
    for (int r = first; r < first + count; ++r) ahead.template ask<HeadDim>(r);
    for (int key = 0; key < keys; ++key)
      for (int j = 0; j < vectors; ++j)
        simd::store(block + key * HeadDim + j * simd::word_width,
                    key < count ? simd::load_words(k + (first + key) * HeadDim + j * simd::word_width)
                                : simd::zero_ints());
    score_key_pairs<HeadDim, Vectors, keys>(block, q_pairs, &sums_t[0][0]);
    for (int key = 0; key < keys; ++key) {
      const simd::floats scale = simd::broadcast(key < count && row_scale != nullptr ? row_scale[first + key] : 1.0f);
      for (int i = 0; i < Vectors; ++i)
        simd::store(scores_t[first + key] + i * width,
                    simd::mul(simd::to_float(simd::load_ints(sums_t[key] + i * width)), simd::mul(simd::load(unit + i * width), scale)));
    }
  }
  transpose_scores<Vectors>(scores_t, padded, scores);
}

// score_product_integer for `heads` rows of q_pairs ([HeadDim / 2][lanes]).
template <int HeadDim>
void score_product_integer(const std::int8_t* k, int rows, const std::int32_t* q_pairs, const float* unit, int heads,
                           const float* row_scale, float (*scores)[tile_rows], RowsAhead<std::int8_t> ahead) {
  switch ((heads + simd::width - 1) / simd::width) {
    case 1: return score_product_integer<HeadDim, 1>(k, rows, q_pairs, unit, row_scale, scores, ahead);
    case 2: return score_product_integer<HeadDim, 2>(k, rows, q_pairs, unit, row_scale, scores, ahead);
    case 3: return score_product_integer<HeadDim, 3>(k, rows, q_pairs, unit, row_scale, scores, ahead);
    default: return score_product_integer<HeadDim, 4>(k, rows, q_pairs, unit, row_scale, scores, ahead);
  }
}

// The codes of `rows` integer rows of v interleaved into word pairs as load_word_pairs makes
// them, once per tile for the passes of more than 4 heads (an odd last row paired with itself),
// at word_pairs_at: [(rows + 1) / 2][HeadDim / 64][pair_vectors] vectors of words.
template <int HeadDim, class Storage>
void pack_word_pairs(const Storage* v, int rows, std::int16_t* out) {
  constexpr int pairs = simd::pair_vectors, block = pairs * simd::width, units = elements_per_unit<Storage>;
  for (int r = 0; r < rows; r += 2) {
    const Storage* a = v + r * HeadDim / units;  // as accumulate_rows_integer pairs them
    const Storage* b = r + 1 < rows ? a + HeadDim / units : a;
    for (int j = 0; j < HeadDim; j += block) {
      simd::words codes[pairs];
      simd::load_word_pairs(a + j / units, b + j / units, codes);
      for (int i = 0; i < pairs; ++i) simd::store(out + word_pairs_at<HeadDim>(r, j) + i * simd::word_width, codes[i]);
    }
  }
}
#endif

#else  // no SIMD: declared for the discarded branches of accumulate(), never instantiated

template <int HeadDim>
void softmax_tile(float (*scores)[tile_rows], int heads, int rows, OnlineSoftmax* state, float* acc, float* lanes);
template <int HeadDim, int Heads, class Storage>
void score_rows(const Storage* k, int rows, const float* q, float (*scores)[tile_rows], RowsAhead<Storage> ahead);
template <int HeadDim, int Heads, class Storage, class Ahead = RowsAhead<Storage>>
void accumulate_rows(const Storage* v, int rows, const float (*p)[tile_rows], float* acc, Ahead ahead);
template <int HeadDim, class Storage>
void pack_rows(const Storage* rows, int count, int padded, float* out);
template <int HeadDim, int Heads>
void score_key_group(const int4x2* group, int first, int count, const float* q, float (*scores)[tile_rows],
                     RowsAhead<int4x2> ahead);

#endif

#if KVCACHE_SIMD_WIDTH != 16  // declared for the discarded branches, never instantiated
template <int HeadDim>
void transpose_queries(const float* q, int heads, float* q_t);
template <int HeadDim, class Storage>
void score_product(const Storage* k, int rows, const float* q_t, int heads, float (*scores)[tile_rows],
                   RowsAhead<Storage> ahead);
#endif

#if !defined(KVCACHE_SIMD_INTEGER_DOT)  // declared for the discarded branches, never instantiated
template <int HeadDim, int Heads, class Storage>
void score_rows_integer(const Storage* k, int rows, const std::int16_t* q, const float* unit, const float* row_scale,
                        const float* bias, float (*scores)[tile_rows], int column, RowsAhead<Storage> ahead);
template <int HeadDim, int Heads>
void score_key_group_integer(const int4x2* group, int first, int count, const std::int16_t* q, const float* unit,
                             const float* bias, float (*scores)[tile_rows], int column, RowsAhead<int4x2> ahead);
template <int HeadDim, int Heads, bool Packed, class Storage>
void accumulate_rows_integer(const Storage* v, int rows, const float (*p)[tile_rows], float* acc,
                             RowsAhead<Storage> ahead, const std::int16_t* packed);
template <int HeadDim>
void round_group_queries(const float* q, int heads, const float* params, float* scaled, std::int16_t* words,
                         float* unit, float* bias);
void round_queries(const float* q, int heads, int head_dim, std::int16_t* words, float* unit);
#endif

#if !defined(KVCACHE_SIMD_INTEGER_DOT) || KVCACHE_SIMD_WIDTH != 16  // declared for the discarded branches
template <int HeadDim>
void transpose_query_pairs(const std::int16_t* q, int heads, std::int32_t* q_pairs, float* unit);
template <int HeadDim>
void score_product_integer(const std::int8_t* k, int rows, const std::int32_t* q_pairs, const float* unit, int heads,
                           const float* row_scale, float (*scores)[tile_rows], RowsAhead<std::int8_t> ahead);
template <int HeadDim, class Storage>
void pack_word_pairs(const Storage* v, int rows, std::int16_t* out);
#endif

// Codes scored and accumulated with integer multiply-adds (AVX-512 VNNI, AVX2) against queries and
// weights rounded to 16-bit integers: int8 and int4 (uses_integer_dot_products below says what
// the rounding costs).
template <class Storage>
inline constexpr bool integer_dot =
#if defined(KVCACHE_SIMD_INTEGER_DOT)
    std::same_as<Storage, std::int8_t> || std::same_as<Storage, int4x2>;
#else
    false;
#endif

#if defined(KVCACHE_SIMD_INTEGER_DOT)
// words = round(row / unit), unit = largest / 32767 (largest = max |row|, >= 0), saturating.
// Returns unit (0 for an all-zero row, whose words are 0).
inline float round_to_unit(const float* row, int count, float largest, std::int16_t* words) {
  constexpr float top_word = 32767.0f;
  simd::round_to_words(row, count, largest > 0.0f ? top_word / largest : 0.0f, words);
  return largest / top_word;
}

// words[h] = round(q_h / unit[h]), unit[h] = max|q_h| / 32767.
//   q, words: [heads][head_dim], head_dim a multiple of 64
inline void round_queries(const float* q, int heads, int head_dim, std::int16_t* words, float* unit) {
  for (int h = 0; h < heads; ++h) {
    const float* row = q + static_cast<std::size_t>(h) * head_dim;
    simd::floats top = simd::zero();
    for (int d = 0; d < head_dim; d += simd::width) top = simd::max(top, simd::abs(simd::load(row + d)));
    unit[h] = round_to_unit(row, head_dim, simd::max(top), words + static_cast<std::size_t>(h) * head_dim);
  }
}

// Group-quantized keys (int4) scored with integers: q * the group's channel scales rounded to
// words as round_queries does, and bias[h] = q_h . the channel minima (scale_queries below says
// why). Each step runs for every head before the next, so that the heads' reductions overlap
// (one head at a time measured 180 instead of 145 cycles for 4 heads).
//   q, words, scaled (room for q * scales): [heads][HeadDim]; params: [2][HeadDim] (scales, then minima)
template <int HeadDim>
void round_group_queries(const float* q, int heads, const float* params, float* scaled, std::int16_t* words,
                         float* unit, float* bias) {
  alignas(64) float largest[heads_per_pass];
  for (int h = 0; h < heads; ++h) {
    const std::size_t row = static_cast<std::size_t>(h) * HeadDim;
    simd::floats top = simd::zero(), dot = simd::zero();
    for (int d = 0; d < HeadDim; d += simd::width) {
      const simd::floats query = simd::load(q + row + d), product = simd::mul(query, simd::load(params + d));
      simd::store(scaled + row + d, product);
      top = simd::max(top, simd::abs(product));
      dot = simd::fma(query, simd::load(params + HeadDim + d), dot);
    }
    largest[h] = simd::max(top);
    bias[h] = simd::sum(dot);
  }
  for (int h = 0; h < heads; ++h) {
    const std::size_t row = static_cast<std::size_t>(h) * HeadDim;
    unit[h] = round_to_unit(scaled + row, HeadDim, largest[h], words + row);
  }
}
#endif

// row[d] = the stored value (the code, for quantized types) of element d, as fp32.
template <class Storage>
inline void load_row(const Storage* stored, int head_dim, float* row) {
  for (int d = 0; d < head_dim; ++d) row[d] = to_float(stored[d]);
}
inline void load_row(const int4x2* stored, int head_dim, float* row) {
  for (int d = 0; d < head_dim; ++d) row[d] = int4_code_at(stored, d);
}
// row[d] = the code of channel d of token `token` of an int4 key group, as fp32.
inline void load_key_row(const int4x2* group, int token, int head_dim, float* row) {
  for (int d = 0; d < head_dim; ++d) row[d] = int4_key_code_at(group, token, d);
}

// Group-quantized keys (int4): a key is minimum + code * scale per channel, so
// q . k = (q * scale) . code + q . minimum. Fills q_group [heads][head_dim] with q * scale and
// bias [heads] with q . minimum for the group whose parameters ([2][head_dim]) are given.
inline void scale_queries(const float* q, int heads, int head_dim, const float* params, float* q_group, float* bias) {
  using Vector = Eigen::Map<const Eigen::VectorXf>;
  const Vector scale(params, head_dim), minimum(params + head_dim, head_dim);
  for (int h = 0; h < heads; ++h) {
    const Vector query(q + static_cast<std::size_t>(h) * head_dim, head_dim);
    Eigen::Map<Eigen::VectorXf>(q_group + static_cast<std::size_t>(h) * head_dim, head_dim) = query.cwiseProduct(scale);
    bias[h] = query.dot(minimum);
  }
}

// Group-quantized values: a value row is minimum + code * scale, so weight * row adds
// (weight * scale) * code to acc and weight * minimum to each of its elements. Turns the tile's
// weights into weight * scale and returns in minimum_weight [heads] the sum of weight * minimum.
//   params: [rows][2] (scale, minimum)
inline void scale_weights(float (*weights)[tile_rows], int heads, int rows, const float* params, float* minimum_weight) {
  alignas(64) float scale_data[tile_rows], minimum_data[tile_rows];
  for (int r = 0; r < rows; ++r) scale_data[r] = params[2 * r], minimum_data[r] = params[2 * r + 1];
  const Eigen::Map<const Eigen::VectorXf> scale(scale_data, rows), minimum(minimum_data, rows);
  for (int h = 0; h < heads; ++h) {
    Eigen::Map<Eigen::VectorXf> weight(weights[h], rows);
    minimum_weight[h] = weight.dot(minimum);
    weight = weight.cwiseProduct(scale);
  }
}

// Floats aligned for the widest SIMD register the build uses.
using AlignedFloats = std::vector<float, Eigen::aligned_allocator<float>>;

// What a per-thread buffer of accumulate() holds.
enum class Buffer {
  group_queries,       // floats: the queries times a K group's channel scales (int4)
  rounded_queries,     // words: the queries rounded for integer scoring
  transposed_queries,  // floats: the queries of score_product
  packed_values,       // floats: a V tile as fp32 rows (passes of score_product)
  query_pairs,         // 32-bit word pairs: the queries of score_product_integer
  packed_pairs,        // words: a V tile's codes as word pairs (integer passes of more than 4 heads)
  transposed_keys,     // floats: a K tile, element-major (the portable path's scoring)
};

// Per-thread room for `count` T, 64-byte aligned, one buffer per use; only grows.
template <class T, Buffer use>
T* thread_buffer(std::size_t count) {
  thread_local std::vector<T, Eigen::aligned_allocator<T>> buffer;
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

// scores[h][r] *= scale[r] for every head of a tile.
inline void scale_scores(float (*scores)[tile_rows], int heads, int rows, const float* scale) {
  int vectorized = 0;
#if KVCACHE_SIMD_WIDTH > 0
  vectorized = rows / simd::width * simd::width;
  for (int r = 0; r < vectorized; r += simd::width) {
    const simd::floats factor = simd::load(scale + r);
    for (int h = 0; h < heads; ++h) simd::store(scores[h] + r, simd::mul(factor, simd::load(scores[h] + r)));
  }
#endif
  for (int h = 0; h < heads; ++h)
    for (int r = vectorized; r < rows; ++r) scores[h][r] *= scale[r];
}

// Soft-capped logits (cap > 0): soft_cap * tanh(logit / soft_cap). A cache with key offsets
// stores key - offset, whose scores lack q . offset; softmax cancels that shift, the cap does
// not, so each row's shift is added back first.
struct SoftCap {
  float cap = 0.0f;
  const float* shift = nullptr;  // [rows] of the pass (null: none), q . key offset
};

// Adds to (softmax, acc) the keys visible to the query at position `query` among positions
// [lo, hi), for `heads` query heads of kv-head `kv_head`.
//   q:   [heads][head_dim], already multiplied by the scale
//   acc: [heads][head_dim], unnormalized: sum of exp(s - softmax.max) * v
template <int HeadDim, class Storage>
void accumulate(const SequenceView<Storage>& view, int kv_head, int query, int lo, int hi,
                const float* q, int heads, SoftCap soft_cap, OnlineSoftmax* softmax, float* acc) {
  constexpr int Extent = HeadDim == 0 ? Eigen::Dynamic : HeadDim;
  constexpr int Capacity = HeadDim == 0 ? ModelShape::max_head_dim : HeadDim;
  using Row = Eigen::Matrix<float, Extent, 1>;
  const int head_dim = HeadDim == 0 ? view.head_dim : HeadDim;
  alignas(64) float scores[heads_per_pass][tile_rows];  // [heads][rows] of the current tile
  // The SIMD path's sums of exp(score - max) per head and lane, added to softmax[h].sum at the end.
  constexpr int sum_width = std::max(KVCACHE_SIMD_WIDTH, 1);
  alignas(64) float sum_lanes[heads_per_pass][sum_width];
  if constexpr (use_simd<HeadDim>) std::fill_n(&sum_lanes[0][0], heads * sum_width, 0.0f);
  const int passes = (heads + most_heads - 1) / most_heads;  // over a tile (dispatch_heads)

  std::pair<const Storage*, const Storage*> following{nullptr, nullptr};  // next segment's rows
  float* q_group = nullptr;  // group-quantized keys: q * the group's channel scales (before q_words)
  alignas(64) float bias[heads_per_pass];
  const float* scaled_group = nullptr;  // the parameters q_group and bias were made with
  std::int16_t* q_words = nullptr;       // integer scoring: q (or q_group) rounded to words
  alignas(64) float q_unit[heads_per_pass];
  if constexpr (use_simd<HeadDim> && integer_dot<Storage>) {
    q_words = thread_buffer<std::int16_t, Buffer::rounded_queries>(static_cast<std::size_t>(heads_per_pass) * head_dim);
    if constexpr (!GroupQuantizedStorage<Storage>) round_queries(q, heads, head_dim, q_words, q_unit);
  }
  // Passes of more than 4 heads over rows scored in fp32 (score_product): the transposed
  // queries, and room for a V tile as fp32 rows; made on first use.
  float* q_t = nullptr;
  float* packed_v = nullptr;  // [product_rows][HeadDim]
  float* keys_t = nullptr;    // the portable path's transposed K tile, made on first use
  // Such passes over integer codes (AVX-512): the rounded queries of int8 keys as word pairs,
  // and room for a V tile's codes as word pairs; made on first use.
  std::int32_t* q_pairs = nullptr;
  std::int16_t* packed_pairs = nullptr;  // [tile_rows][HeadDim]
  // Segments of the cache's storage, or the full-precision residual rows of group-quantized
  // types (S = float).
  auto run_rows = [&]<class S>(const Segment<S>& segment, int begin, int end) {
    constexpr bool group_quantized = GroupQuantizedStorage<S>;
    constexpr bool integer = use_simd<HeadDim> && integer_dot<S>;  // scales and bias applied in scoring
    constexpr bool product = use_simd<HeadDim> && simd::width == 16 && !integer && !group_quantized;
    const bool product_pass = product && heads > most_heads;
    if constexpr (product)
      if (product_pass && q_t == nullptr) {
        q_t = thread_buffer<float, Buffer::transposed_queries>(static_cast<std::size_t>(heads_per_pass) * HeadDim);
        transpose_queries<HeadDim>(q, heads, q_t);
        packed_v = thread_buffer<float, Buffer::packed_values>(static_cast<std::size_t>(product_rows) * HeadDim);
      }
    constexpr bool integer_product = integer && simd::width == 16;
    const bool integer_product_pass = integer_product && heads > most_heads;
    if constexpr (integer_product)
      if (integer_product_pass && packed_pairs == nullptr) {
        packed_pairs = thread_buffer<std::int16_t, Buffer::packed_pairs>(static_cast<std::size_t>(tile_rows) * HeadDim);
        if constexpr (!group_quantized) {
          q_pairs = thread_buffer<std::int32_t, Buffer::query_pairs>(static_cast<std::size_t>(heads_per_pass) * HeadDim / 2);
          transpose_query_pairs<HeadDim>(q_words, heads, q_pairs, q_unit);
        }
      }
    const int units = head_dim / elements_per_unit<S>;  // storage units per row
    // K parameter groups from one kv-head's to the next (int4 keeps them per kv-head like the rows)
    const std::size_t head_groups = group_quantized ? segment.head_stride / units / view.group_tokens : 0;
    const std::size_t head_offset = static_cast<std::size_t>(kv_head) * segment.head_stride;
    auto group_end = [&](int position) { return (position / view.group_tokens + 1) * view.group_tokens; };
    // Group-quantized keys: makes the queries (and bias) of the K group holding `position` current.
    auto use_group = [&](const Segment<S>& of, int position) {
      const int group = position / view.group_tokens - of.first_position / view.group_tokens;
      const float* params = of.k_scale + (kv_head * head_groups + group) * 2 * head_dim;
      if (params == scaled_group) return;  // a group spans tiles
      if (group_end(position) < of.first_position + of.count)
        prefetch_lines(params + 2 * head_dim, 2 * head_dim * sizeof(float));
      if (q_group == nullptr) q_group = thread_buffer<float, Buffer::group_queries>(static_cast<std::size_t>(heads_per_pass) * head_dim);
      if constexpr (integer)
        round_group_queries<HeadDim>(q, heads, params, q_group, q_words, q_unit, bias);
      else
        scale_queries(q, heads, head_dim, params, q_group, bias);
      scaled_group = params;
    };
    const int most_rows = rows_per_tile(units * sizeof(S), heads, group_quantized, integer_product);
    for (int tile = begin, rows = 0; tile < end; tile += rows) {
      rows = std::min(most_rows, end - tile);
      if constexpr (group_quantized && !integer)  // one K group per tile (integer scoring takes them in parts)
        rows = std::min(rows, group_end(tile) - tile);
      const std::size_t first_row = static_cast<std::size_t>(tile - segment.first_position) * units;
      const S* k = segment.k + head_offset + first_row;  // [rows][head_dim]
      const S* v = segment.v + head_offset + first_row;  // [rows][head_dim]
      // Rows read next: later in this segment (by this range, or by the task of the next token
      // range, which is likely this thread's next), or the start of the next segment.
      const bool last_tile = tile + rows >= segment.first_position + segment.count;
      const S* next_k = k + rows * units;
      const S* next_v = v + rows * units;
      if (last_tile) {
        next_k = next_v = nullptr;
        if constexpr (std::same_as<S, Storage>) next_k = following.first, next_v = following.second;
      } else {
        // The first line of the next tile's K and of its V, asked into L2 as this tile starts,
        // keeps the hardware's L2 stream prefetcher ahead of the rows the kernels ask into L1
        // a tile ahead (as a paged block does for the next block, in accumulate below).
        prefetch_line<Into::l2>(next_k);
        prefetch_line<Into::l2>(next_v);
      }
      // The scales and parameters of quantized rows lie apart from the rows, in streams of their
      // own that the hardware prefetcher follows too late (one thread, int8 at T = 16k: 1.17x
      // faster with the next tile's asked for; int4 1.16x): they are asked for a tile ahead too.
      const float* q_tile = q;
      const float* v_params = nullptr;  // group-quantized: [rows][2] (scale, minimum) of the V rows
      if constexpr (group_quantized) {
        v_params = segment.v_scale + (kv_head * head_groups * view.group_tokens +
                                      static_cast<std::size_t>(tile - segment.first_position)) * 2;
        if (!last_tile) prefetch_lines(v_params + 2 * rows, 2 * rows * sizeof(float));
        if constexpr (!integer) {
          use_group(segment, tile);
          q_tile = q_group;
        }
      }
      // Quantized rows: the scale of a K row multiplies its scores, that of a V row its weights.
      const float *k_scale = nullptr, *v_scale = nullptr;
      if (!group_quantized && segment.k_scale != nullptr) {
        const std::size_t scale_offset = static_cast<std::size_t>(kv_head) * (segment.head_stride / head_dim) +
                                         static_cast<std::size_t>(tile - segment.first_position);
        k_scale = segment.k_scale + scale_offset;
        v_scale = segment.v_scale + scale_offset;
        if (!last_tile) {
          prefetch_lines(k_scale + rows, rows * sizeof(float));
          prefetch_lines(v_scale + rows, rows * sizeof(float));
        }
      }
      if constexpr (integer) {
        bool scored = false;
        if constexpr (integer_product && !group_quantized)
          if (integer_product_pass) {
            score_product_integer<HeadDim>(k, rows, q_pairs, q_unit, heads, k_scale, scores, RowsAhead<S>{next_k});
            scored = true;
          }
        // In parts of one K group each for int4 (whose queries depend on the group), else whole.
        for (int part = 0, part_rows = 0; !scored && part < rows; part += part_rows) {
          part_rows = rows - part;
          if constexpr (group_quantized) {
            part_rows = std::min(part_rows, group_end(tile + part) - (tile + part));
            use_group(segment, tile + part);
          }
          const std::size_t offset = static_cast<std::size_t>(part) * units;
          for (int first = 0; first < heads;)  // K tile stays in L1 across the chunks
            first += dispatch_heads(heads - first, [&](auto chunk) {
              constexpr int chunk_heads = decltype(chunk)::value;
              const std::int16_t* q_chunk = q_words + static_cast<std::size_t>(first) * HeadDim;
              const RowsAhead<S> ahead{next_k == nullptr ? nullptr : next_k + offset, first / most_heads, passes};
              if constexpr (group_quantized) {
                const int token = (tile + part) % view.group_tokens;  // in its group
                score_key_group_integer<HeadDim, chunk_heads>(k + offset - static_cast<std::size_t>(token) * units, token,
                                                              part_rows, q_chunk, q_unit + first, bias + first,
                                                              scores + first, part, ahead);
              } else {
                score_rows_integer<HeadDim, chunk_heads>(k + offset, part_rows, q_chunk, q_unit + first,
                                                         k_scale == nullptr ? nullptr : k_scale + part, nullptr,
                                                         scores + first, part, ahead);
              }
            });
        }
      } else if constexpr (use_simd<HeadDim>) {
        if (product_pass) {
          score_product<HeadDim>(k, rows, q_t, heads, scores, RowsAhead<S>{next_k});
        } else {
          for (int first = 0; first < heads;)  // K tile stays in L1 across the chunks
            first += dispatch_heads(heads - first, [&](auto chunk) {
              if constexpr (group_quantized) {
                const int token = tile % view.group_tokens;  // the tile is in one K group
                score_key_group<HeadDim, decltype(chunk)::value>(
                    k - static_cast<std::size_t>(token) * units, token, rows, q_tile + static_cast<std::size_t>(first) * HeadDim,
                    scores + first, {next_k, first / most_heads, passes});
              } else {
                score_rows<HeadDim, decltype(chunk)::value>(k, rows, q_tile + static_cast<std::size_t>(first) * HeadDim,
                                                            scores + first, {next_k, first / most_heads, passes});
              }
            });
        }
      } else {
        alignas(64) float row_data[Capacity];
        auto load_key = [&](int r) {
          if constexpr (group_quantized) {
            const int token = (tile + r) % view.group_tokens;
            load_key_row(k + static_cast<std::size_t>(r - token) * units, token, head_dim, row_data);
          } else {
            load_row(k + static_cast<std::size_t>(r) * units, head_dim, row_data);
          }
        };
        if (head_dim <= small_head_dim) {
          // The tile's keys transposed, [head_dim][tile_rows]: each query element scales 16 keys'
          // elements at once, where a dot product per row and head is too short to vectorize.
          if (keys_t == nullptr)
            keys_t = thread_buffer<float, Buffer::transposed_keys>(static_cast<std::size_t>(small_head_dim) * tile_rows);
          constexpr int block = 16;
          static_assert(tile_rows % block == 0);
          using Block = Eigen::Array<float, block, 1>;
          for (int r = 0; r < rows; ++r) {
            load_key(r);
            for (int d = 0; d < head_dim; ++d) keys_t[d * tile_rows + r] = row_data[d];
          }
          // The last block's rows past `rows` are scored and dropped: zeros, not another tile's
          // stale rows (or never-written memory, or denormals that would slow the multiply-adds).
          const int padded = (rows + block - 1) / block * block;
          for (int d = 0; d < head_dim; ++d) std::fill(keys_t + d * tile_rows + rows, keys_t + d * tile_rows + padded, 0.0f);
          for (int h = 0; h < heads; ++h) {
            const float* q_head = q_tile + static_cast<std::size_t>(h) * head_dim;
            for (int first = 0; first < rows; first += block) {
              Block sums = Block::Zero();
              for (int d = 0; d < head_dim; ++d)
                sums += q_head[d] * Eigen::Map<const Block>(keys_t + d * tile_rows + first);
              std::copy_n(sums.data(), std::min(block, rows - first), scores[h] + first);
            }
          }
        } else {
          Eigen::Map<Row> row(row_data, head_dim);
          for (int r = 0; r < rows; ++r) {
            load_key(r);
            for (int h = 0; h < heads; ++h)
              scores[h][r] = Eigen::Map<const Row>(q_tile + static_cast<std::size_t>(h) * head_dim, head_dim).dot(row);
          }
        }
      }
      if constexpr (!integer) {
        if constexpr (group_quantized)
          for (int h = 0; h < heads; ++h)
            for (int r = 0; r < rows; ++r) scores[h][r] += bias[h];
        if (k_scale != nullptr) scale_scores(scores, heads, rows, k_scale);
      }
      if (soft_cap.cap > 0.0f)
        for (int h = 0; h < heads; ++h) {
          Eigen::Map<Eigen::ArrayXf> s(scores[h], rows);
          const float shift = soft_cap.shift == nullptr ? 0.0f : soft_cap.shift[h];
          s = soft_cap.cap * ((s + shift) / soft_cap.cap).tanh();
        }
      if constexpr (use_simd<HeadDim>) {
        softmax_tile<HeadDim>(scores, heads, rows, softmax, acc, &sum_lanes[0][0]);
      } else {
        for (int h = 0; h < heads; ++h) {
          Eigen::Map<Eigen::ArrayXf> s(scores[h], rows);
          const float factor = softmax[h].raise_max(s.maxCoeff());
          if (factor != 1.0f) Eigen::Map<Row>(acc + static_cast<std::size_t>(h) * head_dim, head_dim) *= factor;
          s = (s - softmax[h].max).exp();
          softmax[h].sum += s.sum();
        }
      }
      alignas(64) float minimum_weight[heads_per_pass];
      if constexpr (group_quantized) {
        scale_weights(scores, heads, rows, v_params, minimum_weight);
      } else if (v_scale != nullptr) {
        scale_scores(scores, heads, rows, v_scale);
      }
      if constexpr (integer) {
        auto accumulate_chunks = [&](auto packed) {
          for (int first = 0; first < heads;)  // V tile stays in L1 across the chunks
            first += dispatch_heads(heads - first, [&](auto chunk) {
              accumulate_rows_integer<HeadDim, decltype(chunk)::value, decltype(packed)::value>(
                  v, rows, scores + first, acc + static_cast<std::size_t>(first) * HeadDim,
                  {next_v, first / most_heads, passes}, packed_pairs);
            });
        };
        // A pass of more than 4 heads interleaves a V tile's codes once, not once per 4 heads.
        bool packed = false;
        if constexpr (integer_product)
          if (integer_product_pass) {
            pack_word_pairs<HeadDim>(v, rows, packed_pairs);
            accumulate_chunks(std::true_type{});
            packed = true;
          }
        if (!packed) accumulate_chunks(std::false_type{});
      } else if constexpr (use_simd<HeadDim>) {
        // A product pass converts a V tile of f16, bf16 or fp8 once, not once per 4 heads.
        bool packed = false;
        if constexpr (product && !std::same_as<S, float>)
          if (product_pass) {
            pack_rows<HeadDim>(v, rows, rows, packed_v);
            for (int first = 0; first < heads;)  // V tile stays in L1 across the chunks
              first += dispatch_heads(heads - first, [&](auto chunk) {
                accumulate_rows<HeadDim, decltype(chunk)::value>(packed_v, rows, scores + first,
                                                                 acc + static_cast<std::size_t>(first) * HeadDim,
                                                                 RowsAhead<S>{next_v, first / most_heads, passes});
              });
            packed = true;
          }
        if (!packed)
          for (int first = 0; first < heads;)  // V tile stays in L1 across the chunks
            first += dispatch_heads(heads - first, [&](auto chunk) {
              accumulate_rows<HeadDim, decltype(chunk)::value>(v, rows, scores + first,
                                                               acc + static_cast<std::size_t>(first) * HeadDim,
                                                               {next_v, first / most_heads, passes});
            });
      } else {
        alignas(64) float row_data[Capacity];
        Eigen::Map<Row> row(row_data, head_dim);
        for (int r = 0; r < rows; ++r) {
          load_row(v + static_cast<std::size_t>(r) * units, head_dim, row_data);
          for (int h = 0; h < heads; ++h) {
            float* out = acc + static_cast<std::size_t>(h) * head_dim;
            const float weight = scores[h][r];
            if (head_dim <= small_head_dim) {  // a plain loop: Eigen's dynamic-size setup outweighs it
              for (int d = 0; d < head_dim; ++d) out[d] += weight * row_data[d];
            } else {
              Eigen::Map<Row>(out, head_dim) += weight * row;
            }
          }
        }
      }
      if constexpr (group_quantized)
        for (int h = 0; h < heads; ++h)
          Eigen::Map<Row>(acc + static_cast<std::size_t>(h) * head_dim, head_dim).array() += minimum_weight[h];
    }
  };

  // Visible keys: [0, sinks_end) and [recent_begin, query], both clipped to [lo, hi).
  const int recent_begin = std::max(view.first_needed(query), lo);
  const int recent_end = std::min(query + 1, hi);
  const int sinks_end = view.window == 0 ? 0 : std::min({view.sink_tokens, view.first_needed(query), query + 1, hi});
  auto visit = [&](int i) {
    const Segment<Storage> segment = view.segment(i);
    if (i + 1 < view.segment_count()) {
      const Segment<Storage> next = view.segment(i + 1);
      const std::size_t offset = static_cast<std::size_t>(kv_head) * next.head_stride;
      following = {next.k + offset, next.v + offset};
      // A page's per-row scales lie apart from its rows, where no prefetcher looks ahead.
      if constexpr (!GroupQuantizedStorage<Storage>)
        if (next.k_scale != nullptr) {
          const std::size_t scale_offset = static_cast<std::size_t>(kv_head) * (next.head_stride / view.head_dim);
          prefetch_line(next.k_scale + scale_offset);
          prefetch_line(next.v_scale + scale_offset);
        }
    } else {
      following = {nullptr, nullptr};
    }
    // A paged block's successor lies anywhere in the pool, where no hardware prefetcher follows:
    // its first two lines of K and of V, asked into L2 as this block starts, start one there.
    // Llama-3-8B f16 decode at T = 16k with shuffled blocks: 1.08-1.12x faster, consecutive
    // blocks 1.04-1.08x; asking two blocks ahead instead made consecutive blocks 1.15x slower.
    if (i >= view.direct_count && following.first != nullptr)
      for (int line = 0; line < 2; ++line) {
        prefetch_line<Into::l2>(reinterpret_cast<const char*>(following.first) + 64 * line);
        prefetch_line<Into::l2>(reinterpret_cast<const char*>(following.second) + 64 * line);
      }
    const int first = segment.first_position;
    const int last = first + segment.count;  // exclusive
    run_rows(segment, std::max(first, lo), std::min(last, sinks_end));
    run_rows(segment, std::max(first, recent_begin), std::min(last, recent_end));
  };
  for (int i = 0; i < view.direct_count; ++i) visit(i);
  // Blocks hold consecutive positions in order, so only those overlapping the two visible
  // ranges are visited: a task covering a token range of a long sequence touches its own blocks.
  if (view.block_count > 0) {
    const int tokens = view.block_tokens;
    int next_block = 0;
    auto visit_blocks = [&](int begin, int end) {
      if (begin >= end) return;
      const int last = std::min(view.block_count, (end + tokens - 1) / tokens);
      for (int block = std::max(next_block, begin / tokens); block < last; ++block) visit(view.direct_count + block);
      next_block = std::max(next_block, last);
    };
    visit_blocks(lo, sinks_end);
    visit_blocks(recent_begin, recent_end);
  }
  if (view.residual.count > 0) {  // the newest positions, after every stored one
    const int first = view.residual.first_position, last = first + view.residual.count;
    run_rows(view.residual, std::max(first, lo), std::min(last, sinks_end));
    run_rows(view.residual, std::max(first, recent_begin), std::min(last, recent_end));
  }
  if constexpr (use_simd<HeadDim>)
    for (int h = 0; h < heads; ++h) softmax[h].sum += std::accumulate(sum_lanes[h], sum_lanes[h] + sum_width, 0.0f);
}

// One unit of work: `heads` query heads of a group for `queries` consecutive query positions
// starting at `query`, keys in [lo, hi). Its partial result has queries * heads rows
// (<= heads_per_pass), query-major.
struct Task {
  int view;
  int kv_head;
  int heads;
  int query;
  int queries;
  int lo, hi;
  std::size_t q_offset;    // element offset of the first row's query (and output)
  std::size_t row_stride;  // elements from one query's rows to the next (q_heads * head_dim)
  int splits;              // tasks (consecutive, this one first) whose partials make one output
  // Where the task's rows lie in the scratch (place_partials): its softmax states from
  // Scratch::softmax[state_offset], its scaled queries and accumulators from element
  // partial_offset of Scratch::q and Scratch::acc.
  std::size_t state_offset = 0, partial_offset = 0;
};

// Per-thread scratch that only grows: task lists and partial results. The kernels read queries
// and accumulators a SIMD register at a time, so those rows must not straddle cache lines.
struct Scratch {
  std::vector<Task> tasks;
  std::vector<OnlineSoftmax> softmax;  // a state per row of every task
  AlignedFloats acc;                   // [rows of every task][head_dim]
  AlignedFloats q;                     // [rows of every task][head_dim] scaled queries
};

// Gives each task of `s` its rows in the scratch, one task after another, and grows the
// scratch to hold them. Each task's states and elements begin a whole number of 64-byte lines
// after the start of their array, so threads writing neighbouring tasks share no line (where
// the array starts on one: the floats do with AVX-512's 64-byte Eigen alignment). Its rows,
// not heads_per_pass rows per task: a decode task of 4 heads at head_dim 128 takes 2 KiB of
// accumulators instead of 32 KiB (a batch of 8 at T = 16k has 1024 tasks).
inline void place_partials(Scratch& s, int head_dim) {
  constexpr std::size_t line_floats = 16, line_states = 64 / sizeof(OnlineSoftmax);
  auto round_up = [](std::size_t n, std::size_t step) { return (n + step - 1) / step * step; };
  std::size_t states = 0, elements = 0;
  for (Task& task : s.tasks) {
    const auto rows = static_cast<std::size_t>(task.queries) * task.heads;
    task.state_offset = states;
    task.partial_offset = elements;
    states += round_up(rows, line_states);
    elements += round_up(rows * static_cast<std::size_t>(head_dim), line_floats);
  }
  if (s.softmax.size() < states) s.softmax.resize(states);
  if (s.acc.size() < elements) s.acc.resize(elements);
  if (s.q.size() < elements) s.q.resize(elements);
}
inline Scratch& scratch() {
  thread_local Scratch instance;
  return instance;
}

// Computes one task's partial result. Keys before the first query are visible to every query
// of the task, so all its rows share one pass over them (queries * heads rows per K/V row
// read); each query then adds its own causal part [query, its position].
template <int HeadDim, class Storage>
void run_task(const SequenceView<Storage>& view, const Task& task, const float* q, SoftCap soft_cap,
              OnlineSoftmax* softmax, float* acc, int head_dim) {
  const int rows = task.queries * task.heads;
  std::fill(softmax, softmax + rows, OnlineSoftmax{});
  std::fill(acc, acc + static_cast<std::size_t>(rows) * head_dim, 0.0f);
  if (task.queries == 1) {
    accumulate<HeadDim>(view, task.kv_head, task.query, task.lo, task.hi, q, task.heads, soft_cap, softmax, acc);
    return;
  }
  const int shared_end = std::min(task.hi, task.query);
  if (shared_end > task.lo)
    accumulate<HeadDim>(view, task.kv_head, task.query - 1, task.lo, shared_end, q, rows, soft_cap, softmax, acc);
  for (int i = 0; i < task.queries; ++i) {
    const std::size_t row = static_cast<std::size_t>(i) * task.heads;
    const SoftCap own{soft_cap.cap, soft_cap.shift == nullptr ? nullptr : soft_cap.shift + row};
    accumulate<HeadDim>(view, task.kv_head, task.query + i, std::max(task.lo, task.query), task.hi,
                        q + row * head_dim, task.heads, own, softmax + row, acc + row * head_dim);
  }
}

// Runs the tasks on the backend's threads and writes each output row, merging the partial
// softmax states of the splits of a task in order.
template <class Storage, class Q, class O>
void run_tasks(std::span<const SequenceView<Storage>> views, const Q* q, O* out, const AttentionParams& params,
               int head_dim) {
  Scratch& s = scratch();
  place_partials(s, head_dim);
  const float scale = params.scale.value_or(1.0f / std::sqrt(static_cast<float>(head_dim)));
  const std::size_t heads_span = static_cast<std::size_t>(head_dim);

  dispatch_head_dim(head_dim, [&](auto head_dim_constant) {
    constexpr int HeadDim = decltype(head_dim_constant)::value;
    auto work = [&](int t) {
      const Task& task = s.tasks[static_cast<std::size_t>(t)];
      float* q_scaled = s.q.data() + task.partial_offset;  // [queries][heads][head_dim]
      const SequenceView<Storage>& view = views[static_cast<std::size_t>(task.view)];
      const int rows = task.queries * task.heads;
      for (int i = 0; i < task.queries; ++i)
        for (std::size_t e = 0; e < task.heads * heads_span; ++e)
          q_scaled[i * task.heads * heads_span + e] = scale * to_float(q[task.q_offset + i * task.row_stride + e]);
      SoftCap soft_cap{params.soft_cap};
      float shift[heads_per_pass];
      if (soft_cap.cap > 0.0f && view.key_offset != nullptr) {  // before the rotation: keys are offset, then rotated
        using Row = Eigen::Map<const Eigen::VectorXf>;
        const Row offset(view.key_offset + static_cast<std::size_t>(task.kv_head) * heads_span, head_dim);
        for (int row = 0; row < rows; ++row) shift[row] = Row(q_scaled + row * heads_span, head_dim).dot(offset);
        soft_cap.shift = shift;
      }
      if (view.hadamard)  // q.k = (Hq).(Hk)
        for (int row = 0; row < rows; ++row) ::kvcache::detail::hadamard_transform(q_scaled + row * heads_span, head_dim);
      run_task<HeadDim>(view, task, q_scaled, soft_cap, s.softmax.data() + task.state_offset,
                        s.acc.data() + task.partial_offset, head_dim);
    };
    // A call too small to repay waking the workers (a small model, a short sequence) runs on
    // the calling thread: on a busy machine a sleeping worker can take longer to be scheduled
    // than the whole call.
    std::size_t elements = 0;
    for (const Task& task : s.tasks) elements += static_cast<std::size_t>(task.hi - task.lo) * heads_span;
    if (elements < inline_elements) {
      for (int t = 0; t < static_cast<int>(s.tasks.size()); ++t) work(t);
    } else {
      backend::cpu::pool().run(static_cast<int>(s.tasks.size()), work);
    }
  });

  for (std::size_t t = 0; t < s.tasks.size();) {
    const Task& first = s.tasks[t];
    const int rows = first.queries * first.heads;
    OnlineSoftmax* softmax = s.softmax.data() + first.state_offset;
    float* acc = s.acc.data() + first.partial_offset;
    for (int split = 1; split < first.splits; ++split) {
      const Task& other_task = s.tasks[t + static_cast<std::size_t>(split)];
      const OnlineSoftmax* other_softmax = s.softmax.data() + other_task.state_offset;
      const float* other_acc = s.acc.data() + other_task.partial_offset;
      for (int r = 0; r < rows; ++r) {
        float own = 0.0f, other = 0.0f;
        softmax[r].merge(other_softmax[r], &own, &other);
        Eigen::Map<Eigen::ArrayXf> mine(acc + static_cast<std::size_t>(r) * head_dim, head_dim);
        mine = mine * own + Eigen::Map<const Eigen::ArrayXf>(other_acc + static_cast<std::size_t>(r) * head_dim, head_dim) * other;
      }
    }
    for (int r = 0; r < rows; ++r) {
      O* target = out + first.q_offset + static_cast<std::size_t>(r / first.heads) * first.row_stride +
                  static_cast<std::size_t>(r % first.heads) * head_dim;
      float* source = acc + static_cast<std::size_t>(r) * head_dim;
      if (views[static_cast<std::size_t>(first.view)].hadamard) ::kvcache::detail::hadamard_transform(source, head_dim);  // V back
      const float inverse = 1.0f / softmax[r].sum;
      for (int d = 0; d < head_dim; ++d) target[d] = from_float<O>(source[d] * inverse);
    }
    t += static_cast<std::size_t>(first.splits);
  }
}

// Appends the tasks for `queries` consecutive queries from position `query` of view `view`
// (row_offset: element offset of the first query's q and out rows), each (kv-head, head chunk)
// split into `splits` token ranges of [first_key, last query].
inline void add_tasks(std::vector<Task>& tasks, int view, int kv_heads, int group, int query, int queries,
                      int first_key, int splits, std::size_t row_offset, std::size_t row_stride, int head_dim) {
  const int heads_per_task = std::min(heads_per_pass / queries, group);
  for (int kv_head = 0; kv_head < kv_heads; ++kv_head)
    for (int first_head = 0; first_head < group; first_head += heads_per_task) {
      const int heads = std::min(heads_per_task, group - first_head);
      const std::size_t offset = row_offset + (static_cast<std::size_t>(kv_head) * group + first_head) * head_dim;
      const long long keys = query + queries - first_key;
      for (int split = 0; split < splits; ++split)
        tasks.push_back({view, kv_head, heads, query, queries, first_key + static_cast<int>(keys * split / splits),
                         first_key + static_cast<int>(keys * (split + 1) / splits), offset, row_stride,
                         split == 0 ? splits : 1});
    }
}

}  // namespace detail

// Whether the kernels use integer multiply-adds for codes stored as Storage at this head_dim
// (int8 and int4 with AVX-512 VNNI or AVX2, at the fast head sizes): keys are dotted with queries
// rounded to 16-bit integers per head, and values weighted by softmax weights rounded to 16-bit
// integers per head and tile. Their results then differ from exact attention on the stored
// values by that rounding too: a score moves by at most max|q_h| / 65534 times the sum of |key
// codes| (times the key's scale), about 2^-16 of the largest possible score; a weight by at most
// 2^-16 of the largest weight of its tile of rows.
template <class Storage>
bool uses_integer_dot_products(int head_dim) {
  return dispatch_head_dim(head_dim, [](auto head_dim_constant) {
    return detail::use_simd<decltype(head_dim_constant)::value> && detail::integer_dot<Storage>;
  });
}

// Attention of the newest position of each view (one decode step for a batch of sequences).
//   q, out: [views.size()][q_heads][head_dim] of float, Eigen::half or Eigen::bfloat16
// @pre every view has length >= 1, the same kv_heads and head_dim, and holds every position its
//      query sees; q_heads a multiple of kv_heads. Query head h uses kv-head h / (q_heads / kv_heads).
template <class Storage, class Q, class O>
void decode(std::span<const SequenceView<Storage>> views, int q_heads, const Q* q, O* out,
            const AttentionParams& params) {
  if (views.empty()) return;
  const int head_dim = views[0].head_dim, kv_heads = views[0].kv_heads, group = q_heads / kv_heads;
  auto& tasks = detail::scratch().tasks;
  tasks.clear();
  for (std::size_t i = 0; i < views.size(); ++i) {
    const SequenceView<Storage>& view = views[i];
    const int query = view.length - 1;
    const int first_key = view.sink_tokens > 0 ? 0 : view.first_needed(query);  // ranges split evenly
    // The token ranges depend on the sequence alone, never on the batch or the thread count, so
    // a sequence's output is bit for bit the same in any batch and on any number of threads.
    const int splits = std::max(1, (query + 1 - first_key) / detail::split_rows);
    detail::add_tasks(tasks, static_cast<int>(i), kv_heads, group, query, 1, first_key, splits,
                      i * static_cast<std::size_t>(q_heads) * head_dim, 0, head_dim);
  }
  detail::run_tasks(views, q, out, params, head_dim);
}

// Attention for `queries` query tokens of one sequence, at positions [length - queries, length)
// of the view, causal against every earlier visible position.
//   q:   [queries][q_heads][head_dim] of float, Eigen::half or Eigen::bfloat16
//   out: [queries][q_heads][head_dim], any of those types
// @pre 1 <= queries <= view.length; q_heads a multiple of view.kv_heads; every position the
//      queries see is held (view.first_needed(length - queries) >= view.first_held).
template <class Storage, class Q, class O>
void prefill(const SequenceView<Storage>& view, int q_heads, int queries, const Q* q, O* out,
             const AttentionParams& params) {
  const int group = q_heads / view.kv_heads;
  // Queries share a pass over the keys before them in blocks of heads_per_pass rows (a sliding
  // window gives each query its own first key, so there each query runs alone).
  const int block = view.window == 0 ? std::max(1, detail::heads_per_pass / group) : 1;
  const std::size_t row_stride = static_cast<std::size_t>(q_heads) * view.head_dim;
  auto& tasks = detail::scratch().tasks;
  tasks.clear();
  for (int i = 0; i < queries; i += block) {
    const int count = std::min(block, queries - i);
    const int position = view.length - queries + i;
    detail::add_tasks(tasks, 0, view.kv_heads, group, position, count, 0, 1, i * row_stride, row_stride,
                      view.head_dim);
  }
  detail::run_tasks(std::span<const SequenceView<Storage>>(&view, 1), q, out, params, view.head_dim);
}

}  // namespace attention::cpu

KVCACHE_END_NAMESPACE
