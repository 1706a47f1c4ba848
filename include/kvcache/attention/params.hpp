// Attention parameters and the one place where a runtime head_dim becomes a constant.
#pragma once

#include <optional>
#include <type_traits>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

struct AttentionParams {
  std::optional<float> scale;  // logits = scale * q.k; default 1 / sqrt(head_dim)
  float soft_cap = 0.0f;       // > 0: logits become soft_cap * tanh(logits / soft_cap) (Gemma 2)
};

namespace attention {

// Calls f with std::integral_constant<int, head_dim> for the sizes that have fast paths and
// with std::integral_constant<int, 0> ("known only at run time") for every other size.
template <class F>
decltype(auto) dispatch_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

}  // namespace attention

KVCACHE_END_NAMESPACE
