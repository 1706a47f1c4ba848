// Prefix caching, copy-on-write and eviction through the KVCache API: shared prefixes give the
// unshared oracle's attention, reference counts never leak, eviction spares referenced and
// pinned blocks, forks copy nothing until a write, and events and stats tell the truth.
#include <kvcache/kvcache.hpp>

#include <map>

#include "../support/oracle.hpp"

namespace kvcache::testing {
namespace {

constexpr int block = 16;
const ModelShape gqa{2, 8, 2, 64};
const std::size_t kv_row = 2 * 64;
const std::size_t q_row = 8 * 64;

using Ids = std::vector<std::int32_t>;

// The K or V rows of positions [from, ids.size()) of one layer: a function of the ids up to each
// position, as a model's K/V are, so that equal prefixes have equal rows.
Rows rows_of(const Ids& ids, int from, int layer, int kind) {
  Rows rows;
  std::uint64_t prefix = 0x12345;
  for (std::size_t p = 0; p < ids.size(); ++p) {
    prefix = (prefix ^ static_cast<std::uint32_t>(ids[p])) * 0x100000001B3ull + p;
    if (static_cast<int>(p) < from) continue;
    std::mt19937 rng(static_cast<std::uint32_t>(prefix >> 7) + static_cast<std::uint32_t>(layer * 2 + kind));
    const auto row = random_values(rng, kv_row);
    rows.insert(rows.end(), row.begin(), row.end());
  }
  return rows;
}

Ids counting(int n, int first = 0) {
  Ids ids(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) ids[static_cast<std::size_t>(i)] = first + i;
  return ids;
}

Ids concat(Ids a, const Ids& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Appends positions [length(seq), ids.size()) in every layer.
template <class Cache>
void prefill(Cache& cache, SeqId seq, const Ids& ids) {
  const int from = cache.length(seq);
  cache.reserve(seq, static_cast<int>(ids.size()) - from);
  for (int layer = 0; layer < gqa.layers; ++layer)
    cache.append(layer, seq, rows_of(ids, from, layer, 0), rows_of(ids, from, layer, 1));
}

template <class DType>
using PagedCache = KVCache<Paged<block>, DType>;

template <class DType>
class PrefixCacheTest : public ::testing::Test {};
using DTypes = ::testing::Types<f32, f16, bf16>;
TYPED_TEST_SUITE(PrefixCacheTest, DTypes);

TYPED_TEST(PrefixCacheTest, SharedPrefixGivesTheUnsharedOraclesAttention) {
  using DType = TypeParam;
  PagedCache<DType> shared(gqa, {.num_blocks = 64, .max_sequences = 8});
  PagedCache<DType> unshared(gqa, {.num_blocks = 64, .max_sequences = 8});
  const Ids system = counting(100, 1000);
  const Ids first = concat(system, counting(21, 1)), second = concat(system, counting(37, 50));

  const SeqId a = shared.open();
  prefill(shared, a, first);
  shared.publish_prefix(a, first);
  const SeqId b = shared.open();
  EXPECT_EQ(shared.cached_prefix_length(second), 96);  // a probe: counts nothing, shares nothing
  EXPECT_EQ(shared.pool_stats().prefix_queries, 0u);
  EXPECT_EQ(shared.match_prefix(b, second), 96);  // 6 whole blocks of the 100 shared ids
  EXPECT_EQ(shared.length(b), 96);
  EXPECT_EQ(shared.pool_stats().prefix_hit_tokens, 96u);
  prefill(shared, b, second);

  const SeqId b_alone = unshared.open();
  prefill(unshared, b_alone, second);

  std::mt19937 rng(3);
  const auto q = random_values(rng, q_row);
  for (int layer = 0; layer < gqa.layers; ++layer) {
    std::vector<float> out(q_row), out_alone(q_row);
    attention::decode(shared, layer, b, q, out);
    attention::decode(unshared, layer, b_alone, q, out_alone);
    EXPECT_EQ(out, out_alone) << "layer " << layer;  // the same bytes in the same order
    const auto expected = oracle_attention(gqa, rounded<DType>(rows_of(second, 0, layer, 0)),
                                           rounded<DType>(rows_of(second, 0, layer, 1)),
                                           static_cast<int>(second.size()), q, 1, {}, 1.0 / 8.0);
    EXPECT_LE(relative_error(out, expected), 2e-5) << "layer " << layer;
  }
}

// One decode call over sequences of different lengths and different sharing (a prefix hit, a
// fork, a private one) gives each exactly what a call of its own gives, on any thread count.
TYPED_TEST(PrefixCacheTest, BatchedDecodeEqualsPerSequenceCalls) {
  using DType = TypeParam;
  PagedCache<DType> cache(gqa, {.num_blocks = 200, .max_sequences = 8});
  const Ids system = counting(700, 5);
  std::vector<SeqId> seqs;
  seqs.push_back(cache.open());
  prefill(cache, seqs[0], concat(system, counting(1400, 9000)));  // 2100: split by token range
  cache.publish_prefix(seqs[0], system);
  seqs.push_back(cache.open());
  cache.match_prefix(seqs[1], concat(system, counting(40, 1)));
  prefill(cache, seqs[1], concat(system, counting(40, 1)));
  seqs.push_back(cache.fork(seqs[1]));
  prefill(cache, seqs[2], concat(concat(system, counting(40, 1)), counting(3, 77)));
  seqs.push_back(cache.open());
  prefill(cache, seqs[3], counting(5, 3));
  std::mt19937 rng(8);
  const auto q = random_values(rng, seqs.size() * q_row);
  for (int threads : {1, 3}) {
    backend::cpu::set_threads(threads);
    std::vector<float> batched(q.size());
    attention::decode(cache, 1, std::span<const SeqId>(seqs), q, batched);
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      std::vector<float> alone(q_row);
      attention::decode(cache, 1, seqs[i], std::span(q).subspan(i * q_row, q_row), alone);
      EXPECT_TRUE(std::equal(alone.begin(), alone.end(), batched.begin() + static_cast<std::ptrdiff_t>(i * q_row)))
          << "sequence " << i << ", " << threads << " threads";
    }
  }
  backend::cpu::set_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

TEST(PrefixCache, ReferenceCountsNeverLeak) {
  PagedCache<f16> cache(gqa, {.num_blocks = 40, .max_sequences = 8});
  std::mt19937 rng(4);
  std::vector<SeqId> open;
  for (int request = 0; request < 300; ++request) {
    const Ids prompt = concat(counting(16 * std::uniform_int_distribution<int>(0, 3)(rng), 7),
                              counting(std::uniform_int_distribution<int>(1, 30)(rng), request * 100));
    if (open.size() == 6 || !cache.can_open()) {
      cache.release(open.front());
      open.erase(open.begin());
    }
    const SeqId seq = cache.open();
    cache.match_prefix(seq, prompt);
    if (!cache.can_reserve(seq, static_cast<int>(prompt.size()) - cache.length(seq))) {
      cache.release(seq);
      continue;
    }
    prefill(cache, seq, prompt);
    cache.publish_prefix(seq, prompt);
    if (request % 5 == 0) open.push_back(cache.fork(seq));
    open.push_back(seq);
    while (open.size() > 6) {
      cache.release(open.front());
      open.erase(open.begin());
    }
    cache.audit();
  }
  for (SeqId seq : open) cache.release(seq);
  const PoolStats stats = cache.pool_stats();
  EXPECT_GT(stats.prefix_hit_tokens, 0u);
  EXPECT_GT(stats.evictions, 0u);
  EXPECT_EQ(stats.blocks_in_use, 0);
  EXPECT_EQ(stats.blocks_free + stats.blocks_cached, 40);
  EXPECT_GT(stats.blocks_cached, 0);
  cache.clear_prefix_cache();
  EXPECT_EQ(cache.pool_stats().blocks_free, 40);
  EXPECT_EQ(cache.bookkeeping().index().size(), 0);
}

TEST(PrefixCache, EvictionSparesReferencedAndPinnedBlocks) {
  PagedCache<f32> cache(gqa, {.num_blocks = 12, .max_sequences = 4});
  const Ids kept = counting(64, 1), gone = counting(48, 500), pinned = counting(32, 900);
  const SeqId holder = cache.open();
  prefill(cache, holder, kept);
  cache.publish_prefix(holder, kept);  // 4 blocks, referenced
  for (const Ids* ids : {&gone, &pinned}) {
    const SeqId seq = cache.open();
    prefill(cache, seq, *ids);
    cache.publish_prefix(seq, *ids);
    cache.release(seq);
  }
  EXPECT_EQ(cache.pin_prefix(pinned), 32);
  EXPECT_EQ(cache.pool_stats().blocks_cached, 3);  // gone's; pinned's 2 are in use
  EXPECT_EQ(cache.pool_stats().blocks_free, 3);

  // Six blocks are free or cached; the seventh would need a referenced or pinned block.
  const SeqId hungry = cache.open();
  EXPECT_FALSE(cache.can_reserve(hungry, 7 * block));
  try {
    cache.reserve(hungry, 7 * block);
    ADD_FAILURE() << "reserve beyond free + cached blocks succeeded";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), errc::capacity_exceeded) << error.what();
  }
  EXPECT_EQ(cache.pool_stats().evictions, 0u);  // the failed call evicted nothing
  cache.reserve(hungry, 6 * block);
  EXPECT_EQ(cache.pool_stats().evictions, 3u);
  const Ids probe_gone = concat(gone, {1}), probe_pinned = concat(pinned, {1});
  const SeqId probe = cache.open();
  EXPECT_EQ(cache.match_prefix(probe, probe_gone), 0);
  cache.release(probe);
  const SeqId reader = cache.open();
  EXPECT_EQ(cache.match_prefix(reader, probe_pinned), 32);
  cache.release(reader);

