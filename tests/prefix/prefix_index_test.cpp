// PrefixIndex and LruEviction on their own: the hash table against a std::map model under
// heavy home-slot collisions, exact verification of hits, and LRU order.
#include <kvcache/prefix/eviction.hpp>
#include <kvcache/prefix/prefix_index.hpp>

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <stdexcept>
#include <vector>

namespace kvcache {
namespace {

TEST(PrefixIndex, RandomInsertEraseFindMatchesMap) {
  constexpr int blocks = 64;
  PrefixIndex index(blocks, 2);
  std::map<BlockHash, std::int32_t> model;
  std::vector<BlockHash> hash_of(blocks, 0);
  std::mt19937_64 rng(5);
  // Hashes that differ only above the table mask all start probing at slot 0..3, so probe runs
  // are long and every backward-shift case of erase is exercised.
  auto random_hash = [&] { return (rng() << 8) | (rng() & 3); };
  const std::vector<std::int32_t> ids{7, 8};
  for (int step = 0; step < 20'000; ++step) {
    const auto block = static_cast<std::int32_t>(rng() % blocks);
    if (index.registered(block)) {
      index.erase(block);
      model.erase(hash_of[static_cast<std::size_t>(block)]);
    } else {
      BlockHash hash = random_hash();
      while (model.count(hash)) hash = random_hash();
      index.insert(block, hash, {}, ids);
      model[hash] = block;
      hash_of[static_cast<std::size_t>(block)] = hash;
    }
    ASSERT_EQ(index.size(), static_cast<int>(model.size()));
    for (const auto& [hash, registered] : model) ASSERT_EQ(index.find(hash, {}, ids), registered);
    if (const BlockHash absent = random_hash(); !model.count(absent)) {
      ASSERT_EQ(index.find_hash(absent), -1);
    }
  }
}

TEST(PrefixIndex, AHashCollisionIsNoHit) {
  PrefixIndex index(8, 3);
  const std::vector<std::int32_t> ids{1, 2, 3}, other_ids{1, 2, 4};
  const std::uint64_t id = index.insert(5, 0xABCDull, {.id = 0, .salt = 9}, ids);
  EXPECT_EQ(index.find(0xABCDull, {.id = 0, .salt = 9}, ids), 5);
  // Same hash, different tokens, parent or salt: a different prefix, never served.
  EXPECT_EQ(index.find(0xABCDull, {.id = 0, .salt = 9}, other_ids), -1);
  EXPECT_EQ(index.find(0xABCDull, {.id = 0, .salt = 8}, ids), -1);
  EXPECT_EQ(index.find(0xABCDull, {.id = 3, .salt = 9}, ids), -1);
  // Registration ids are never reused, so a re-registered parent is a different parent.
  index.erase(5);
  EXPECT_GT(index.insert(5, 0xABCDull, {.id = 0, .salt = 9}, ids), id);
  EXPECT_THROW(index.insert(6, 0xABCDull, {}, ids), std::logic_error);  // hash taken
  EXPECT_THROW(index.insert(6, 0x1ull, {}, {ids.data(), 2}), std::logic_error);  // partial block
}

TEST(LruEviction, OldestCandidateFirst) {
  LruEviction lru(6);
  EXPECT_EQ(lru.victim(), -1);
  for (std::int32_t block : {3, 1, 4, 5}) lru.add(block);
  EXPECT_EQ(lru.size(), 4);
  EXPECT_EQ(lru.victim(), 3);
  lru.remove(3);  // shared again
  EXPECT_EQ(lru.victim(), 1);
  lru.remove(4);  // from the middle
  lru.add(3);     // released again: now the newest
  std::vector<std::int32_t> order;
  while (lru.victim() >= 0) {
    order.push_back(lru.victim());
    lru.remove(lru.victim());
  }
  EXPECT_EQ(order, (std::vector<std::int32_t>{1, 5, 3}));
  EXPECT_THROW(lru.remove(2), std::logic_error);
  lru.add(2);
  EXPECT_THROW(lru.add(2), std::logic_error);
}

}  // namespace
}  // namespace kvcache
