// Attention parameters and the one place where a runtime head_dim becomes a constant.
#pragma once

#include <optional>
#include <type_traits>
#include <utility>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

struct AttentionParams {
  std::optional<float> scale;  // logits = scale * q.k; default 1 / sqrt(head_dim)
  float soft_cap = 0.0f;       // > 0: logits become soft_cap * tanh(logits / soft_cap) (Gemma 2)
};

namespace attention {

// The head sizes whose fast CPU kernels are compiled, a subset of 64, 128 and 256. Every cache
// type an attention call sees instantiates the kernels of each size, so an engine that serves
// models of one size builds faster with only that one (-DKVCACHE_FAST_HEAD_DIMS=128), or with
// none (-DKVCACHE_FAST_HEAD_DIMS=; the stories260K example, head_dim 8, compiles in a quarter
// less time). Any other head_dim takes the portable path. Define it alike in every translation
// unit of a program. (The CUDA kernels have their own list, KVCACHE_CUDA_HEAD_DIMS.)
#ifndef KVCACHE_FAST_HEAD_DIMS
#define KVCACHE_FAST_HEAD_DIMS 64, 128, 256
#endif

namespace detail {
template <int First, int... Rest, class F>
constexpr decltype(auto) dispatch_head_dim_among(int head_dim, F&& f) {
  if (head_dim == First) return f(std::integral_constant<int, First>{});
  if constexpr (sizeof...(Rest) > 0)
    return dispatch_head_dim_among<Rest...>(head_dim, f);
  else
    return f(std::integral_constant<int, 0>{});
}

// Calls f with std::integral_constant<int, head_dim> when head_dim is one of Sizes (a subset of
// 64, 128 and 256, possibly empty) and with std::integral_constant<int, 0> ("known only at run
// time") for every other size.
template <int... Sizes, class F>
constexpr decltype(auto) dispatch_head_dim_in(int head_dim, F&& f) {
  static_assert(((Sizes == 64 || Sizes == 128 || Sizes == 256) && ...), "head sizes: a subset of 64, 128, 256");
  if constexpr (sizeof...(Sizes) == 0)
    return f(std::integral_constant<int, 0>{});
  else
    return dispatch_head_dim_among<Sizes...>(head_dim, f);
}
}  // namespace detail

// dispatch_head_dim_in for the sizes that have fast CPU kernels (KVCACHE_FAST_HEAD_DIMS).
template <class F>
constexpr decltype(auto) dispatch_head_dim(int head_dim, F&& f) {
  return detail::dispatch_head_dim_in<KVCACHE_FAST_HEAD_DIMS>(head_dim, std::forward<F>(f));
}

// Whether this build has fast CPU kernels for head_dim (it is in KVCACHE_FAST_HEAD_DIMS).
constexpr bool has_fast_kernels(int head_dim) {
  return dispatch_head_dim(head_dim, [](auto size) { return decltype(size)::value != 0; });
}

}  // namespace attention

KVCACHE_END_NAMESPACE
