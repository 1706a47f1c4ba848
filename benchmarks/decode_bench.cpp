// Decode attention against the roofline: for model geometries, storage policies, element types,
// context lengths, batch sizes and thread counts, the bytes of K/V read per second and the
// fraction of the roofline (max(bytes / read rate, flops / FMA rate), both rates measured in
// this same run by roofline.hpp: the FMA rate once, the read rate just before and just after
// each benchmark, the higher taken) that the kernel reaches. Element types whose kernels
// multiply-add 16-bit integers (int8, int4 with AVX-512 VNNI or AVX2) are judged by the
// same-run integer multiply-add rate instead of the FMA rate.
//
// Each benchmark cycles through the layers of a cache holding at least 1 GiB of K/V, so every
// layer is cold when it is read, as in real decoding.
//   kvcache_bench --benchmark_filter=Decode --benchmark_format=json
#include <benchmark/benchmark.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <string>

#include "bench_support.hpp"
#include "roofline.hpp"

namespace kvcache::bench {
namespace {

struct Geometry {
  const char* name;
  int q_heads, kv_heads, head_dim;
};
constexpr Geometry geometries[] = {{"llama3_8b", 32, 8, 128}, {"llama2_7b", 32, 32, 128}, {"mqa", 32, 1, 128}};
static_assert(std::ranges::all_of(geometries, [](const Geometry& g) { return attention::has_fast_kernels(g.head_dim); }));
constexpr std::size_t working_set = std::size_t{1} << 30;
constexpr std::size_t largest_layer = std::size_t{3} << 30;  // configurations above are skipped

// K/V bytes of one layer, scales of quantized types included.
template <class DType>
std::size_t layer_bytes(const Geometry& g, int tokens, int batch) {
  return static_cast<std::size_t>(batch) * tokens * g.kv_heads * token_bytes<DType>(static_cast<std::size_t>(g.head_dim));
}

// How a paged sequence's blocks lie in the pool: one after another (a fresh pool), or scattered
// as in a long-running engine: each sequence reserves 1 to 4 blocks at a time while another
// takes 0 to 3 between them, and that one is released, leaving holes; or shuffled: the whole
// pool is taken a block per sequence and released in random order, so blocks come in any order.
enum class Blocks { consecutive, scattered, shuffled };

// The cache of the configuration measured last; building the next one frees it first.
template <class Layout, class DType>
struct Fixture {
  std::unique_ptr<KVCache<Layout, DType>> cache;
  std::vector<SeqId> seqs;
  std::string key;

