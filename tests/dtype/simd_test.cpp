// The CPU kernels' SIMD conversions (detail/simd.hpp) against the scalar definitions: every
// code of every stored type decodes to the same float, and the integer multiply-add helpers
// (VNNI and AVX2 builds) give the words, orders and exact sums the kernels assume. Built for whatever
// instruction set the tests are compiled for (AVX-512, AVX2, or none: then nothing to check).
#include <kvcache/detail/simd.hpp>
#include <kvcache/dtype/float.hpp>
#include <kvcache/dtype/fp8.hpp>
#include <kvcache/dtype/int4.hpp>
#include <kvcache/dtype/int8.hpp>

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace kvcache {
namespace {

#if KVCACHE_SIMD_WIDTH > 0
namespace simd = detail::simd;
constexpr int width = simd::width;

std::vector<float> lanes(simd::floats v) {
  std::vector<float> out(width);
  simd::store(out.data(), v);
  return out;
}

// Bit-equal, or both NaN.
void expect_same(float actual, float expected, int code) {
  if (std::isnan(expected))
    EXPECT_TRUE(std::isnan(actual)) << "code " << code;
  else
    EXPECT_EQ(std::bit_cast<std::uint32_t>(actual), std::bit_cast<std::uint32_t>(expected))
        << "code " << code << ": " << actual << " vs " << expected;
}

// Loads every one of `count` codes, width at a time, and compares each with to_float.
template <class Code>
void expect_every_code_decodes(const std::vector<Code>& codes) {
  for (std::size_t first = 0; first < codes.size(); first += width) {
    const std::vector<float> loaded = lanes(simd::load(codes.data() + first));
    for (int i = 0; i < width; ++i)
      expect_same(loaded[i], to_float(codes[first + i]), static_cast<int>(first) + i);
  }
}

TEST(Simd, EveryEightBitCodeDecodesAsTheScalarPathDoes) {
  std::vector<std::int8_t> int8_codes;
  std::vector<fp8_e5m2_code> e5m2_codes;
  std::vector<fp8_e4m3_code> e4m3_codes;
  for (int code = 0; code < 256; ++code) {
    int8_codes.push_back(static_cast<std::int8_t>(code));
    e5m2_codes.push_back({static_cast<std::uint8_t>(code)});  // inf and NaN included
    // E4M3's NaN codes (S.1111.111) never reach a cache (NaN is stored as 0); the loader skips them.
    e4m3_codes.push_back({static_cast<std::uint8_t>((code & 0x7F) == 0x7F ? 0 : code)});
  }
  expect_every_code_decodes(int8_codes);
  expect_every_code_decodes(e5m2_codes);
  expect_every_code_decodes(e4m3_codes);
}

TEST(Simd, EverySixteenBitFloatDecodesExactly) {
  std::vector<Eigen::half> halves;
  std::vector<Eigen::bfloat16> bfloats;
  for (int bits = 0; bits < 65536; ++bits) {
    halves.push_back(Eigen::numext::bit_cast<Eigen::half>(static_cast<std::uint16_t>(bits)));
    bfloats.push_back(Eigen::numext::bit_cast<Eigen::bfloat16>(static_cast<std::uint16_t>(bits)));
  }
  expect_every_code_decodes(halves);
  expect_every_code_decodes(bfloats);
}

TEST(Simd, Int4CodesComeOutInElementOrder) {
  std::vector<int4x2> packed;
  for (int byte = 0; byte < 256; ++byte) packed.push_back({static_cast<std::uint8_t>(byte)});
  for (std::size_t first = 0; first < packed.size(); first += width / 2) {
    const std::vector<float> loaded = lanes(simd::load(packed.data() + first));
    for (int d = 0; d < width; ++d)
      EXPECT_EQ(loaded[d], int4_code_at(packed.data() + first, d)) << "byte " << first + d / 2 << ", nibble " << d % 2;
  }
}

// The float path's view of an int4 key group: a token per lane, a vector per channel.
TEST(Simd, KeyGroupCodesComeOutPerChannel) {
  std::vector<int4x2> group(int4_group_tokens * 8 / 2);  // one block of 8 channels
  for (std::size_t byte = 0; byte < group.size(); ++byte) group[byte].bits = static_cast<std::uint8_t>(byte * 53 + 5);
  for (int first = 0; first < int4_group_tokens; first += width) {
    simd::floats channels[8];
    simd::load_key_block(group.data() + first * 4, channels);
    for (int d = 0; d < 8; ++d) {
      const std::vector<float> got = lanes(channels[d]);
      for (int token = 0; token < width; ++token)
        EXPECT_EQ(got[token], int4_key_code_at(group.data(), first + token, d)) << "token " << first + token << ", channel " << d;
    }
  }
}

TEST(Simd, BlockLoadsEqualSingleLoads) {
  std::vector<int4x2> packed;
  for (int byte = 0; byte < 256; ++byte) packed.push_back({static_cast<std::uint8_t>(byte * 37 + 11)});
  for (std::size_t first = 0; first + 2 * width <= packed.size(); first += 2 * width) {  // 4 vectors of codes
    simd::floats block[4];
    simd::load_vectors(packed.data() + first, block);
    for (int i = 0; i < 4; ++i) {
      const std::vector<float> single = lanes(simd::load(packed.data() + first + i * width / 2)), got = lanes(block[i]);
      for (int d = 0; d < width; ++d) EXPECT_EQ(got[d], single[d]) << "byte " << first << ", vector " << i << ", lane " << d;
    }
  }
}

// The softmax masks a tile's tail with first_or: lanes [0, count) pass, even NaN, the rest are
// the fill, for every count the kernels use.
TEST(Simd, FirstOrKeepsTheFirstLanes) {
  std::vector<float> values(width);
  for (int i = 0; i < width; ++i) values[i] = 1.5f + static_cast<float>(i);
  values[0] = std::nanf("");
  for (int count = 0; count <= width; ++count) {
    const std::vector<float> got = lanes(simd::first_or(simd::load(values.data()), count, -INFINITY));
    for (int i = 0; i < width; ++i)
      expect_same(got[i], i < count ? values[i] : -INFINITY, count * 100 + i);
  }
}

#if defined(KVCACHE_SIMD_INTEGER_DOT)
// The partial loads and stores of the last rows of a tile: lanes past `count` read as 0 and
// leave memory untouched.
TEST(SimdIntegerDot, PartialLoadsAndStoresTouchOnlyTheirLanes) {
  std::vector<float> values(width);
  for (int i = 0; i < width; ++i) values[i] = -2.5f + static_cast<float>(i);
  for (int count = 1; count <= width; ++count) {
    const std::vector<float> got = lanes(simd::load_first(values.data(), count));
    std::vector<float> stored(width + 1, 7.0f);
    simd::store_first(stored.data(), simd::load(values.data()), count);
    for (int i = 0; i < width; ++i) {
      EXPECT_EQ(got[i], i < count ? values[i] : 0.0f) << "count " << count << ", lane " << i;
      EXPECT_EQ(stored[i], i < count ? values[i] : 7.0f) << "count " << count << ", lane " << i;
    }
    EXPECT_EQ(stored[width], 7.0f);
    EXPECT_EQ(lanes(simd::abs(simd::load(values.data())))[0], 2.5f);
  }
}

constexpr int word_width = simd::word_width;
constexpr int pair_vectors = simd::pair_vectors;

std::vector<std::int16_t> word_lanes(simd::words v) {
  std::vector<std::int16_t> out(word_width);
  std::memcpy(out.data(), &v, sizeof v);
  return out;
}

TEST(SimdIntegerDot, CodesWidenToWordsInTheDocumentedOrder) {
  std::vector<std::int8_t> int8_codes;
  for (int code = 0; code < 256; ++code) int8_codes.push_back(static_cast<std::int8_t>(code));
  for (int first = 0; first < 256; first += word_width) {
    const auto words = word_lanes(simd::load_words(int8_codes.data() + first));
    for (int i = 0; i < word_width; ++i) EXPECT_EQ(words[i], int8_codes[first + i]);
  }
}

// An int4 key group's block of 8 channels of `width` tokens comes out as word pairs (channel 2i,
// 2i + 1) per token, pairs 1 and 3 times 16, as score_key_group_integer dots them.
TEST(SimdIntegerDot, KeyGroupCodesComeOutAsChannelPairs) {
  std::vector<int4x2> group(int4_group_tokens * 8 / 2);  // one block of 8 channels
  for (std::size_t byte = 0; byte < group.size(); ++byte) group[byte].bits = static_cast<std::uint8_t>(byte * 37 + 11);
  for (int first = 0; first < int4_group_tokens; first += width) {
    simd::words pairs[4];
    simd::load_key_pairs(group.data() + first * 4, pairs);
    for (int i = 0; i < 4; ++i) {
      const auto words = word_lanes(pairs[i]);
      for (int token = 0; token < width; ++token)
        for (int odd = 0; odd < 2; ++odd)
          EXPECT_EQ(words[2 * token + odd], int4_key_code_at(group.data(), first + token, 2 * i + odd) * (i % 2 == 1 ? 16 : 1))
              << "token " << first + token << ", channel " << 2 * i + odd;
    }
  }
}

TEST(SimdIntegerDot, RoundsToWords) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> values(128);
  for (float& x : values) x = uniform(rng);
  values[5] = 1.0f, values[6] = -1.0f, values[7] = 0.5f / 32767.0f;  // extremes and a tie
  const float factor = 32767.0f;
  auto rounded = [&](int d) { return static_cast<std::int16_t>(std::nearbyint(values[d] * factor)); };
  std::vector<std::int16_t> words(128);
  simd::round_to_words(values.data(), 128, factor, words.data());
  for (int d = 0; d < 128; ++d) EXPECT_EQ(words[d], rounded(d)) << "element " << d;
  std::vector<float> beyond(32, 2.0f);  // saturates instead of wrapping
  simd::round_to_words(beyond.data(), 32, factor, words.data());
  EXPECT_EQ(words[0], 32767);
}

// The kernels' largest sums: 256 elements of extreme words times extreme int8 codes (rows 0
// and 1), and random ones, summed exactly in 32-bit lanes by the multiply-adds and the
// transposing reduction of `width` rows, then rounded to float once.
TEST(SimdIntegerDot, MultiplyAddsSumExactly) {
  std::mt19937 rng(4);
  std::uniform_int_distribution<int> code(-127, 127), sign(0, 1);
  std::vector<std::int16_t> q(256);
  std::vector<std::int8_t> k(width * 256);
  for (auto& x : k) x = static_cast<std::int8_t>(code(rng));
  for (int d = 0; d < 256; ++d) {
    q[d] = static_cast<std::int16_t>(sign(rng) ? 32767 : -32767);
    k[d] = static_cast<std::int8_t>(q[d] > 0 ? 127 : -127);
    k[256 + d] = static_cast<std::int8_t>(-k[d]);
  }
  simd::ints rows[width];
  std::vector<std::int64_t> expected(width, 0);
  for (int r = 0; r < width; ++r) {
    rows[r] = simd::zero_ints();
    for (int j = 0; j < 256; j += word_width)
      rows[r] = simd::dot_add(rows[r], simd::load_words(q.data() + j), simd::load_words(k.data() + r * 256 + j));
    for (int d = 0; d < 256; ++d) expected[r] += std::int64_t{q[d]} * k[r * 256 + d];
  }
  ASSERT_EQ(expected[0], 256 * 32767 * 127);
  const std::vector<float> sums = lanes(simd::sum_each_to_float(rows));
  for (int r = 0; r < width; ++r) EXPECT_EQ(sums[r], static_cast<float>(expected[r])) << "row " << r;
}

// Value accumulation: word pairs of two rows dotted with a pair of weights, back in element
// order, equal weight_a * code_a + weight_b * code_b for each element (64 with AVX-512, 16 with
// AVX2), extremes included.
template <class Code>
void expect_pair_sums_in_element_order(const std::vector<Code>& a, const std::vector<Code>& b,
                                       std::int16_t weight_a, std::int16_t weight_b) {
  auto code = [](const std::vector<Code>& row, int d) {
    if constexpr (std::same_as<Code, int4x2>)
      return static_cast<std::int64_t>(int4_code_at(row.data(), d));
    else
      return static_cast<std::int64_t>(row[d]);
  };
  simd::words pairs[pair_vectors];
  simd::load_word_pairs(a.data(), b.data(), pairs);
  const std::int16_t weights[2] = {weight_a, weight_b};
  simd::ints sums[pair_vectors];
  for (int i = 0; i < pair_vectors; ++i) sums[i] = simd::dot_add(simd::zero_ints(), pairs[i], simd::broadcast_pair(weights));
  simd::floats in_order[pair_vectors];
  simd::pair_sums_in_order<Code>(sums, in_order);
  for (int i = 0; i < pair_vectors; ++i) {
    const std::vector<float> got = lanes(in_order[i]);
    for (int lane = 0; lane < width; ++lane) {
      const int d = i * width + lane;
      EXPECT_EQ(got[lane], static_cast<float>(weight_a * code(a, d) + weight_b * code(b, d))) << "element " << d;
    }
  }
}

TEST(SimdIntegerDot, WordPairsOfTwoRowsSumInElementOrder) {
  std::mt19937 rng(6);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<std::int8_t> a8(64), b8(64);
  std::vector<int4x2> a4(32), b4(32);
  for (int trial = 0; trial < 4; ++trial) {
    for (int d = 0; d < 64; ++d) {
      a8[d] = static_cast<std::int8_t>(trial == 0 ? -127 : byte(rng) - 128);
      b8[d] = static_cast<std::int8_t>(trial == 0 ? 127 : byte(rng) - 128);
    }
    for (int i = 0; i < 32; ++i) {
      a4[i].bits = static_cast<std::uint8_t>(trial == 0 ? 0xFF : byte(rng));
      b4[i].bits = static_cast<std::uint8_t>(trial == 0 ? 0x0F : byte(rng));
    }
    const auto weight_a = static_cast<std::int16_t>(trial == 0 ? 32767 : byte(rng) * 128);
    const auto weight_b = static_cast<std::int16_t>(trial == 0 ? 32767 : byte(rng) * 3);
    expect_pair_sums_in_element_order(a8, b8, weight_a, weight_b);
    expect_pair_sums_in_element_order(a4, b4, weight_a, weight_b);
  }
}
#endif

#else
TEST(Simd, NotBuiltForThisTarget) { GTEST_SKIP() << "no AVX-512 or AVX2 + FMA + F16C"; }
#endif

}  // namespace
}  // namespace kvcache
