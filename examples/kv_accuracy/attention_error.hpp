// How far attention over a cache of one element type lands from attention over an f32 cache
// that holds the very same K/V rows.
//
// Both caches get identical rows and identical queries; each decode call's error is
//   max |out - out_f32| / max |out_f32|   over every element of the call's output,
// so it reads as a fraction of the output's scale, whatever that scale is.
#pragma once

#include <kvcache/kvcache.hpp>

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace kv_accuracy {

// The K and V of every layer of one sequence, in the layout append() takes.
struct KVRows {
  kvcache::ModelShape shape;
  int tokens = 0;
  std::vector<std::vector<float>> k, v;  // [layer][token][kv_heads][head_dim]

  std::size_t row_floats() const { return static_cast<std::size_t>(shape.kv_heads) * shape.head_dim; }
};

struct ErrorSummary {
  double mean = 0;  // over decode calls
  double max = 0;
  int calls = 0;

  void add(double error) {
    mean += (error - mean) / ++calls;
    max = std::max(max, error);
  }
};

// Independent N(0, 1) elements: K/V without the structure of a trained model.
inline KVRows random_rows(const kvcache::ModelShape& shape, int tokens, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::normal_distribution<float> normal;
  KVRows rows{shape, tokens, {}, {}};
  const std::size_t floats = static_cast<std::size_t>(tokens) * rows.row_floats();
  for (int layer = 0; layer < shape.layers; ++layer) {
    for (auto* kind : {&rows.k, &rows.v}) {
      std::vector<float>& values = kind->emplace_back(floats);
      for (float& value : values) value = normal(random);
    }
  }
  return rows;
}

// Reads back what an f32 cache holds for seq, through the views attention kernels read, so
// the rows are exactly those the model appended (f32 stores them unchanged).
template <class Cache>
  requires std::same_as<typename Cache::dtype, kvcache::f32>
KVRows read_rows(const Cache& cache, kvcache::SeqId seq) {
  const kvcache::ModelShape& shape = cache.shape();
  KVRows rows{shape, cache.length(seq), {}, {}};
  const std::size_t head_dim = static_cast<std::size_t>(shape.head_dim);
  for (int layer = 0; layer < shape.layers; ++layer) {
    std::vector<float>& k = rows.k.emplace_back(static_cast<std::size_t>(rows.tokens) * rows.row_floats());
    std::vector<float>& v = rows.v.emplace_back(k.size());
    const auto view = cache.view(layer, seq);
    for (int i = 0; i < view.segment_count(); ++i) {
      const auto segment = view.segment(i);
      for (int head = 0; head < shape.kv_heads; ++head) {
        for (int row = 0; row < segment.count; ++row) {
          const std::size_t from = head * segment.head_stride + row * head_dim;
          const std::size_t to = (static_cast<std::size_t>(segment.first_position + row) * shape.kv_heads + head) * head_dim;
          std::copy_n(segment.k + from, head_dim, k.begin() + static_cast<std::ptrdiff_t>(to));
          std::copy_n(segment.v + from, head_dim, v.begin() + static_cast<std::ptrdiff_t>(to));
        }
      }
    }
  }
  return rows;
}

inline double relative_error(std::span<const float> out, std::span<const float> reference) {
  double difference = 0, scale = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    difference = std::max(difference, std::abs(static_cast<double>(out[i]) - reference[i]));
    scale = std::max(scale, std::abs(static_cast<double>(reference[i])));
  }
  return scale > 0 ? difference / scale : difference;
}

// Appends `rows` to an f32 cache and a DType cache as a decode loop would, and at each length
// of `decode_lengths` (ascending) runs `queries` decode calls per layer with N(0, 1) queries,
// the same for both caches (and, for a given seed, for every DType). key_offsets go to the
// DType cache (KVCache's constructor).
template <class DType>
ErrorSummary decode_error(const KVRows& rows, std::span<const int> decode_lengths, int queries, std::uint64_t seed,
                          std::span<const float> key_offsets = {}) {
  using namespace kvcache;
  // Room in whole groups of 32 tokens, which int4 stores keys in.
  const Contiguous layout{.max_sequences = 1, .max_tokens = (rows.tokens + 31) / 32 * 32};
  KVCache<Contiguous, f32> reference(rows.shape, layout);
  KVCache<Contiguous, DType> cache(rows.shape, layout, key_offsets);
  const SeqId reference_seq = reference.open(), seq = cache.open();
  reference.reserve(reference_seq, rows.tokens);
  cache.reserve(seq, rows.tokens);

  std::mt19937_64 random(seed);
  std::normal_distribution<float> normal;
  const std::size_t query_floats = static_cast<std::size_t>(rows.shape.q_heads) * rows.shape.head_dim;
  std::vector<float> query(query_floats), out(query_floats), reference_out(query_floats);
  ErrorSummary summary;
  int held = 0;
  for (const int length : decode_lengths) {
    const std::size_t offset = held * rows.row_floats(), size = (length - held) * rows.row_floats();
    for (int layer = 0; layer < rows.shape.layers; ++layer) {
      const std::span<const float> k = std::span(rows.k[layer]).subspan(offset, size);
      const std::span<const float> v = std::span(rows.v[layer]).subspan(offset, size);
      reference.append(layer, reference_seq, k, v);
      cache.append(layer, seq, k, v);
    }
    held = length;
    for (int layer = 0; layer < rows.shape.layers; ++layer) {
      for (int call = 0; call < queries; ++call) {
        for (float& value : query) value = normal(random);
        attention::decode(reference, layer, reference_seq, query, reference_out);
        attention::decode(cache, layer, seq, query, out);
        summary.add(relative_error(out, reference_out));
      }
    }
  }
  return summary;
}

}  // namespace kv_accuracy
