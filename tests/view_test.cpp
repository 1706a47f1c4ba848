// Views own nothing and are trivially copyable (kernels take them by value, also on a GPU).
#include <kvcache/view.hpp>

#include <gtest/gtest.h>

#include <Eigen/Core>
#include <type_traits>

namespace kvcache {
namespace {

static_assert(std::is_trivially_copyable_v<SequenceView<Eigen::half>>);
static_assert(std::is_trivially_copyable_v<SequenceView<Eigen::bfloat16>>);
static_assert(std::is_trivially_copyable_v<Segment<Eigen::half>>);

TEST(SequenceView, PagedSegmentsFollowTheBlockTable) {
  float pool[2 * 4 * 3 * 1] = {};  // [kv_head][4 blocks][3 tokens][head_dim 1]
  const std::int32_t blocks[] = {2, 0, 3};
  SequenceView<float> view;
  view.k_pool = view.v_pool = pool;
  view.block_ids = blocks;
  view.block_count = 3;
  view.block_tokens = 3;
  view.kv_heads = 2;
  view.head_dim = 1;
  view.pool_pages = 4;
  view.length = 7;
  ASSERT_EQ(view.segment_count(), 3);
  EXPECT_EQ(view.segment(0).k, pool + 2 * 3);  // block 2 of kv-head 0
  EXPECT_EQ(view.segment(1).first_position, 3);
  EXPECT_EQ(view.segment(2).count, 1);  // positions 6..6 of block 3
  EXPECT_EQ(view.segment(2).head_stride, 4u * 3);  // kv-head 1's rows of every block come after kv-head 0's
}

TEST(SequenceView, WindowMaskKeepsSinksAndRecentPositions) {
  SequenceView<float> view;
  view.window = 4;
  view.sink_tokens = 2;
  EXPECT_EQ(view.first_needed(3), 2);   // window (-1, 3] overlaps the sinks
  EXPECT_EQ(view.first_needed(10), 7);  // (6, 10]
  view.window = 0;
  EXPECT_EQ(view.first_needed(10), 0);
}

}  // namespace
}  // namespace kvcache
