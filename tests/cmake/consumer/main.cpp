// Exits 0 only if kvcache computed what it must: the memory math, and attention over keys and
// values that make the answer exact (every value row is 0.25, so every output is 0.25).
#include <kvcache/kvcache.hpp>

#include <cstdio>
#include <vector>

int main() {
  const kvcache::ModelShape shape{2, 4, 2, 8};
  kvcache::KVCache<kvcache::Paged<16>, kvcache::f16> cache(shape, {.num_blocks = 4});
  const kvcache::SeqId seq = cache.open();
  cache.reserve(seq, 20);
  std::vector<float> k(20 * 2 * 8, 0.5f), v(k.size(), 0.25f);
  for (int layer = 0; layer < shape.layers; ++layer)
    cache.append(layer, seq, k, v);
  std::vector<float> q(4 * 8, 1.0f), out(q.size());
  kvcache::attention::decode(cache, 1, seq, q, out);
  const bool ok = kvcache::bytes_per_token<kvcache::f16>(shape) == 128 && cache.length(seq) == 20 &&
                  out[0] == 0.25f && out.back() == 0.25f;
  std::printf("consumer: bytes_per_token=%zu out=%g %s\n",
              kvcache::bytes_per_token<kvcache::f16>(shape), out[0], ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
