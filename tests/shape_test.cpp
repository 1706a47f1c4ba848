#include <kvcache/shape.hpp>

#include <gtest/gtest.h>

#include <kvcache/dtype/float.hpp>

namespace kvcache {
namespace {

// The memory math is usable at compile time. Llama-3-8B: 32 layers, 8 kv-heads of 128.
constexpr ModelShape llama3_8b{32, 32, 8, 128};
static_assert(bytes_per_token<f16>(llama3_8b) == 131072);  // 128 KiB per token
static_assert(bytes_for_tokens<bf16>(llama3_8b, 8192) == std::size_t{1} << 30);
static_assert(tokens_in_budget<f32>(llama3_8b, std::size_t{1} << 30) == 4096);
static_assert(llama3_8b.head_layout() == HeadLayout::grouped_query && llama3_8b.group_size() == 4);
static_assert(ModelShape{1, 8, 8, 64}.head_layout() == HeadLayout::multi_head);
static_assert(ModelShape{1, 8, 1, 64}.head_layout() == HeadLayout::multi_query);

TEST(ModelShape, ValidatesEveryField) {
  EXPECT_NO_THROW(llama3_8b.validate());
  for (const ModelShape bad : {ModelShape{0, 8, 8, 64}, ModelShape{1, 0, 8, 64},
                               ModelShape{1, 8, 0, 64}, ModelShape{1, 8, 3, 64},
                               ModelShape{1, 8, 8, 0}, ModelShape{1, 8, 8, 1025}}) {
    try {
      bad.validate();
      ADD_FAILURE() << "accepted an invalid shape";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), errc::invalid_configuration);
    }
  }
}

TEST(ModelShape, BudgetRoundsDownToWholeTokens) {
  const ModelShape shape{2, 4, 2, 8};  // 2 * 2 * 2 * 8 * 2 bytes = 128 per f16 token
  EXPECT_EQ(bytes_per_token(shape, f16{}), 128u);
  EXPECT_EQ(tokens_in_budget(shape, 1000, f16{}), 7u);
  EXPECT_EQ(tokens_in_budget(shape, 127, f16{}), 0u);
  EXPECT_EQ(bytes_for_tokens(shape, 7, f16{}), 896u);
}

}  // namespace
}  // namespace kvcache
