// Test support: random data, the naive fp64 attention oracle, and the axes that typed tests run
// over. The oracle is written from the definition of attention and shares no code with the
// kernels.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <utility>
#include <vector>

#include <kvcache/kvcache.hpp>

namespace kvcache::testing {

// K or V of one layer of one sequence: [position][kv_head][head_dim], as floats.
using Rows = std::vector<float>;

inline std::vector<float> random_values(std::mt19937& rng, std::size_t count, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(count);
  for (float& value : values) value = normal(rng);
  return values;
}

// What storing `value` as DType and reading it back gives.
template <class DType>
float round_trip(float value) {
  return DType::to_float(DType::from_float(value));
}

template <class DType>
std::vector<float> rounded(std::vector<float> values) {
  for (float& value : values) value = round_trip<DType>(value);
  return values;
}

// What a cache of DType stores for rows of head_dim values (round_trip_rows).
template <class DType>
std::vector<float> stored(std::vector<float> values, int head_dim) {
  round_trip_rows<DType>(values, head_dim);
  return values;
}

// The value a segment holds for element d of row r of kv-head `head`, of K (kind 0) or V (1).
template <class Storage>
float stored_value(const Segment<Storage>& segment, int kind, int head, int r, int d, int head_dim) {
  const Storage* data = kind == 0 ? segment.k : segment.v;
  const float* scales = kind == 0 ? segment.k_scale : segment.v_scale;
  const float scale = scales == nullptr ? 1.0f : scales[head * (segment.head_stride / head_dim) + r];
  return to_float(data[head * segment.head_stride + static_cast<std::size_t>(r) * head_dim + d]) * scale;
}

struct Mask {
  int window = 0;  // 0: none
  int sink_tokens = 0;
  bool visible(int key, int query) const {
    if (key > query) return false;
    if (window == 0) return true;
    return key < sink_tokens || query - key < window;
  }
};

// Attention output [queries][q_heads][head_dim] for queries at positions
// [length - queries, length), from the full K/V rows of the sequence, accumulated in double.
inline std::vector<double> oracle_attention(const ModelShape& shape, const Rows& k, const Rows& v,
                                            int length, const std::vector<float>& q, int queries,
                                            Mask mask, double scale, double soft_cap = 0.0) {
  const int hd = shape.head_dim;
  const int group = shape.q_heads / shape.kv_heads;
  std::vector<double> out(static_cast<std::size_t>(queries) * shape.q_heads * hd, 0.0);
  for (int i = 0; i < queries; ++i) {
    const int position = length - queries + i;
    for (int head = 0; head < shape.q_heads; ++head) {
      const int kv_head = head / group;
      const float* query = &q[(static_cast<std::size_t>(i) * shape.q_heads + head) * hd];
      std::vector<double> logits;
      std::vector<int> keys;
      for (int key = 0; key < length; ++key) {
        if (!mask.visible(key, position)) continue;
        const float* key_row = &k[(static_cast<std::size_t>(key) * shape.kv_heads + kv_head) * hd];
        double dot = 0.0;
        for (int d = 0; d < hd; ++d) dot += static_cast<double>(query[d]) * key_row[d];
        double logit = dot * scale;
        if (soft_cap > 0.0) logit = soft_cap * std::tanh(logit / soft_cap);
        logits.push_back(logit);
        keys.push_back(key);
      }
      const double max = *std::max_element(logits.begin(), logits.end());
      double sum = 0.0;
      for (double& logit : logits) sum += (logit = std::exp(logit - max));
      double* result = &out[(static_cast<std::size_t>(i) * shape.q_heads + head) * hd];
      for (std::size_t j = 0; j < keys.size(); ++j) {
        const float* value_row = &v[(static_cast<std::size_t>(keys[j]) * shape.kv_heads + kv_head) * hd];
        for (int d = 0; d < hd; ++d) result[d] += logits[j] / sum * value_row[d];
      }
    }
  }
  return out;
}

// The most a CPU kernel's output may differ from the oracle on the values the cache stores
// (relative_error): float rounding, plus, where the kernel dots integer codes with queries and
// weights rounded to 16-bit integers (attention::cpu::uses_integer_dot_products), that rounding.
// It moves a score s by about |s| * 2^-16 (rows of the tests' largest keys: scores up to ~30,
// output errors up to 2.3e-4 measured, the same with and without the weights' rounding); int8's
// own quantization moves scores ~100 times as much.
template <class Storage>
double kernel_bound(int head_dim) {
  return attention::cpu::uses_integer_dot_products<Storage>(head_dim) ? 5e-4 : 1e-5;
}

// max |actual - expected| / max |expected|: the error relative to the output's magnitude.
template <class T>
double relative_error(const std::vector<T>& actual, const std::vector<double>& expected) {
  double error = 0.0, magnitude = 0.0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    error = std::max(error, std::abs(static_cast<double>(actual[i]) - expected[i]));
    magnitude = std::max(magnitude, std::abs(expected[i]));
  }
  return error / std::max(magnitude, 1e-30);
}

