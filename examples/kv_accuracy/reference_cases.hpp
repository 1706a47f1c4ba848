// The reference cases of expected.jsonl: llama2.c's greedy (f32) outputs for stories260K.
//
// One JSON object a line. Only the fields used here are read, by a reader that knows just
// enough JSON for this file: a quoted string with simple backslash escapes, an integer, an
// array of integers. A line missing one of them is an error that names the line.
#pragma once

#include <kvcache/error.hpp>

#include <charconv>
#include <cstddef>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

namespace kv_accuracy {

struct ReferenceCase {
  std::string name;
  std::string prompt;
  int steps = 0;                   // positions run, prompt included (llama2.c's -n)
  std::vector<int> prompt_ids;     // BOS first
  std::vector<int> generated_ids;  // after the prompt, without a stopping BOS

  // The whole text as tokens, prompt then generation.
  std::vector<int> tokens() const {
    std::vector<int> all = prompt_ids;
    all.insert(all.end(), generated_ids.begin(), generated_ids.end());
    return all;
  }
};

namespace detail {

[[noreturn]] inline void bad_line(int line, std::string_view key, const char* problem) {
  kvcache::detail::fail(kvcache::errc::corrupt_data, "expected.jsonl line ", line, ": field \"",
                        key, "\" ", problem);
}

// Where the value of "key" starts in `text`, after the colon and any spaces.
inline std::size_t value_start(std::string_view text, std::string_view key, int line) {
  const std::string quoted = "\"" + std::string(key) + "\"";
  std::size_t at = text.find(quoted);
  if (at == std::string_view::npos) bad_line(line, key, "is missing");
  at = text.find(':', at + quoted.size());
  if (at == std::string_view::npos) bad_line(line, key, "has no value");
  at = text.find_first_not_of(" \t", at + 1);
  if (at == std::string_view::npos) bad_line(line, key, "has no value");
  return at;
}

// The integer at text[at], and where it ends.
inline int integer_at(std::string_view text, std::size_t& at, std::string_view key, int line) {
  int value = 0;
  const auto [end, error] = std::from_chars(text.data() + at, text.data() + text.size(), value);
  if (error != std::errc{}) bad_line(line, key, "holds something other than an integer");
  at = static_cast<std::size_t>(end - text.data());
  return value;
}

inline std::string string_field(std::string_view text, std::string_view key, int line) {
  std::size_t at = value_start(text, key, line);
  if (text[at] != '"') bad_line(line, key, "is not a string");
  std::string value;
  for (++at; at < text.size() && text[at] != '"'; ++at) {
    if (text[at] != '\\') {
      value += text[at];
      continue;
    }
    if (++at == text.size()) break;
    const char escape = text[at];
    if (escape == 'u') bad_line(line, key, "uses a \\u escape, which this reader does not decode");
    value += escape == 'n' ? '\n' : escape == 't' ? '\t' : escape;  // \" \\ \/ stand for themselves
  }
  if (at == text.size()) bad_line(line, key, "has no closing quote");
  return value;
}

inline int int_field(std::string_view text, std::string_view key, int line) {
  std::size_t at = value_start(text, key, line);
  return integer_at(text, at, key, line);
}

inline std::vector<int> ints_field(std::string_view text, std::string_view key, int line) {
  std::size_t at = value_start(text, key, line);
  if (text[at] != '[') bad_line(line, key, "is not an array");
  std::vector<int> values;
  for (;;) {
    at = text.find_first_not_of(" \t", at + 1);
    if (at == std::string_view::npos) bad_line(line, key, "has no closing bracket");
    if (text[at] == ']') return values;
    values.push_back(integer_at(text, at, key, line));
    at = text.find_first_not_of(" \t", at);
    if (at == std::string_view::npos || (text[at] != ',' && text[at] != ']'))
      bad_line(line, key, "is not an array of integers");
    if (text[at] == ']') return values;
  }
}

}  // namespace detail

// Every case of `path`. Throws kvcache::Error{corrupt_data} for a missing file or bad line.
inline std::vector<ReferenceCase> read_reference_cases(const std::string& path) {
  std::ifstream file(path);
  if (!file) kvcache::detail::fail(kvcache::errc::corrupt_data, "cannot open reference cases '", path, "'");
  std::vector<ReferenceCase> cases;
  int line_number = 0;
  for (std::string line; std::getline(file, line);) {
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    cases.push_back({.name = detail::string_field(line, "case", line_number),
                     .prompt = detail::string_field(line, "prompt", line_number),
                     .steps = detail::int_field(line, "steps", line_number),
                     .prompt_ids = detail::ints_field(line, "prompt_ids", line_number),
                     .generated_ids = detail::ints_field(line, "generated_ids", line_number)});
  }
  if (cases.empty()) kvcache::detail::fail(kvcache::errc::corrupt_data, "'", path, "' holds no reference case");
  return cases;
}

}  // namespace kv_accuracy
