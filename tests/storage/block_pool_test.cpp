#include <kvcache/storage/block_pool.hpp>

#include <gtest/gtest.h>

#include <set>
#include <stdexcept>

namespace kvcache {
namespace {

TEST(BlockPool, AllocatesEveryBlockOnceInAddressOrder) {
  BlockPool pool(5);
  std::set<std::int32_t> given;
  for (int i = 0; i < 5; ++i) {
    const std::int32_t block = pool.allocate();
    EXPECT_EQ(block, i);
    EXPECT_TRUE(given.insert(block).second);
    EXPECT_EQ(pool.owners(block), 1);
  }
  EXPECT_EQ(pool.free_count(), 0);
  EXPECT_THROW(pool.allocate(), std::logic_error);  // the precondition is asserted
}

TEST(BlockPool, SharedBlockReturnsWithItsLastOwner) {
  BlockPool pool(3);
  const std::int32_t block = pool.allocate();
  pool.retain(block);
  EXPECT_TRUE(pool.is_shared(block));
  pool.release(block);
  EXPECT_EQ(pool.free_count(), 2);
  pool.release(block);
  EXPECT_EQ(pool.free_count(), 3);
  EXPECT_EQ(pool.allocate(), block);  // freed last, reused first
  EXPECT_THROW(pool.retain(2), std::logic_error);
  EXPECT_THROW(pool.release(2), std::logic_error);
}

}  // namespace
}  // namespace kvcache