// Decodes every sequence of `seqs` (layer 0) in one batch, then runs a chunked prefill of
// `queries` queries for seqs[prefill_index], with N(0, 0.3) queries, and expects each output
// within `bound` of the oracle on the rows the cache holds (k_stored[i], v_stored[i]), with
// logits soft-capped where soft_cap > 0.
template <class Cache>
void expect_attention_equals_oracle(Cache& cache, const std::vector<SeqId>& seqs, std::span<const int> lengths,
                                    const std::vector<Rows>& k_stored, const std::vector<Rows>& v_stored, Mask mask,
                                    std::mt19937& rng, double bound, std::size_t prefill_index = 3, int queries = 5,
                                    double soft_cap = 0.0) {
  const ModelShape& shape = cache.shape();
  const std::size_t q_row = static_cast<std::size_t>(shape.q_heads) * shape.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(shape.head_dim));
  const AttentionParams params{.scale = static_cast<float>(scale), .soft_cap = static_cast<float>(soft_cap)};
  const auto q = random_values(rng, seqs.size() * q_row, 0.3f);
  std::vector<float> out(q.size());
  attention::decode(cache, 0, std::span<const SeqId>(seqs), q, out, params);
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const std::vector<float> q_i(q.begin() + i * q_row, q.begin() + (i + 1) * q_row);
    const std::vector<float> out_i(out.begin() + i * q_row, out.begin() + (i + 1) * q_row);
    const auto expected = oracle_attention(shape, k_stored[i], v_stored[i], lengths[i], q_i, 1, mask, scale, soft_cap);
    EXPECT_LE(relative_error(out_i, expected), bound) << shape.q_heads << "/" << shape.kv_heads << " heads, head_dim "
                                                      << shape.head_dim << ", length " << lengths[i];
  }
  const auto q_prefill = random_values(rng, queries * q_row, 0.3f);
  std::vector<float> out_prefill(q_prefill.size());
  attention::prefill(cache, 0, seqs[prefill_index], q_prefill, out_prefill, params);
  const auto expected = oracle_attention(shape, k_stored[prefill_index], v_stored[prefill_index],
                                         lengths[prefill_index], q_prefill, queries, mask, scale, soft_cap);
  EXPECT_LE(relative_error(out_prefill, expected), bound) << "prefill, head_dim " << shape.head_dim;
}

// ---- the axes ----

// One layer of MHA, GQA and MQA, each with a head_dim the fast kernels take (64) and one only
// the portable path takes (40): the shapes the oracle tests sweep.
inline std::vector<ModelShape> oracle_shapes() {
  std::vector<ModelShape> shapes;
  for (const auto& [q_heads, kv_heads] : {std::pair{4, 4}, std::pair{8, 2}, std::pair{6, 1}})
    for (const int head_dim : {64, 40}) shapes.push_back({1, q_heads, kv_heads, head_dim});
  return shapes;
}

template <class Layout_, class DType_>
struct Config {
  using Layout = Layout_;
  using DType = DType_;
};

template <class Layout>
Layout make_layout();
template <>
inline Contiguous make_layout<Contiguous>() { return {.max_sequences = 6, .max_tokens = 96}; }
template <>
inline Paged<16> make_layout<Paged<16>>() { return {.num_blocks = 40, .max_sequences = 6}; }
template <>
inline SlidingWindow make_layout<SlidingWindow>() {
  return {.max_sequences = 6, .window = 20, .sink_tokens = 3, .slack_tokens = 8};
}

template <class Layout>
Mask mask_of(const Layout& layout) {
  const Retention retention = layout.retention();
  return {retention.window, retention.sink_tokens};
}

using AllConfigs = ::testing::Types<
    Config<Contiguous, f32>, Config<Contiguous, f16>, Config<Contiguous, bf16>,
    Config<Paged<16>, f32>, Config<Paged<16>, f16>, Config<Paged<16>, bf16>,
    Config<SlidingWindow, f32>, Config<SlidingWindow, f16>, Config<SlidingWindow, bf16>>;

struct ConfigName {
  template <class C>
  static std::string GetName(int) {
    return std::string(C::Layout::name) + "_" + std::string(C::DType::name);
  }
};

}  // namespace kvcache::testing
