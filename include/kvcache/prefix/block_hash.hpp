// Block identity for prefix caching: a 64-bit hash chained from the parent block.
//
// The hash of a full block of token ids is a pure function of the ids, the parent block's hash
// and a root that fingerprints everything else the K/V depend on. It is the same in every
// process, run and machine (no seed, no pointer, no std::hash), so caches in different
// processes agree on block names and an observer can route requests by them. Specification,
// version 1 (golden values in tests/prefix/block_hash_test.cpp pin it):
//
//   step(h, w)   = fmix64((h ^ w) + 0x9E3779B97F4A7C15)    all arithmetic mod 2^64
//   fmix64(x)    = x ^= x >> 33; x *= 0xFF51AFD7ED558CCD; x ^= x >> 33;
//                  x *= 0xC4CEB9FE1A85EC53; x ^= x >> 33      (MurmurHash3's finalizer)
//
//   root         = fold of step over the words, starting from h = 0x6B76636163686531 ("kvcache1"):
//                  layers, kv_heads, head_dim, dtype bits, each byte of the dtype name,
//                  block_tokens, salt
//   block(p, t)  = fold of step over words w_j = t[2j] | t[2j + 1] << 32 (token ids as uint32,
//                  so the byte order in memory never matters; t[n] = 0 for odd n), from h = p
//   chain        = block(root, tokens[0, B)), then block(that, tokens[B, 2B)), ...
//
// The salt isolates tenants (different salts never share a block) and should also carry the
// model's identity when two models have the same shape: the K/V of a token depend on the weights.
// A 64-bit hash can collide, so a hash only finds a candidate; PrefixIndex verifies the token
// ids and the exact parent before it shares a block.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "../config.hpp"
#include "../shape.hpp"

KVCACHE_BEGIN_NAMESPACE

using BlockHash = std::uint64_t;

namespace prefix_hash {

constexpr std::uint64_t fmix64(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDull;
  x ^= x >> 33;
  x *= 0xC4CEB9FE1A85EC53ull;
  x ^= x >> 33;
  return x;
}

constexpr std::uint64_t step(std::uint64_t h, std::uint64_t word) {
  return fmix64((h ^ word) + 0x9E3779B97F4A7C15ull);
}

constexpr std::uint64_t seed = 0x6B76636163686531ull;  // "kvcache1"

}  // namespace prefix_hash

// The hash every chain of one cache starts from.
constexpr BlockHash prefix_root(const ModelShape& shape, int dtype_bits, std::string_view dtype_name,
                                int block_tokens, std::uint64_t salt) {
  using prefix_hash::step;
  std::uint64_t h = prefix_hash::seed;
  h = step(h, static_cast<std::uint64_t>(shape.layers));
  h = step(h, static_cast<std::uint64_t>(shape.kv_heads));
  h = step(h, static_cast<std::uint64_t>(shape.head_dim));
  h = step(h, static_cast<std::uint64_t>(dtype_bits));
  for (char c : dtype_name) h = step(h, static_cast<unsigned char>(c));
  h = step(h, static_cast<std::uint64_t>(block_tokens));
  return step(h, salt);
}

template <class DType>
constexpr BlockHash prefix_root(const ModelShape& shape, int block_tokens, std::uint64_t salt) {
  return prefix_root(shape, DType::bits, DType::name, block_tokens, salt);
}

// The hash of a block holding `tokens` whose parent block hashes to `parent`.
constexpr BlockHash hash_block(BlockHash parent, std::span<const std::int32_t> tokens) {
  std::uint64_t h = parent;
  std::size_t i = 0;
  for (; i + 1 < tokens.size(); i += 2)
    h = prefix_hash::step(h, static_cast<std::uint32_t>(tokens[i]) |
                                 std::uint64_t{static_cast<std::uint32_t>(tokens[i + 1])} << 32);
  if (i < tokens.size()) h = prefix_hash::step(h, static_cast<std::uint32_t>(tokens[i]));
  return h;
}

KVCACHE_END_NAMESPACE
