// Streaming softmax state, shared by every backend.
//
// Over the scores s_1..s_n seen so far:
//   max = max_i s_i                 (-inf before the first score)
//   sum = sum_i exp(s_i - max)
// and the accumulator the caller keeps is acc = sum_i exp(s_i - max) * v_i, so the attention
// output is acc / sum. Subtracting the running max keeps every exp() <= 1: no overflow for
// large logits.
#pragma once

#include <cmath>
#include <limits>

#include "../config.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace attention {

struct OnlineSoftmax {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;

  // Raises the running max to at least new_max and returns the factor exp(old_max - max) by
  // which the caller must multiply its accumulator (0 for an empty state, 1 if max is unchanged).
  KVCACHE_HOST_DEVICE float raise_max(float new_max) {
    if (!(new_max > max)) return 1.0f;
    const float factor = max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(max - new_max);
    sum *= factor;
    max = new_max;
    return factor;
  }

  // Merges the state of another set of scores (split-K). Multiply this accumulator by
  // *own_factor and the other's by *other_factor, then add them.
  KVCACHE_HOST_DEVICE void merge(const OnlineSoftmax& other, float* own_factor, float* other_factor) {
    const float merged = other.max > max ? other.max : max;
    const float ninf = -std::numeric_limits<float>::infinity();
    *own_factor = max == ninf ? 0.0f : std::exp(max - merged);
    *other_factor = other.max == ninf ? 0.0f : std::exp(other.max - merged);
    sum = sum * *own_factor + other.sum * *other_factor;
    max = merged;
  }
};

}  // namespace attention

KVCACHE_END_NAMESPACE
