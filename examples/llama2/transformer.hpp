// The Llama forward pass on Eigen, with every attention going through KVCache and
// kvcache::attention. One call runs a step for a batch of sequences: each feeds one or more
// tokens (a prompt chunk, or the one token of a decode step) and gets the logits of its last.
#pragma once

#include <kvcache/kvcache.hpp>

#include <Eigen/Core>
#include <cmath>
#include <concepts>
#include <span>
#include <vector>

#include "checkpoint.hpp"

namespace llama2 {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstWeight = Eigen::Map<const RowMatrix>;

struct Feed {
  kvcache::SeqId seq;
  std::span<const int> tokens;  // at positions [cache.length(seq), + tokens.size())
};

// The operations of a KVCache that the model and the generator use, behind one interface:
// the model's layers and the generator then compile once, and only CacheOf below once per cache
// type (the engine's command line chooses among 46, and each copy of the layers and the
// generator was most of its compile time).
class CacheAccess {
 public:
  virtual ~CacheAccess() = default;
  virtual kvcache::SeqId open() = 0;
  virtual void reserve(kvcache::SeqId seq, int tokens) = 0;
  virtual void release(kvcache::SeqId seq) = 0;
  virtual int length(kvcache::SeqId seq) const = 0;
  virtual kvcache::MemoryStats stats() const = 0;
  virtual void append(int layer, kvcache::SeqId seq, std::span<const float> k, std::span<const float> v) = 0;
  virtual void prefill(int layer, kvcache::SeqId seq, std::span<const float> q, std::span<float> out) = 0;
  virtual void decode(int layer, std::span<const kvcache::SeqId> seqs, std::span<const float> q,
                      std::span<float> out) = 0;
};

// CacheAccess to a KVCache, or to a type derived from one that hides its append.
template <class Cache>
class CacheOf final : public CacheAccess {
 public:
  explicit CacheOf(Cache& cache) : cache_(cache) {}
  kvcache::SeqId open() override { return cache_.open(); }
  void reserve(kvcache::SeqId seq, int tokens) override { cache_.reserve(seq, tokens); }
  void release(kvcache::SeqId seq) override { cache_.release(seq); }
  int length(kvcache::SeqId seq) const override { return cache_.length(seq); }
  kvcache::MemoryStats stats() const override { return cache_.stats(); }
  void append(int layer, kvcache::SeqId seq, std::span<const float> k, std::span<const float> v) override {
    cache_.append(layer, seq, k, v);
  }
  void prefill(int layer, kvcache::SeqId seq, std::span<const float> q, std::span<float> out) override {
    kvcache::attention::prefill(cache_, layer, seq, q, out);
  }
  void decode(int layer, std::span<const kvcache::SeqId> seqs, std::span<const float> q, std::span<float> out) override {
    kvcache::attention::decode(cache_, layer, seqs, q, out);
  }

 private:
  Cache& cache_;
};

class Transformer {
 public:
  explicit Transformer(const Checkpoint& checkpoint)
      : config_(checkpoint.config()), weights_(checkpoint.weights()) {}

  const Config& config() const { return config_; }

  // Runs every layer for all tokens of `feeds` and writes the logits of each feed's last token
  // to logits [feeds][vocab]. @pre the cache has room reserved for every token fed.
  template <class Cache>
    requires(!std::derived_from<Cache, CacheAccess>)
  void forward(Cache& cache, std::span<const Feed> feeds, std::span<float> logits) {
    CacheOf<Cache> access(cache);
    forward(access, feeds, logits);
  }
  void forward(CacheAccess& cache, std::span<const Feed> feeds, std::span<float> logits) {
    const int dim = config_.dim, kv_dim = config_.kv_dim(), hidden = config_.hidden_dim;
    int rows = 0;
    for (const Feed& feed : feeds) rows += static_cast<int>(feed.tokens.size());
    x_.resize(rows, dim);  // [rows][dim] residual stream
    positions_.resize(static_cast<std::size_t>(rows));
    int row = 0;
    for (const Feed& feed : feeds) {
      const int start = cache.length(feed.seq);
      for (std::size_t t = 0; t < feed.tokens.size(); ++t, ++row) {
        x_.row(row) = Eigen::Map<const Eigen::RowVectorXf>(weights_.token_embedding + static_cast<std::size_t>(feed.tokens[t]) * dim, dim);
        positions_[static_cast<std::size_t>(row)] = start + static_cast<int>(t);
      }
    }

    for (int layer = 0; layer < config_.layers; ++layer) {
      rms_norm(x_, weights_.attention_norm + static_cast<std::size_t>(layer) * dim, normed_);
      q_.noalias() = normed_ * weight(weights_.wq, layer, dim, dim).transpose();       // [rows][dim]
      k_.noalias() = normed_ * weight(weights_.wk, layer, kv_dim, dim).transpose();    // [rows][kv_dim]
      v_.noalias() = normed_ * weight(weights_.wv, layer, kv_dim, dim).transpose();    // [rows][kv_dim]
      rotate(q_);
      rotate(k_);
      attend(cache, layer, feeds);                                                     // att_: [rows][dim]
      x_.noalias() += att_ * weight(weights_.wo, layer, dim, dim).transpose();

      rms_norm(x_, weights_.ffn_norm + static_cast<std::size_t>(layer) * dim, normed_);
      gate_.noalias() = normed_ * weight(weights_.w1, layer, hidden, dim).transpose();  // [rows][hidden]
      up_.noalias() = normed_ * weight(weights_.w3, layer, hidden, dim).transpose();    // [rows][hidden]
      gate_ = (gate_.array() / (1.0f + (-gate_.array()).exp()) * up_.array()).matrix();  // SwiGLU
      x_.noalias() += gate_ * weight(weights_.w2, layer, dim, hidden).transpose();
    }

    const ConstWeight classifier(weights_.classifier, config_.vocab_size, dim);
    row = 0;
    for (std::size_t i = 0; i < feeds.size(); ++i) {
      row += static_cast<int>(feeds[i].tokens.size());
      RowMatrix last = x_.row(row - 1);
      rms_norm(last, weights_.final_norm, last);
      Eigen::Map<Eigen::VectorXf>(logits.data() + i * config_.vocab_size, config_.vocab_size).noalias() =
          classifier * last.transpose();
    }
  }

