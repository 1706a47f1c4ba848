// Choosing the cache at run time: one KVCache instantiation per (policy, dtype) the command line
// can name, each sized for `sequences` sequences of the model's full context.
#pragma once

#include <kvcache/kvcache.hpp>

#include <concepts>
#include <string>

#include "generator.hpp"

namespace llama2 {

struct CacheChoice {
  std::string policy = "contiguous";  // contiguous | paged | window | none
  std::string dtype = "f32";          // f32 f16 bf16 int8 fp8_e4m3 fp8_e5m2 int8_hadamard fp8_e4m3_hadamard;
                                      // int4 int8_residual fp8_e4m3_residual (contiguous, or paged with
                                      // blocks of 32)
  int block = 16;                     // paged: tokens per block (8, 16 or 32)
  int window = 0;                     // window: positions attended; 0 = the model's context
  int sinks = 0;                      // window: first positions kept forever
};

// Window caches keep this many positions beyond the window, so prompts prefill in chunks of
// slack + 1 tokens and attention never needs a position the ring has reused.
inline constexpr int window_slack = 15;

// Calls run(cache, options) with a cache of the chosen type. Throws kvcache::Error for a
// choice that names no known policy, dtype or block size.
template <class Run>
auto with_cache(const CacheChoice& choice, const Config& config, int sequences,
                GenerationOptions options, Run&& run) {
  using namespace kvcache;
  const ModelShape shape = config.kv_shape();
  auto with_dtype = [&](auto make_policy) {
    auto go = [&](auto dtype) {
      using Layout = decltype(make_policy());
      KVCache<Layout, decltype(dtype)> cache(shape, make_policy());
      return run(cache, options);
    };
    if (choice.dtype == "f32") return go(f32{});
    if (choice.dtype == "f16") return go(f16{});
    if (choice.dtype == "bf16") return go(bf16{});
    if (choice.dtype == "int8") return go(int8{});
    if (choice.dtype == "fp8_e4m3") return go(fp8_e4m3{});
    if (choice.dtype == "fp8_e5m2") return go(fp8_e5m2{});
    if (choice.dtype == "int8_hadamard") return go(int8_hadamard{});
    if (choice.dtype == "fp8_e4m3_hadamard") return go(fp8_e4m3_hadamard{});
    if (choice.dtype == "int4" || choice.dtype == "int8_residual" || choice.dtype == "fp8_e4m3_residual") {
      // Only the policies whose pages hold whole 32-token groups are compiled for these.
      using Layout = decltype(make_policy());
      if constexpr (std::same_as<Layout, Contiguous> || std::same_as<Layout, Paged<32>>) {
        if (choice.dtype == "int4") return go(int4{});
        if (choice.dtype == "int8_residual") return go(int8_residual{});
        return go(fp8_e4m3_residual{});
      }
      detail::fail(errc::invalid_configuration, "--dtype ", choice.dtype, " quantizes 32 tokens at a time: use --cache ",
                   "contiguous, or --cache paged --block 32");
    }
    detail::fail(errc::invalid_configuration, "--dtype ", choice.dtype,
                 ": use f32, f16, bf16, int8, fp8_e4m3, fp8_e5m2, int8_hadamard, fp8_e4m3_hadamard, int4, int8_residual or ",
                 "fp8_e4m3_residual");
  };
  auto paged = [&](auto block_constant) {
    constexpr int block = decltype(block_constant)::value;
    return with_dtype([&] {
      return Paged<block>{.num_blocks = sequences * Paged<block>::blocks_for(config.seq_len),
                          .max_sequences = sequences};
    });
  };
  if (choice.policy == "contiguous")
    return with_dtype([&] { return Contiguous{.max_sequences = sequences, .max_tokens = config.seq_len}; });
  if (choice.policy == "paged") {
    if (choice.block == 8) return paged(std::integral_constant<int, 8>{});
    if (choice.block == 16) return paged(std::integral_constant<int, 16>{});
    if (choice.block == 32) return paged(std::integral_constant<int, 32>{});
    detail::fail(errc::invalid_configuration, "--block ", choice.block, ": use 8, 16 or 32");
  }
  if (choice.policy == "window") {
    options.prefill_chunk = window_slack + 1;
    const int window = choice.window > 0 ? choice.window : config.seq_len;
    return with_dtype([&] {
      return SlidingWindow{.max_sequences = sequences, .window = window, .sink_tokens = choice.sinks,
                           .slack_tokens = window_slack};
    });
  }
  if (choice.policy == "none") {
    // One scratch sequence at a time holds a whole prefix, recomputed at every step.
    options.mode = KVMode::recompute;
    if (choice.dtype != "f32") detail::fail(errc::invalid_configuration, "--cache none computes in f32 only");
    return with_dtype([&] { return Contiguous{.max_sequences = 1, .max_tokens = config.seq_len}; });
  }
  detail::fail(errc::invalid_configuration, "--cache ", choice.policy, ": use contiguous, paged, window or none");
}

}  // namespace llama2