  static Fixture& get(const Geometry& g, int tokens, int batch, Blocks blocks = Blocks::consecutive) {
    static Fixture fixture;
    const bool scattered = blocks == Blocks::scattered;
    const std::string key = std::string(g.name) + "/" + std::to_string(tokens) + "/" + std::to_string(batch) +
                            "/" + std::to_string(static_cast<int>(blocks));
    if (fixture.key != key) {
      fixture.cache.reset();
      fixture.seqs.clear();
      const std::size_t per_layer = layer_bytes<DType>(g, tokens, batch);
      const int layers = static_cast<int>(std::max<std::size_t>(1, (working_set + per_layer - 1) / per_layer));
      Layout policy = policy_for<Layout>(tokens, batch);
      if constexpr (is_paged<Layout>) {
        if (scattered) policy = {.num_blocks = 2 * policy.num_blocks, .max_sequences = batch + 1};
        if (blocks == Blocks::shuffled) policy = {.num_blocks = policy.num_blocks, .max_sequences = policy.num_blocks + 1, .max_tokens = tokens};
      }
      fixture.cache = std::make_unique<KVCache<Layout, DType>>(ModelShape{layers, g.q_heads, g.kv_heads, g.head_dim}, policy);
      auto& cache = *fixture.cache;
      const auto k = random_values(static_cast<std::size_t>(tokens) * g.kv_heads * g.head_dim, 1);
      const auto v = random_values(k.size(), 2);
      std::mt19937 rng(5);
      if (blocks == Blocks::shuffled) {
        if constexpr (is_paged<Layout>) {
          std::vector<SeqId> ones;
          for (int b = 0; b < policy.num_blocks; ++b) ones.push_back(cache.open()), cache.reserve(ones.back(), Layout::block_tokens);
          std::shuffle(ones.begin(), ones.end(), rng);
          for (SeqId one : ones) cache.release(one);
        }
      }
      const SeqId other = scattered ? cache.open() : SeqId{};
      int block = 1;  // tokens per block of a paged layout
      if constexpr (is_paged<Layout>) block = Layout::block_tokens;
      for (int i = 0; i < batch; ++i) {
        const SeqId seq = cache.open();
        if (scattered) {
          for (int reserved = 0; reserved < tokens;) {
            reserved = std::min(tokens, reserved + block * std::uniform_int_distribution<int>(1, 4)(rng));
            cache.reserve(seq, reserved);
            const int more = cache.reserved(other) + block * std::uniform_int_distribution<int>(0, 3)(rng);
            if (cache.can_reserve(other, more)) cache.reserve(other, more);
          }
        }
        cache.reserve(seq, tokens);
        for (int layer = 0; layer < layers; ++layer) cache.append(layer, seq, k, v);
        fixture.seqs.push_back(seq);
      }
      if (scattered) cache.release(other);
      fixture.key = key;
    }
    return fixture;
  }
};

// Seconds per iteration of a benchmark's loop and the roofline to judge it by.
struct Judged {
  double seconds;
  Roofline ceiling;
};

// Runs `step` once per benchmark iteration; judges it by the roofline with the read ceiling
// measured just before the loop and just after it, the higher (roofline_now).
template <class Step>
Judged run_between_ceilings(benchmark::State& state, int threads, Step&& step) {
  const Roofline before = roofline_now(threads);
  const double seconds = seconds_per_iteration(state, step);
  const Roofline after = roofline_now(threads);
  return {seconds, after.read_bytes_per_second > before.read_bytes_per_second ? after : before};
}

template <class Layout, class DType>
void run_decode(benchmark::State& state, const Geometry& g, int tokens, int batch, int threads,
                Blocks blocks = Blocks::consecutive) {
  auto& fixture = Fixture<Layout, DType>::get(g, tokens, batch, blocks);
  auto& cache = *fixture.cache;
  const int layers = cache.shape().layers;
  const auto q = random_values(static_cast<std::size_t>(batch) * g.q_heads * g.head_dim, 3);
  std::vector<float> out(q.size());
  int layer = 0;
  const auto [seconds, ceiling] = run_between_ceilings(state, threads, [&] {
    attention::decode(cache, layer, fixture.seqs, q, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    layer = layer + 1 == layers ? 0 : layer + 1;
  });
  const double bytes = static_cast<double>(layer_bytes<DType>(g, tokens, batch));
  const double flops = 4.0 * batch * g.q_heads * static_cast<double>(tokens) * g.head_dim;  // QK and PV
  using benchmark::Counter;
  state.counters["tokens"] = tokens;
  state.counters["batch"] = batch;
  state.counters["threads"] = threads;
  state.counters["working_set_gib"] = static_cast<double>(bytes * layers) / (1 << 30);
  state.counters["bytes_per_second"] = Counter(bytes, Counter::kIsIterationInvariantRate);
  const bool integer = attention::cpu::uses_integer_dot_products<typename DType::storage_type>(g.head_dim);
  state.counters["roofline_fraction"] = ceiling.seconds(bytes, flops, integer) / seconds;
  state.counters["read_bytes_per_second"] = ceiling.read_bytes_per_second;
}

template <class Layout, class DType>
void register_decode(const Geometry& g, const char* policy, Blocks blocks = Blocks::consecutive) {
  for (int tokens : {1024, 4096, 16384, 32768})
    for (int batch : {1, 8}) {
      if (layer_bytes<DType>(g, tokens, batch) > largest_layer) continue;
      for (int threads : {1, 2}) {
        const std::string name = std::string("Decode/") + g.name + "/" + policy + "/" + std::string(DType::name) +
                                 "/T:" + std::to_string(tokens) + "/batch:" + std::to_string(batch) +
                                 "/threads:" + std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& state) {
          run_decode<Layout, DType>(state, g, tokens, batch, threads, blocks);
        })->Unit(benchmark::kMicrosecond)->UseRealTime();
      }
    }
}

template <class Layout>
void register_policy(const char* policy) {
  for (const Geometry& g : geometries) {
    register_decode<Layout, f32>(g, policy);
    register_decode<Layout, f16>(g, policy);
    register_decode<Layout, bf16>(g, policy);
    register_decode<Layout, int8>(g, policy);
    register_decode<Layout, fp8_e4m3>(g, policy);
    if constexpr (std::same_as<Layout, Contiguous>) {  // groups of 32 tokens need pages of whole groups
      register_decode<Layout, int4>(g, policy);
      register_decode<Layout, int8_residual>(g, policy);
    }
  }
}

const bool registered = [] {
  register_policy<Contiguous>("contiguous");
  register_policy<Paged<16>>("paged16");
  // Paged with its blocks scattered or shuffled (Blocks above), to compare with paged16 in one run.
  register_decode<Paged<16>, f32>(geometries[0], "paged16_scattered", Blocks::scattered);
  register_decode<Paged<16>, f16>(geometries[0], "paged16_scattered", Blocks::scattered);
  register_decode<Paged<16>, f32>(geometries[0], "paged16_shuffled", Blocks::shuffled);
  register_decode<Paged<16>, f16>(geometries[0], "paged16_shuffled", Blocks::shuffled);
  // Larger blocks in a shuffled pool: how much of paged16_shuffled's loss they take back.
  register_decode<Paged<32>, f16>(geometries[0], "paged32_shuffled", Blocks::shuffled);
  register_decode<Paged<64>, f16>(geometries[0], "paged64_shuffled", Blocks::shuffled);
  return true;
}();

// Continuous batching: 64 Llama-3-8B f16 sequences of ragged lengths, uniform in
// [T/2, 3T/2) with mean T, in one decode call over paged storage. Compare its bytes_per_second
// with Decode/llama3_8b/paged16/f16/T:<T>/batch:1 on the same thread count in the same run.
void DecodeRagged(benchmark::State& state, int mean_tokens, int threads) {
  constexpr int batch = 64;
  const Geometry& g = geometries[0];
  std::mt19937 rng(9);
  std::vector<int> lengths(batch);
  for (int& length : lengths) length = std::uniform_int_distribution<int>(mean_tokens / 2, mean_tokens * 3 / 2 - 1)(rng);
  const int total = std::accumulate(lengths.begin(), lengths.end(), 0);
  KVCache<Paged<16>, f16> cache({1, g.q_heads, g.kv_heads, g.head_dim},
                                {.num_blocks = total / 16 + batch, .max_sequences = batch});
  std::vector<SeqId> seqs;
  const auto rows = random_values(static_cast<std::size_t>(mean_tokens) * 3 / 2 * g.kv_heads * g.head_dim, 4);
  for (int length : lengths) {
    const SeqId seq = cache.open();
    cache.reserve(seq, length);
    const std::span<const float> k(rows.data(), static_cast<std::size_t>(length) * g.kv_heads * g.head_dim);
    cache.append(0, seq, k, k);
    seqs.push_back(seq);
  }
  const auto q = random_values(static_cast<std::size_t>(batch) * g.q_heads * g.head_dim, 3);
  std::vector<float> out(q.size());
  const auto [seconds, ceiling] = run_between_ceilings(state, threads, [&] {
    attention::decode(cache, 0, seqs, q, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  });
  const double bytes = static_cast<double>(total) * g.kv_heads * g.head_dim * 2 * 2;
  const double flops = 4.0 * g.q_heads * static_cast<double>(total) * g.head_dim;
  using benchmark::Counter;
  state.counters["tokens"] = mean_tokens;
  state.counters["batch"] = batch;
  state.counters["threads"] = threads;
  state.counters["working_set_gib"] = bytes / (1 << 30);
  state.counters["bytes_per_second"] = Counter(bytes, Counter::kIsIterationInvariantRate);
  state.counters["roofline_fraction"] = ceiling.seconds(bytes, flops) / seconds;
  state.counters["read_bytes_per_second"] = ceiling.read_bytes_per_second;
}

const bool ragged_registered = [] {
  for (int threads : {1, 2})
    benchmark::RegisterBenchmark(("DecodeRagged/llama3_8b/paged16/f16/mean_T:4096/batch:64/threads:" +
                                  std::to_string(threads)).c_str(),
                                 [=](benchmark::State& state) { DecodeRagged(state, 4096, threads); })
        ->Unit(benchmark::kMicrosecond)
        ->UseRealTime();
  return true;
}();

// Decode's kernel cost, memory aside (named so that --benchmark_filter=Decode leaves it out: it
// streams nothing from memory): one Llama-3-8B layer of 512 tokens (a kv-head's K and V
// fit in L2) decoded again and again on one thread. `row_ns`: nanoseconds per token and
// kv-head (a row of K and one of V for 4 query heads); `fma_fraction`: the FMA-peak time of
// the fp32 multiply-adds that decode needs (QK and PV) over the time taken. Compare with the
// same type's Decode/.../threads:1 in the same run: what memory adds on top of the kernel.
template <class DType>
void AttentionInCache(benchmark::State& state) {
  constexpr int tokens = 512;
  const Roofline& ceiling = roofline(1);
  const Geometry& g = geometries[0];
  KVCache<Contiguous, DType> cache({1, g.q_heads, g.kv_heads, g.head_dim}, policy_for<Contiguous>(tokens));
  const SeqId seq = cache.open();
  cache.reserve(seq, tokens);
  const auto k = random_values(static_cast<std::size_t>(tokens) * g.kv_heads * g.head_dim, 1);
  cache.append(0, seq, k, random_values(k.size(), 2));
  const auto q = random_values(static_cast<std::size_t>(g.q_heads) * g.head_dim, 3);
  std::vector<float> out(q.size());
  const SeqId seqs[] = {seq};
  const double seconds = seconds_per_iteration(state, [&] {
    attention::decode(cache, 0, seqs, q, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  });
  const double rows = static_cast<double>(tokens) * g.kv_heads;
  const double flops = 4.0 * g.q_heads * static_cast<double>(tokens) * g.head_dim;
  state.counters["tokens"] = tokens;
  state.counters["threads"] = 1;
  state.counters["row_ns"] = seconds / rows * 1e9;
  state.counters["fma_fraction"] = flops / ceiling.flops_per_second / seconds;
}
template <class DType>
void register_in_cache() {
  const std::string name = std::string("AttentionInCache/llama3_8b/contiguous/") + std::string(DType::name) + "/T:512/threads:1";
  benchmark::RegisterBenchmark(name.c_str(), AttentionInCache<DType>)->Unit(benchmark::kMicrosecond)->UseRealTime();
}
const bool in_cache_registered = [] {
  register_in_cache<f32>();
  register_in_cache<f16>();
  register_in_cache<bf16>();
  register_in_cache<int8>();
  register_in_cache<int4>();
  return true;
}();

// The ceilings themselves, as benchmarks of their own.
void Roofline_read(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(roofline(threads));
  state.counters["read_bytes_per_second"] = roofline(threads).read_bytes_per_second;
  state.counters["flops_per_second"] = roofline(threads).flops_per_second;
  state.counters["integer_flops_per_second"] = roofline(threads).integer_flops_per_second;
  state.counters["threads"] = threads;
}
BENCHMARK(Roofline_read)->Arg(1)->Arg(2)->Iterations(1);

// Issue-2's quick look: the Llama-3-8B layer in f16 for each policy, all threads.
template <class Layout>
void BM_decode(benchmark::State& state) {
  run_decode<Layout, f16>(state, geometries[0], static_cast<int>(state.range(0)), 1,
                          static_cast<int>(std::thread::hardware_concurrency()));
}
BENCHMARK_TEMPLATE(BM_decode, Contiguous)->Arg(512)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_decode, Paged<16>)->Arg(512)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_decode, SlidingWindow)->Arg(512)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
}  // namespace kvcache::bench
