// ModelShape and the KV memory math.
//
// One token of a sequence stores K and V for every layer and kv-head:
//   bytes_per_token = 2 * layers * kv_heads * row_bytes(head_dim)
// where row_bytes(head_dim) = head_dim * bits / 8 + scale bytes per row of the element type.
// Every byte a cache allocates is accounted for by these functions (a test checks equality).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "dtype/concept.hpp"
#include "error.hpp"

KVCACHE_BEGIN_NAMESPACE

enum class HeadLayout { multi_head, grouped_query, multi_query };

struct ModelShape {
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;

  // The CPU kernels keep one head_dim accumulator per query head on the stack.
  static constexpr int max_head_dim = 1024;

  // Throws Error{invalid_configuration} naming the field and the rule it breaks.
  constexpr void validate() const {
    if (layers <= 0) detail::fail(errc::invalid_configuration, "layers = ", layers, " must be > 0");
    if (q_heads <= 0)
      detail::fail(errc::invalid_configuration, "q_heads = ", q_heads, " must be > 0");
    if (kv_heads <= 0)
      detail::fail(errc::invalid_configuration, "kv_heads = ", kv_heads, " must be > 0");
    if (q_heads % kv_heads != 0)
      detail::fail(errc::invalid_configuration, "q_heads = ", q_heads,
                   " is not a multiple of kv_heads = ", kv_heads,
                   "; every kv-head must serve the same number of query heads");
    if (head_dim <= 0 || head_dim > max_head_dim)
      detail::fail(errc::invalid_configuration, "head_dim = ", head_dim, " must be in [1, ",
                   max_head_dim, "]");
  }

  constexpr int group_size() const noexcept { return q_heads / kv_heads; }

  constexpr HeadLayout head_layout() const noexcept {
    if (kv_heads == q_heads) return HeadLayout::multi_head;
    if (kv_heads == 1) return HeadLayout::multi_query;
    return HeadLayout::grouped_query;
  }

  friend constexpr bool operator==(const ModelShape&, const ModelShape&) = default;
};

// Bytes of K and V that one token occupies across all layers.
template <ElementType DType>
constexpr std::size_t bytes_per_token(const ModelShape& shape, DType = {}) noexcept {
  return static_cast<std::size_t>(shape.layers) * static_cast<std::size_t>(shape.kv_heads) *
         token_bytes<DType>(static_cast<std::size_t>(shape.head_dim));
}

// Bytes a cache keeps per sequence slot beside its pages: for types that keep the newest
// tokens in full precision (int4, residual types) those rows,
// [layers][K, V][kv_heads][residual_tokens][head_dim] floats; 0 for every other type.
template <ElementType DType>
constexpr std::size_t residual_bytes_per_sequence(const ModelShape& shape, DType = {}) noexcept {
  return 2 * static_cast<std::size_t>(shape.layers) * static_cast<std::size_t>(shape.kv_heads) *
         static_cast<std::size_t>(residual_tokens<DType>) * static_cast<std::size_t>(shape.head_dim) * sizeof(float);
}

// Bytes that `tokens` tokens occupy across all layers.
template <ElementType DType>
constexpr std::size_t bytes_for_tokens(const ModelShape& shape, std::size_t tokens,
                                       DType dtype = {}) noexcept {
  return tokens * bytes_per_token(shape, dtype);
}

// How many whole tokens fit in `budget_bytes`.
template <ElementType DType>
constexpr std::size_t tokens_in_budget(const ModelShape& shape, std::size_t budget_bytes,
                                       DType dtype = {}) noexcept {
  const std::size_t per_token = bytes_per_token(shape, dtype);
  return per_token == 0 ? 0 : budget_bytes / per_token;
}

KVCACHE_END_NAMESPACE
