// llama2: a small Llama engine on kvcache, with llama2.c's command line.
//
//   llama2 <checkpoint> -z <tokenizer> [-t temperature] [-p top_p] [-s seed] [-n steps]
//          [-i prompt | --prompts FILE] [--batch N]
//          [--cache contiguous|paged|window|none] [--dtype f32|f16|bf16|int8|fp8_e4m3|fp8_e5m2|int8_hadamard|fp8_e4m3_hadamard|int4|int8_residual|fp8_e4m3_residual]
//          [--block 8|16|32] [--window W] [--sinks S]
//
// Standard output is the generated text exactly as llama2.c's run.c prints it (with --prompts,
// each prompt's text on its own line, in input order); statistics go to standard error.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <string>
#include <vector>

#include "engine.hpp"

namespace {

[[noreturn]] void usage(const char* message) {
  std::fprintf(stderr,
               "error: %s\n"
               "usage: llama2 <checkpoint> -z <tokenizer> [-t temperature] [-p top_p] [-s seed] [-n steps]\n"
               "              [-i prompt | --prompts FILE] [--batch N]\n"
               "              [--cache contiguous|paged|window|none] [--dtype f32|f16|bf16|int8|fp8_e4m3|fp8_e5m2|int8_hadamard|fp8_e4m3_hadamard|int4|int8_residual|fp8_e4m3_residual]\n"
               "              [--block 8|16|32] [--window W] [--sinks S]\n",
               message);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage("no checkpoint given");
  const std::string checkpoint_path = argv[1];
  std::string tokenizer_path = "tokenizer.bin", prompt, prompts_path;
  llama2::GenerationOptions options;
  llama2::CacheChoice choice;
  long long seed = 0;
  for (int i = 2; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) usage(("no value after " + flag).c_str());
    const char* value = argv[i + 1];
    if (flag == "-z") tokenizer_path = value;
    else if (flag == "-t") options.temperature = std::strtof(value, nullptr);
    else if (flag == "-p") options.top_p = std::strtof(value, nullptr);
    else if (flag == "-s") seed = std::atoll(value);
    else if (flag == "-n") options.steps = std::atoi(value);
    else if (flag == "-i") prompt = value;
    else if (flag == "--prompts") prompts_path = value;
    else if (flag == "--batch") options.max_batch = std::atoi(value);
    else if (flag == "--cache") choice.policy = value;
    else if (flag == "--dtype") choice.dtype = value;
    else if (flag == "--block") choice.block = std::atoi(value);
    else if (flag == "--window") choice.window = std::atoi(value);
    else if (flag == "--sinks") choice.sinks = std::atoi(value);
    else usage(("unknown option " + flag).c_str());
  }
  if (options.temperature < 0) options.temperature = 0;
  if (options.max_batch < 1) usage("--batch must be at least 1");
  options.seed = seed > 0 ? static_cast<std::uint64_t>(seed) : static_cast<std::uint64_t>(std::time(nullptr));

  std::vector<std::string> prompts{prompt};
  const bool batch_file = !prompts_path.empty();
  if (batch_file) {
    std::ifstream file(prompts_path);
    if (!file) usage(("cannot open --prompts file " + prompts_path).c_str());
    prompts.clear();
    for (std::string line; std::getline(file, line);) prompts.push_back(line);
  }

  try {
    const llama2::Checkpoint checkpoint(checkpoint_path);
    const llama2::Tokenizer tokenizer(tokenizer_path, checkpoint.config().vocab_size);
    llama2::Transformer model(checkpoint);
    const int sequences = options.max_batch;
    return llama2::with_cache(choice, checkpoint.config(), sequences, options, [&](auto& cache, const auto& run_options) {
      llama2::Generator generator(model, tokenizer, cache, run_options);
      auto stream = [&](std::size_t, const std::string& text) {
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
      };
      const auto results = batch_file ? generator.run(prompts) : generator.run(prompts, stream);
      if (batch_file)
        for (const auto& result : results) std::printf("%s\n", result.text.c_str());
      else
        std::printf("\n");
      std::fflush(stdout);
      const llama2::GenerationStats& stats = generator.stats();
      int positions = 0;
      for (const auto& result : results) positions += result.forward_calls;
      const double first = results.front().first_token_seconds;
      std::fprintf(stderr,
                   "cache %s %s: %zu prompt(s), %d positions, %d generated tokens in %.3f s\n"
                   "time to first token %.2f ms, decode %.0f tokens/s\n"
                   "KV bytes: %zu per token; peak %zu holding tokens, %zu reserved, %zu allocated\n",
                   choice.policy.c_str(), choice.dtype.c_str(), results.size(), positions,
                   stats.generated_tokens, stats.seconds, first * 1e3,
                   stats.seconds > first ? (stats.generated_tokens - 1) / (stats.seconds - first) : 0.0,
                   kvcache::bytes_per_token(cache.shape(), typename std::decay_t<decltype(cache)>::dtype{}),
                   stats.peak_bytes_used, stats.peak_bytes_reserved, stats.bytes_capacity);
      return 0;
    });
  } catch (const kvcache::Error& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 1;
  }
}
