// The llama2.c tokenizer: byte-fallback BPE over a vocabulary of scored pieces.
//
// Format (little-endian): int32 max_token_length, then for each of the model's vocab_size
// tokens: float32 score, int32 byte length n, n bytes. Ids 0, 1, 2 are <unk>, BOS, EOS;
// 3..258 are the raw bytes <0x00>..<0xFF>; the rest are merged pieces, a higher score meaning an
// earlier merge.
#pragma once

#include <kvcache/error.hpp>

#include <cctype>
#include <cstdint>
#include <fstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace llama2 {

class Tokenizer {
 public:
  static constexpr int bos = 1;
  static constexpr int eos = 2;

  // Throws kvcache::Error{corrupt_data} if the file is missing, shorter than vocab_size
  // records, or longer (a tokenizer for another vocabulary).
  Tokenizer(const std::string& path, int vocab_size) {
    using kvcache::errc;
    using kvcache::detail::fail;
    std::ifstream file(path, std::ios::binary);
    if (!file) fail(errc::corrupt_data, "cannot open tokenizer '", path, "'");
    std::int32_t max_length = 0;
    if (!file.read(reinterpret_cast<char*>(&max_length), 4) || max_length <= 0)
      fail(errc::corrupt_data, "tokenizer '", path, "' has no valid header");
    pieces_.resize(static_cast<std::size_t>(vocab_size));
    scores_.resize(static_cast<std::size_t>(vocab_size));
    for (int id = 0; id < vocab_size; ++id) {
      std::int32_t length = 0;
      if (!file.read(reinterpret_cast<char*>(&scores_[id]), 4) ||
          !file.read(reinterpret_cast<char*>(&length), 4) || length < 0 || length > max_length)
        fail(errc::corrupt_data, "tokenizer '", path, "' ends or breaks at record ", id,
             " but the model's vocabulary has ", vocab_size, " tokens");
      pieces_[id].resize(static_cast<std::size_t>(length));
      if (!file.read(pieces_[id].data(), length))
        fail(errc::corrupt_data, "tokenizer '", path, "' ends inside record ", id, " of ", vocab_size);
      ids_.emplace(pieces_[id], id);
    }
    if (file.peek() != std::char_traits<char>::eof())
      fail(errc::corrupt_data, "tokenizer '", path, "' has more than the model's ", vocab_size,
           " tokens: it belongs to another vocabulary");
  }

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  const std::string& piece(int id) const { return pieces_[static_cast<std::size_t>(id)]; }

  // BOS, then (for a non-empty text) the lone-space piece, then the text's code points (or their
  // bytes when a code point is no piece), merged pairwise by score until nothing merges.
  std::vector<int> encode(std::string_view text) const {
    std::vector<int> ids{bos};
    if (text.empty()) return ids;
    ids.push_back(id_of(" "));
    for (std::size_t at = 0; at < text.size();) {
      std::size_t length = 1;  // one UTF-8 code point: a lead byte and its continuation bytes
      while (at + length < text.size() && length < 4 &&
             (static_cast<unsigned char>(text[at + length]) & 0xC0) == 0x80)
        ++length;
      const auto found = ids_.find(std::string(text.substr(at, length)));
      if (found != ids_.end()) {
        ids.push_back(found->second);
      } else {
        for (std::size_t i = 0; i < length; ++i) ids.push_back(static_cast<unsigned char>(text[at + i]) + 3);
      }
      at += length;
    }
    for (;;) {  // the BOS at the front never merges
      float best_score = 0;
      int best_id = -1;
      std::size_t best_at = 0;
      for (std::size_t i = 1; i + 1 < ids.size(); ++i) {
        const auto found = ids_.find(piece(ids[i]) + piece(ids[i + 1]));
        if (found != ids_.end() && (best_id < 0 || scores_[found->second] > best_score)) {
          best_score = scores_[found->second];
          best_id = found->second;
          best_at = i;
        }
      }
      if (best_id < 0) break;
      ids[best_at] = best_id;
      ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
    }
    return ids;
  }

  // The text printed for `id` following `previous`, by llama2.c's rules: after BOS a leading
  // space is dropped; <0xHH> is that byte; a lone byte prints only if printable or whitespace.
  std::string text_of(int previous, int id) const {
    std::string_view piece = this->piece(id);
    if (previous == bos && !piece.empty() && piece.front() == ' ') piece.remove_prefix(1);
    std::string bytes(piece);
    if (piece.size() == 6 && piece.starts_with("<0x") && piece.back() == '>' &&
        std::isxdigit(static_cast<unsigned char>(piece[3])) && std::isxdigit(static_cast<unsigned char>(piece[4])))
      bytes = std::string(1, static_cast<char>(std::stoi(std::string(piece.substr(3, 2)), nullptr, 16)));
    if (bytes.size() == 1) {
      const unsigned char byte = static_cast<unsigned char>(bytes[0]);
      if (byte >= 0x80 || !(std::isprint(byte) || std::isspace(byte))) return {};
    }
    return bytes;
  }

 private:
  int id_of(const std::string& piece) const {
    const auto found = ids_.find(piece);
    if (found == ids_.end())
      kvcache::detail::fail(kvcache::errc::corrupt_data, "tokenizer has no piece '", piece, "'");
    return found->second;
  }

  std::vector<std::string> pieces_;  // [vocab] bytes of each token
  std::vector<float> scores_;        // [vocab] merge priority
  std::unordered_map<std::string, int> ids_;
};

}  // namespace llama2
