// Next-token choice by llama2.c's rules: greedy at temperature 0 (lowest id on a tie), otherwise
// softmax of logits / temperature, sampled from the whole distribution or from its top-p
// nucleus, with the same xorshift generator and one draw per token as run.c, so a seed gives
// run.c's text (tests/examples/llama2_test.cpp checks one sampled story).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace llama2 {

class Sampler {
 public:
  Sampler(int vocab_size, float temperature, float top_p, std::uint64_t seed)
      : temperature_(temperature), top_p_(top_p), state_(seed), candidates_(static_cast<std::size_t>(vocab_size)) {}

  // @pre logits.size() == vocab_size; logits is overwritten (probabilities) when sampling.
  int next(std::span<float> logits) {
    if (temperature_ == 0.0f)
      return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    for (float& logit : logits) logit /= temperature_;
    softmax(logits);
    const float coin = random_unit();
    if (top_p_ <= 0.0f || top_p_ >= 1.0f) return sample(logits, coin);
    return sample_top_p(logits, coin);
  }

 private:
  static void softmax(std::span<float> values) {
    const float max = *std::max_element(values.begin(), values.end());
    float sum = 0.0f;
    for (float& value : values) sum += (value = std::exp(value - max));
    for (float& value : values) value /= sum;
  }

  std::uint32_t random_u32() {
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return static_cast<std::uint32_t>((state_ * 0x2545F4914F6CDD1Dull) >> 32);
  }
  float random_unit() { return static_cast<float>(random_u32() >> 8) / 16777216.0f; }  // [0, 1)

  static int sample(std::span<const float> probabilities, float coin) {
    float cumulative = 0.0f;
    for (std::size_t i = 0; i < probabilities.size(); ++i) {
      cumulative += probabilities[i];
      if (coin < cumulative) return static_cast<int>(i);
    }
    return static_cast<int>(probabilities.size()) - 1;  // rounding
  }

  // Samples among the most probable tokens whose probabilities add up to more than top_p.
  int sample_top_p(std::span<const float> probabilities, float coin) {
    // Tokens below this cannot be in the nucleus; skipping them keeps the sort short.
    const float cutoff = (1.0f - top_p_) / static_cast<float>(probabilities.size() - 1);
    std::size_t count = 0;
    for (std::size_t i = 0; i < probabilities.size(); ++i)
      if (probabilities[i] >= cutoff) candidates_[count++] = {probabilities[i], static_cast<int>(i)};
    std::sort(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(count),
              [](const auto& a, const auto& b) { return a.first > b.first; });
    float total = 0.0f;
    std::size_t last = count - 1;
    for (std::size_t i = 0; i < count; ++i) {
      total += candidates_[i].first;
      if (total > top_p_) {
        last = i;
        break;
      }
    }
    const float target = coin * total;
    float cumulative = 0.0f;
    for (std::size_t i = 0; i <= last; ++i) {
      cumulative += candidates_[i].first;
      if (target < cumulative) return candidates_[i].second;
    }
    return candidates_[last].second;
  }

  float temperature_;
  float top_p_;
  std::uint64_t state_;
  std::vector<std::pair<float, int>> candidates_;  // [vocab] (probability, id), top-p scratch
};

}  // namespace llama2
