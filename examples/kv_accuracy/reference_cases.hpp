// The reference cases of the stories260K model: llama2.c's greedy outputs in expected.jsonl.
#pragma once

#include <kvcache/error.hpp>

#include <string>
#include <vector>

#include "llama2/jsonl.hpp"

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

// Every case of `path`. Throws kvcache::Error{corrupt_data} when the file holds none.
inline std::vector<ReferenceCase> read_reference_cases(const std::string& path) {
  std::vector<ReferenceCase> cases;
  for (const llama2::Json& line : llama2::read_jsonl(path))
    cases.push_back({.name = line["case"].str(),
                     .prompt = line["prompt"].str(),
                     .steps = line["steps"].integer(),
                     .prompt_ids = line["prompt_ids"].ints(),
                     .generated_ids = line["generated_ids"].ints()});
  if (cases.empty()) kvcache::detail::fail(kvcache::errc::corrupt_data, "'", path, "' holds no reference case");
  return cases;
}

}  // namespace kv_accuracy