 private:
  static ConstWeight weight(const float* base, int layer, int rows, int cols) {
    return ConstWeight(base + static_cast<std::size_t>(layer) * rows * cols, rows, cols);
  }

  // out_r = gain * x_r / sqrt(mean(x_r^2) + 1e-5) for every row r.
  void rms_norm(const RowMatrix& x, const float* gain, RowMatrix& out) const {
    const Eigen::Map<const Eigen::RowVectorXf> g(gain, x.cols());
    out.resize(x.rows(), x.cols());
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
      const float scale = 1.0f / std::sqrt(x.row(r).squaredNorm() / static_cast<float>(x.cols()) + 1e-5f);
      out.row(r) = g.cwiseProduct(scale * x.row(r));
    }
  }

  // RoPE on adjacent pairs inside each head: pair j of a head turns by position * 10000^(-2j/head).
  void rotate(RowMatrix& m) const {
    const int head_size = config_.head_size();
    for (Eigen::Index r = 0; r < m.rows(); ++r) {
      const float position = static_cast<float>(positions_[static_cast<std::size_t>(r)]);
      for (Eigen::Index i = 0; i < m.cols(); i += 2) {
        const float frequency = 1.0f / std::pow(10000.0f, static_cast<float>(i % head_size) / static_cast<float>(head_size));
        const float angle = position * frequency;
        const float c = std::cos(angle), s = std::sin(angle);
        const float u = m(r, i), w = m(r, i + 1);
        m(r, i) = u * c - w * s;
        m(r, i + 1) = u * s + w * c;
      }
    }
  }

  // Appends each feed's K/V to the cache, then attention: one batched decode call for the
  // feeds of one token, a chunked prefill for each longer feed.
  void attend(CacheAccess& cache, int layer, std::span<const Feed> feeds) {
    const int dim = config_.dim, kv_dim = config_.kv_dim();
    att_.resize(q_.rows(), dim);
    decode_seqs_.clear();
    decode_rows_.clear();
    int row = 0;
    for (const Feed& feed : feeds) {
      const int n = static_cast<int>(feed.tokens.size());
      const std::size_t kv_offset = static_cast<std::size_t>(row) * kv_dim, kv_size = static_cast<std::size_t>(n) * kv_dim;
      cache.append(layer, feed.seq, std::span<const float>(k_.data() + kv_offset, kv_size),
                   std::span<const float>(v_.data() + kv_offset, kv_size));
      if (n == 1) {
        decode_seqs_.push_back(feed.seq);
        decode_rows_.push_back(row);
      } else {
        const std::size_t offset = static_cast<std::size_t>(row) * dim, size = static_cast<std::size_t>(n) * dim;
        cache.prefill(layer, feed.seq, std::span<const float>(q_.data() + offset, size),
                      std::span<float>(att_.data() + offset, size));
      }
      row += n;
    }
    if (decode_seqs_.empty()) return;
    decode_q_.resize(static_cast<Eigen::Index>(decode_rows_.size()), dim);
    for (std::size_t i = 0; i < decode_rows_.size(); ++i) decode_q_.row(static_cast<Eigen::Index>(i)) = q_.row(decode_rows_[i]);
    decode_out_.resize(decode_q_.rows(), dim);
    cache.decode(layer, decode_seqs_,
                 std::span<const float>(decode_q_.data(), static_cast<std::size_t>(decode_q_.size())),
                 std::span<float>(decode_out_.data(), static_cast<std::size_t>(decode_out_.size())));
    for (std::size_t i = 0; i < decode_rows_.size(); ++i) att_.row(decode_rows_[i]) = decode_out_.row(static_cast<Eigen::Index>(i));
  }

  Config config_;
  Weights weights_;
  std::vector<int> positions_;  // [rows] position of each row
  RowMatrix x_, normed_, q_, k_, v_, att_, gate_, up_, decode_q_, decode_out_;
  std::vector<kvcache::SeqId> decode_seqs_;
  std::vector<int> decode_rows_;
};

}  // namespace llama2
