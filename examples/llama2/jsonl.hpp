// Just enough JSON to read the reference files beside the model (expected.jsonl,
// sampled.jsonl: one object per line, as llama2.c's outputs were recorded), for the tests and
// the examples that compare against them. Not a general parser: it trusts its input.
#pragma once

#include <cctype>
#include <cstddef>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace llama2 {

struct Json {
  std::variant<std::nullptr_t, bool, double, std::string, std::vector<Json>, std::map<std::string, Json>> value;
  const Json& operator[](const std::string& key) const { return std::get<std::map<std::string, Json>>(value).at(key); }
  const std::string& str() const { return std::get<std::string>(value); }
  int integer() const { return static_cast<int>(std::get<double>(value)); }
  bool boolean() const { return std::get<bool>(value); }
  std::vector<int> ints() const {
    std::vector<int> out;
    for (const Json& item : std::get<std::vector<Json>>(value)) out.push_back(item.integer());
    return out;
  }
};

class JsonReader {
 public:
  explicit JsonReader(std::string_view text) : text_(text) {}
  Json parse() {
    skip();
    const char c = text_[at_];
    if (c == '{') {
      std::map<std::string, Json> object;
      ++at_;
      while (skip(), text_[at_] != '}') {
        std::string key = parse().str();
        skip(), ++at_;  // ':'
        object[key] = parse();
        skip();
        if (text_[at_] == ',') ++at_;
      }
      ++at_;
      return {object};
    }
    if (c == '[') {
      std::vector<Json> array;
      ++at_;
      while (skip(), text_[at_] != ']') {
        array.push_back(parse());
        skip();
        if (text_[at_] == ',') ++at_;
      }
      ++at_;
      return {array};
    }
    if (c == '"') return {string()};
    if (text_.substr(at_, 4) == "true") return at_ += 4, Json{true};
    if (text_.substr(at_, 5) == "false") return at_ += 5, Json{false};
    if (text_.substr(at_, 4) == "null") return at_ += 4, Json{nullptr};
    std::size_t used = 0;
    const double number = std::stod(std::string(text_.substr(at_, 32)), &used);
    at_ += used;
    return {number};
  }

 private:
  void skip() {
    while (at_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[at_]))) ++at_;
  }
  std::string string() {
    std::string out;
    for (++at_; text_[at_] != '"'; ++at_) {
      if (text_[at_] != '\\') {
        out += text_[at_];
        continue;
      }
      const char escape = text_[++at_];
      if (escape == 'n') out += '\n';
      else if (escape == 't') out += '\t';
      else if (escape == 'u') {
        const auto code = std::stoul(std::string(text_.substr(at_ + 1, 4)), nullptr, 16);
        at_ += 4;
        if (code < 0x80) out += static_cast<char>(code);
        else if (code < 0x800) out += static_cast<char>(0xC0 | code >> 6), out += static_cast<char>(0x80 | (code & 0x3F));
        else out += static_cast<char>(0xE0 | code >> 12), out += static_cast<char>(0x80 | (code >> 6 & 0x3F)),
             out += static_cast<char>(0x80 | (code & 0x3F));
      } else out += escape;  // \" \\ \/
    }
    ++at_;
    return out;
  }
  std::string_view text_;
  std::size_t at_ = 0;
};

// One JSON object per non-empty line of the file at `path`; none if it cannot be read.
inline std::vector<Json> read_jsonl(const std::string& path) {
  std::ifstream file(path);
  std::vector<Json> objects;
  for (std::string line; std::getline(file, line);)
    if (!line.empty()) objects.push_back(JsonReader(line).parse());
  return objects;
}

}  // namespace llama2
