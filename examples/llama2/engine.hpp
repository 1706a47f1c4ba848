// Choosing the cache at run time: one KVCache instantiation per (policy, dtype) the command line
// can name, each sized for `sequences` sequences of the model's full context.
#pragma once

#include <kvcache/kvcache.hpp>

#include <concepts>
#include <optional>
#include <string>
#include <utility>

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

// The element types with_cache compiles a cache for: each costs one KVCache instantiation per
// policy, so a caller that needs only some of them (a test, a benchmark) names just those.
template <class... Types>
struct DTypeList {};
using AllDTypes = DTypeList<kvcache::f32, kvcache::f16, kvcache::bf16, kvcache::int8, kvcache::fp8_e4m3, kvcache::fp8_e5m2,
                            kvcache::int8_hadamard, kvcache::fp8_e4m3_hadamard, kvcache::int4, kvcache::int8_residual,
                            kvcache::fp8_e4m3_residual>;

// int4 and the residual types quantize 32 tokens at a time: they are compiled only for the
// policies whose pages hold whole groups of 32.
template <class Layout, class DType>
inline constexpr bool compiled_for = kvcache::residual_tokens<DType> == 0 || std::same_as<Layout, kvcache::Contiguous> ||
                                     std::same_as<Layout, kvcache::Paged<32>>;

// Calls run(cache, options) with a cache of the chosen type, one of DTypes. Throws
// kvcache::Error for a choice that names no known policy, block size or compiled dtype.
template <class DTypes = AllDTypes, class Run>
auto with_cache(const CacheChoice& choice, const Config& config, int sequences,
                GenerationOptions options, Run&& run) {
  using namespace kvcache;
  const ModelShape shape = config.kv_shape();
  auto with_dtype = [&](auto make_policy) {
    using Layout = decltype(make_policy());
    return [&]<class First, class... Rest>(DTypeList<First, Rest...>) {
      std::optional<decltype(run(std::declval<KVCache<Contiguous, First>&>(), options))> result;
      auto run_if_chosen = [&]<class DType>(DType) {
        if (choice.dtype != DType::name) return false;
        if constexpr (compiled_for<Layout, DType>) {
          KVCache<Layout, DType> cache(shape, make_policy());
          result.emplace(run(cache, options));
          return true;
        } else {
          detail::fail(errc::invalid_configuration, "--dtype ", choice.dtype, " quantizes 32 tokens at a time: use ",
                       "--cache contiguous, or --cache paged --block 32");
        }
      };
      if (run_if_chosen(First{}) || (run_if_chosen(Rest{}) || ...)) return std::move(*result);
      std::string names{First::name};
      ((names += ", ", names += Rest::name), ...);
      detail::fail(errc::invalid_configuration, "--dtype ", choice.dtype, ": use ", names);
    }(DTypes{});
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
