// The smallest integration: build a cache, prefill a prompt, decode a few steps, print memory.
//
// A real engine computes q, k and v with its model; here they are random, and the point is the
// order of the calls: reserve once per step, then for each layer append and attend.
#include <kvcache/kvcache.hpp>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  using namespace kvcache;
  const ModelShape shape{.layers = 4, .q_heads = 8, .kv_heads = 2, .head_dim = 64};  // GQA
  KVCache<Paged<16>, f16> cache(shape, Paged<16>{.num_blocks = 64});

  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  auto random = [&](std::size_t count) {
    std::vector<float> values(count);
    for (float& value : values) value = normal(rng);
    return values;
  };
  const std::size_t kv_per_token = static_cast<std::size_t>(shape.kv_heads) * shape.head_dim;
  const std::size_t q_per_token = static_cast<std::size_t>(shape.q_heads) * shape.head_dim;

  // Prefill: the prompt's 37 tokens go through every layer at once.
  const SeqId seq = cache.open();
  const int prompt = 37;
  cache.reserve(seq, prompt);
  for (int layer = 0; layer < shape.layers; ++layer) {
    const auto k = random(prompt * kv_per_token), v = random(prompt * kv_per_token);
    cache.append(layer, seq, k, v);
    const auto q = random(prompt * q_per_token);
    std::vector<float> out(q.size());
    attention::prefill(cache, layer, seq, q, out);
  }

  // Decode: one token per step.
  std::vector<float> out(q_per_token);
  for (int step = 0; step < 5; ++step) {
    if (!cache.can_reserve(seq, 1)) break;  // a scheduler would preempt or queue here
    cache.reserve(seq, 1);
    for (int layer = 0; layer < shape.layers; ++layer) {
      const auto k = random(kv_per_token), v = random(kv_per_token), q = random(q_per_token);
      cache.append(layer, seq, k, v);
      attention::decode(cache, layer, seq, q, out);
    }
    std::printf("step %d: length %d, out[0] = %+.4f\n", step, cache.length(seq), out[0]);
  }

  const MemoryStats stats = cache.stats();
  std::printf("KV bytes: %zu per token, %zu allocated, %zu reserved, %zu holding tokens (%.0f%% of reserved)\n",
              bytes_per_token<f16>(shape), stats.bytes_capacity, stats.bytes_reserved,
              stats.bytes_used, 100.0 * stats.utilization());
  cache.release(seq);
}