  // The referenced prefix still holds its own K/V.
  for (int layer = 0; layer < gqa.layers; ++layer) {
    const auto view = cache.view(layer, holder);
    const Rows expected = rows_of(kept, 0, layer, 0);
    for (int p = 0; p < 64; ++p) {
      const auto segment = view.segment(p / block);
      for (int d = 0; d < 64; ++d)
        ASSERT_EQ(segment.k[(p % block) * 64 + d], expected[static_cast<std::size_t>(p) * kv_row + d]);
    }
  }

  // Unpinned, the pinned prefix is the next victim.
  cache.release(hungry);
  EXPECT_EQ(cache.unpin_prefix(pinned), 32);
  EXPECT_EQ(cache.unpin_prefix(pinned), 0);  // nothing pinned any more
  const SeqId again = cache.open();
  cache.reserve(again, 8 * block);
  const SeqId late = cache.open();
  EXPECT_EQ(cache.match_prefix(late, probe_pinned), 0);
}

TEST(PrefixCache, ForkCopiesNothingAndCopyOnWriteCopiesOneBlock) {
  PagedCache<f16> cache(gqa, {.num_blocks = 300, .max_sequences = 4});
  const Ids ids = counting(4005, 3);
  const SeqId parent = cache.open();
  prefill(cache, parent, ids);
  const int blocks = cache.bookkeeping().pages_in_use();
  EXPECT_EQ(blocks, 251);

  const SeqId child = cache.fork(parent);
  EXPECT_EQ(cache.bookkeeping().pages_in_use(), blocks);  // no K/V bytes allocated
  EXPECT_EQ(cache.pool_stats().copy_on_write_blocks, 0u);
  const MemoryStats memory = cache.stats();
  EXPECT_EQ(memory.bytes_used, 4005 * bytes_per_token<f16>(gqa));  // the shared blocks count once

  // The child's first write lands in the shared, partly filled last block: exactly it is copied.
  cache.reserve(child, 1);
  EXPECT_EQ(cache.pool_stats().copy_on_write_blocks, 1u);
  EXPECT_EQ(cache.bookkeeping().pages_in_use(), blocks + 1);
  const Ids child_ids = concat(ids, {42});
  for (int layer = 0; layer < gqa.layers; ++layer)
    cache.append(layer, child, rows_of(child_ids, 4005, layer, 0), rows_of(child_ids, 4005, layer, 1));
  // The parent owns its last block alone now: writing there copies nothing.
  cache.reserve(parent, 1);
  EXPECT_EQ(cache.pool_stats().copy_on_write_blocks, 1u);
  const Ids parent_ids = concat(ids, {7});
  for (int layer = 0; layer < gqa.layers; ++layer)
    cache.append(layer, parent, rows_of(parent_ids, 4005, layer, 0), rows_of(parent_ids, 4005, layer, 1));
  const auto last_k = [&](SeqId seq) {
    const auto view = cache.view(0, seq);
    return static_cast<float>(view.segment(4005 / block).k[(4005 % block) * 64]);
  };
  EXPECT_EQ(last_k(child), round_trip<f16>(rows_of(child_ids, 4005, 0, 0)[0]));
  EXPECT_EQ(last_k(parent), round_trip<f16>(rows_of(parent_ids, 4005, 0, 0)[0]));

  // A published block is immutable too: rolling back into it and writing copies it first.
  cache.publish_prefix(parent, parent_ids);
  cache.truncate(parent, 3990);
  cache.reserve(parent, 1);
  EXPECT_EQ(cache.pool_stats().copy_on_write_blocks, 2u);
}

TEST(PrefixCache, SaltsIsolateTenants) {
  PagedCache<f32> cache(gqa, {.num_blocks = 20, .max_sequences = 4});
  const Ids prompt = counting(40, 1);
  const SeqId owner = cache.open();
  prefill(cache, owner, prompt);
  cache.publish_prefix(owner, prompt, 1);
  const SeqId other_tenant = cache.open();
  EXPECT_EQ(cache.match_prefix(other_tenant, prompt, 2), 0);
  const SeqId same_tenant = cache.open();
  EXPECT_EQ(cache.match_prefix(same_tenant, prompt, 1), 32);
}

TEST(PrefixCache, ObserversSeeNumberedEvents) {
  PagedCache<f32> cache(gqa, {.num_blocks = 4, .max_sequences = 4});
  std::vector<PrefixEvent> events;
  cache.set_prefix_observer([&](const PrefixEvent& event) { events.push_back(event); });
  const Ids prompt = counting(33, 1);
  const SeqId a = cache.open();
  prefill(cache, a, prompt);
  cache.publish_prefix(a, prompt);  // stored x2 (the third block is partial)
  const SeqId b = cache.open();
  cache.match_prefix(b, prompt);    // shared x2
  cache.release(a);
  cache.release(b);                 // released x2, last block first
  const SeqId c = cache.open();
  cache.reserve(c, 3 * block);      // the 2 free blocks, then one eviction
  using enum PrefixEventKind;
  std::vector<PrefixEventKind> kinds;
  for (std::size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].sequence_number, i + 1);
    kinds.push_back(events[i].kind);
  }
  EXPECT_EQ(kinds, (std::vector<PrefixEventKind>{stored, stored, shared, shared, released, released, evicted}));
  const BlockHash first = hash_block(prefix_root<f32>(gqa, block, 0), std::span(prompt).first(16));
  EXPECT_EQ(events[0].hash, first);  // events name blocks by the process-independent hash
  EXPECT_EQ(events[6].hash, events[4].hash);  // LRU: the tail block, released first, goes first
}

