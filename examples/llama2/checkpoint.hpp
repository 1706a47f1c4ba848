// llama2.c checkpoint: the model's configuration and float32 weights.
//
// Format (little-endian): seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
// vocab_size, seq_len), then float32 arrays with no padding, each matrix row-major [out][in]:
// token embedding [vocab][dim], attention RMSNorm [layer][dim], Wq [layer][dim][dim],
// Wk and Wv [layer][kv_dim][dim], Wo [layer][dim][dim], FFN RMSNorm [layer][dim],
// W1 and W3 [layer][hidden][dim], W2 [layer][dim][hidden], final RMSNorm [dim], an old RoPE
// table [2][seq_len][head_size / 2] (unused), and, only when vocab_size < 0, a classifier
// [vocab][dim] (otherwise the classifier is the token embedding).
#pragma once

#include <kvcache/error.hpp>
#include <kvcache/shape.hpp>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace llama2 {

struct Config {
  int dim = 0;
  int hidden_dim = 0;
  int layers = 0;
  int heads = 0;
  int kv_heads = 0;
  int vocab_size = 0;
  int seq_len = 0;

  int head_size() const { return dim / heads; }
  int kv_dim() const { return kv_heads * head_size(); }
  kvcache::ModelShape kv_shape() const { return {layers, heads, kv_heads, head_size()}; }
};

// Views into Checkpoint::data, one per array of the format.
struct Weights {
  const float* token_embedding;  // [vocab][dim]
  const float* attention_norm;   // [layer][dim]
  const float* wq;               // [layer][dim][dim]
  const float* wk;               // [layer][kv_dim][dim]
  const float* wv;               // [layer][kv_dim][dim]
  const float* wo;               // [layer][dim][dim]
  const float* ffn_norm;         // [layer][dim]
  const float* w1;               // [layer][hidden][dim]
  const float* w2;               // [layer][dim][hidden]
  const float* w3;               // [layer][hidden][dim]
  const float* final_norm;       // [dim]
  const float* classifier;       // [vocab][dim]
};

class Checkpoint {
 public:
  // Throws kvcache::Error{corrupt_data} for a missing, truncated or inconsistent file.
  explicit Checkpoint(const std::string& path) {
    using kvcache::errc;
    using kvcache::detail::fail;
    std::ifstream file(path, std::ios::binary | std::ios::ate);
    if (!file) fail(errc::corrupt_data, "cannot open checkpoint '", path, "'");
    const std::streamoff file_size = file.tellg();
    file.seekg(0);
    std::int32_t header[7];
    if (file_size < static_cast<std::streamoff>(sizeof header) ||
        !file.read(reinterpret_cast<char*>(header), sizeof header))
      fail(errc::corrupt_data, "checkpoint '", path, "' has ", file_size,
           " bytes, fewer than its 28-byte header");
    config_ = {header[0], header[1], header[2], header[3], header[4], std::abs(header[5]), header[6]};
    const bool shared_classifier = header[5] > 0;
    const Config& c = config_;
    if (c.dim <= 0 || c.hidden_dim <= 0 || c.layers <= 0 || c.heads <= 0 || c.kv_heads <= 0 ||
        c.vocab_size <= 0 || c.seq_len <= 0 || c.dim % c.heads != 0 || c.heads % c.kv_heads != 0 ||
        c.head_size() % 2 != 0 || c.dim > 65536 || c.hidden_dim > 1 << 20 || c.layers > 1024 ||
        c.vocab_size > 1 << 22 || c.seq_len > 1 << 20)
      fail(errc::corrupt_data, "checkpoint '", path, "' has an impossible header: dim ", c.dim,
           ", hidden_dim ", c.hidden_dim, ", layers ", c.layers, ", heads ", c.heads,
           ", kv_heads ", c.kv_heads, ", vocab_size ", header[5], ", seq_len ", c.seq_len);

    const std::size_t dim = c.dim, hidden = c.hidden_dim, layers = c.layers, vocab = c.vocab_size,
                      kv_dim = c.kv_dim(), rope = static_cast<std::size_t>(c.seq_len) * c.head_size();
    const std::size_t sizes[] = {vocab * dim,        layers * dim,     layers * dim * dim,
                                 layers * kv_dim * dim, layers * kv_dim * dim, layers * dim * dim,
                                 layers * dim,       layers * hidden * dim, layers * dim * hidden,
                                 layers * hidden * dim, dim,           rope,
                                 shared_classifier ? 0 : vocab * dim};
    std::size_t floats = 0;
    for (std::size_t size : sizes) floats += size;
    const std::size_t expected = sizeof header + floats * sizeof(float);
    if (static_cast<std::size_t>(file_size) != expected)
      fail(errc::corrupt_data, "checkpoint '", path, "' has ", file_size, " bytes; its header (dim ",
           c.dim, ", ", c.layers, " layers, vocab ", c.vocab_size, ") needs exactly ", expected);
    data_.resize(floats);
    if (!file.read(reinterpret_cast<char*>(data_.data()), static_cast<std::streamsize>(floats * sizeof(float))))
      fail(errc::corrupt_data, "reading checkpoint '", path, "' failed");

    const float* next = data_.data();
    const float* arrays[13];
    for (int i = 0; i < 13; ++i) {
      arrays[i] = next;
      next += sizes[i];
    }
    weights_ = {arrays[0], arrays[1], arrays[2],  arrays[3], arrays[4],
                arrays[5], arrays[6], arrays[7],  arrays[8], arrays[9],
                arrays[10], shared_classifier ? arrays[0] : arrays[12]};
  }

  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  const Config& config() const { return config_; }
  const Weights& weights() const { return weights_; }

 private:
  Config config_;
  std::vector<float> data_;  // every array of the file after the header
  Weights weights_;
};

}  // namespace llama2
