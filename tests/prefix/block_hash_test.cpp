// The block hash is a specification, not an implementation detail: these values are what every
// process on every machine computes (block_hashes.golden holds the same, checked across two
// processes by CTest). Changing them breaks every cache that shares block names.
#include <kvcache/prefix/block_hash.hpp>
#include <kvcache/dtype/float.hpp>

#include <gtest/gtest.h>

#include <array>
#include <numeric>

namespace kvcache {
namespace {

constexpr ModelShape llama3_8b{32, 32, 8, 128};

constexpr std::array<std::int32_t, 16> counting() {
  std::array<std::int32_t, 16> ids{};
  std::iota(ids.begin(), ids.end(), 1);
  return ids;
}

// The hash is constexpr: a compile-time constant, so nothing at run time can change it.
static_assert(prefix_root<f16>(llama3_8b, 16, 0) == 0x28084e660d9add35ull);
static_assert(hash_block(prefix_root<f16>(llama3_8b, 16, 0), counting()) == 0x4e9f388cacae7e50ull);

TEST(BlockHash, GoldenValues) {
  const BlockHash root = prefix_root<f16>(llama3_8b, 16, 0);
  std::array<std::int32_t, 16> second{};
  for (int i = 0; i < 16; ++i) second[i] = 100000 + 7 * i;
  EXPECT_EQ(root, 0x28084e660d9add35ull);
  EXPECT_EQ(prefix_root<f16>(llama3_8b, 16, 42), 0x36f8ea554eee39c1ull);
  EXPECT_EQ(prefix_root<bf16>(llama3_8b, 16, 0), 0xff8845bb9e2aefa2ull);
  EXPECT_EQ(hash_block(root, counting()), 0x4e9f388cacae7e50ull);
  EXPECT_EQ(hash_block(hash_block(root, counting()), second), 0x1d96595862419668ull);
  EXPECT_EQ(hash_block(0, std::array<std::int32_t, 3>{-1, 0, 2147483647}), 0xf3921aa3400df515ull);
}

TEST(BlockHash, EveryInputChangesTheHash) {
  const BlockHash root = prefix_root<f16>(llama3_8b, 16, 0);
  EXPECT_NE(root, prefix_root<f16>(llama3_8b, 16, 1));                // salt
  EXPECT_NE(root, prefix_root<f16>(llama3_8b, 32, 0));                // block size
  EXPECT_NE(root, prefix_root<f32>(llama3_8b, 16, 0));                // element type
  EXPECT_NE(root, prefix_root<f16>({32, 32, 4, 128}, 16, 0));         // kv heads
  const auto ids = counting();
  auto swapped = ids;
  std::swap(swapped[0], swapped[1]);
  EXPECT_NE(hash_block(root, ids), hash_block(root, swapped));           // order within a block
  EXPECT_NE(hash_block(root, ids), hash_block(root + 1, ids));           // parent
}

}  // namespace
}  // namespace kvcache