TEST(PrefixCache, StatsAndPrometheusText) {
  PagedCache<f32> cache(gqa, {.num_blocks = 10, .max_sequences = 4});
  const Ids prompt = counting(40, 1);
  const SeqId a = cache.open();
  prefill(cache, a, prompt);
  cache.publish_prefix(a, prompt);
  const SeqId b = cache.open();
  cache.match_prefix(b, concat(prompt, {9}));
  cache.release(a);
  const PoolStats stats = cache.pool_stats();
  EXPECT_EQ(stats.blocks_in_use, 2);  // b's two shared blocks
  EXPECT_EQ(stats.blocks_cached, 0);  // a's partial block was never published: freed
  EXPECT_EQ(stats.blocks_free, 8);
  EXPECT_EQ(stats.waste_tokens, 0u);
  EXPECT_EQ(stats.prefix_queries, 1u);
  EXPECT_EQ(stats.prefix_query_tokens, 40u);
  EXPECT_EQ(stats.prefix_hit_tokens, 32u);
  EXPECT_EQ(stats.blocks_stored, 2u);
  prefill(cache, b, Ids(prompt.begin(), prompt.begin() + 35));  // 3 rows of a new block
  EXPECT_EQ(cache.pool_stats().waste_tokens, 13u);
  const std::string text = to_prometheus(cache.pool_stats(), "engine_kv");
  EXPECT_NE(text.find("# TYPE engine_kv_blocks_in_use gauge\nengine_kv_blocks_in_use 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("engine_kv_prefix_hit_tokens_total 32\n"), std::string::npos) << text;
  EXPECT_NE(text.find("engine_kv_waste_tokens 13\n"), std::string::npos) << text;
}

TEST(PrefixCache, BadCallsThrowAndChangeNothing) {
  PagedCache<f32> cache(gqa, {.num_blocks = 10, .max_sequences = 4});
  const Ids prompt = counting(40, 1);
  const SeqId a = cache.open();
  prefill(cache, a, prompt);
  auto expect_code = [&](errc code, auto call) {
    const PoolStats before = cache.pool_stats();
    try {
      call();
      ADD_FAILURE() << "expected " << to_string(code);
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), code) << error.what();
    }
    EXPECT_EQ(cache.pool_stats().blocks_in_use, before.blocks_in_use);
    EXPECT_EQ(cache.pool_stats().blocks_stored, before.blocks_stored);
    EXPECT_EQ(cache.length(a), 40);
  };
  expect_code(errc::out_of_range, [&] { cache.publish_prefix(a, concat(prompt, {1})); });
  cache.publish_prefix(a, prompt);
  expect_code(errc::out_of_range, [&] { cache.match_prefix(a, prompt); });  // not a fresh sequence
  const SeqId stale = cache.open();
  cache.release(stale);
  expect_code(errc::unknown_sequence, [&] { cache.match_prefix(stale, prompt); });
  expect_code(errc::unknown_sequence, [&] { cache.publish_prefix(stale, prompt); });
  cache.audit();
}

}  // namespace
}  // namespace kvcache::testing
