// The stories260K engine: decode tokens/s with a KV cache against recomputing K/V of the whole
// prefix at every step (--cache none), for 64, 128 and 256 generated tokens, in one run.
#include <benchmark/benchmark.h>

#include "llama2/engine.hpp"

namespace {

const std::string model_dir = KVCACHE_STORIES260K_DIR;

void BM_llama2_generate(benchmark::State& state, const char* policy) {
  static const llama2::Checkpoint checkpoint(model_dir + "/stories260K.bin");
  static const llama2::Tokenizer tokenizer(model_dir + "/tok512.bin", checkpoint.config().vocab_size);
  static llama2::Transformer model(checkpoint);
  llama2::GenerationOptions options;
  options.steps = static_cast<int>(state.range(0)) + 1;  // BOS, then range(0) generated tokens
  options.temperature = 0.0f;
  options.stop_on_bos = false;
  int generated = 0;
  llama2::with_cache<llama2::DTypeList<kvcache::f32>>({.policy = policy}, checkpoint.config(), 1, options, [&](auto& cache, const auto& run_options) {
    llama2::Generator generator(model, tokenizer, cache, run_options);
    for (auto _ : state) {
      const auto results = generator.run({""});
      generated += static_cast<int>(results.front().generated_ids.size());
      benchmark::DoNotOptimize(results.data());
    }
    return 0;
  });
  state.counters["tokens_per_second"] = benchmark::Counter(generated, benchmark::Counter::kIsRate);
}

BENCHMARK_CAPTURE(BM_llama2_generate, cache, "contiguous")->Arg(64)->Arg(128)->Arg(256)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_llama2_generate, none, "none")->Arg(64)->Arg(128)->Arg(256)->Unit(benchmark::kMillisecond);

}  // namespace
