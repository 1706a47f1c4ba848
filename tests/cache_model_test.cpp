// Model-based test: long random sequences of open, reserve, append, truncate, fork and release
// (and, for paged storage, publish and match of prefixes under memory pressure), checked after
// every step against a plain std::vector model of every sequence's K/V.
#include <kvcache/cache.hpp>

#include <map>
#include <set>

#include "support/oracle.hpp"

namespace kvcache::testing {
namespace {

constexpr int operations = 10'000;
const ModelShape shape{2, 2, 2, 4};
constexpr int row = 2 * 4;  // kv_heads * head_dim

std::uint64_t prefix_hash_step(std::uint64_t h, std::int64_t value) {
  h ^= static_cast<std::uint64_t>(value) + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  return h * 0xBF58476D1CE4E5B9ull;
}

// Small pools, so that running out of room is common.
template <class Layout>
Layout small_layout();
template <>
Contiguous small_layout<Contiguous>() { return {.max_sequences = 4, .max_tokens = 48}; }
template <>
Paged<4> small_layout<Paged<4>>() { return {.num_blocks = 24, .max_sequences = 6}; }
template <>
SlidingWindow small_layout<SlidingWindow>() {
  return {.max_sequences = 4, .window = 6, .sink_tokens = 2, .slack_tokens = 3};
}

// One layer of one sequence: every position's K and V as stored, and whether it is still held.
struct LayerModel {
  std::vector<std::vector<float>> k, v;  // [position][row]
  std::vector<bool> held;                // [position]
  int length() const { return static_cast<int>(k.size()); }
};

// The K or V row that a token gets in one layer: a function of the token ids up to it, as the
// K/V of a real model are, so that sharing a published prefix is correct.
std::vector<float> token_row(std::uint64_t prefix_hash, int layer, int kind) {
  std::mt19937 rng(static_cast<std::uint32_t>(prefix_hash_step(prefix_hash, layer * 2 + kind)));
  return random_values(rng, row);
}

struct SequenceModel {
  int reserved = 0;
  std::vector<std::int32_t> ids;        // token ids of positions [0, max_length())
  std::vector<std::uint64_t> prefixes;  // [position] hash of ids[0, position]
  std::vector<LayerModel> layers = std::vector<LayerModel>(2);
  int min_length() const { return std::min(layers[0].length(), layers[1].length()); }
  int max_length() const { return std::max(layers[0].length(), layers[1].length()); }
  void push_id(std::int32_t id) {
    prefixes.push_back(prefix_hash_step(prefixes.empty() ? 0 : prefixes.back(), id));
    ids.push_back(id);
  }
  void resize(int length) {
    ids.resize(length);
    prefixes.resize(length);
    for (LayerModel& layer : layers) {
      layer.k.resize(length);
      layer.v.resize(length);
      layer.held.resize(length);
    }
  }
};

template <class C>
class ModelTest : public ::testing::Test {};
using ModelConfigs = ::testing::Types<Config<Contiguous, f32>, Config<Contiguous, bf16>, Config<Contiguous, int8>,
                                      Config<Paged<4>, f32>, Config<Paged<4>, f16>, Config<Paged<4>, fp8_e4m3>,
                                      Config<SlidingWindow, f32>, Config<SlidingWindow, f16>,
                                      Config<SlidingWindow, fp8_e5m2>>;
TYPED_TEST_SUITE(ModelTest, ModelConfigs, ConfigName);

TYPED_TEST(ModelTest, RandomOperationsMatchModel) {
  using Layout = typename TypeParam::Layout;
  using DType = typename TypeParam::DType;
  const Layout layout = small_layout<Layout>();
  const Retention retention = layout.retention();
  KVCache<Layout, DType> cache(shape, layout);
  std::map<std::uint32_t, std::pair<SeqId, SequenceModel>> model;  // by slot
  std::mt19937 rng(2024);
  auto pick = [&]() -> std::pair<SeqId, SequenceModel>& {
    auto it = model.begin();
    std::advance(it, std::uniform_int_distribution<int>(0, static_cast<int>(model.size()) - 1)(rng));
    return it->second;
  };
  auto expect_code = [](errc code, auto call) {
    try {
      call();
      ADD_FAILURE() << "expected " << to_string(code);
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), code) << error.what();
    }
  };
  // Appending position p to a window layer: once more than ring positions past the sinks are
  // held, the oldest of them is gone.
  auto hold = [&](LayerModel& layer) {
    layer.held.push_back(true);
    if (retention.ring_tokens == 0) return;
    int held_in_ring = 0;
    for (int p = retention.sink_tokens; p < layer.length(); ++p) held_in_ring += layer.held[p];
    for (int p = retention.sink_tokens; held_in_ring > retention.ring_tokens; ++p)
      if (layer.held[p]) layer.held[p] = false, --held_in_ring;
  };
  std::vector<SeqId> stale;
  constexpr bool prefix_caching = PrefixCachingPolicy<Layout>;
  constexpr int operation_kinds = prefix_caching ? 9 : 7;
  int successes[9] = {};
  // Every whole-block prefix ever published (and not cleared): what an unlimited cache holds.
  std::set<std::vector<std::int32_t>> published;
  std::uniform_int_distribution<std::int32_t> token(0, 2);  // few ids: prefixes repeat often

  // Paged storage has two more operations, and eviction needs a while to get going.
  const int steps = prefix_caching ? 3 * operations : operations;
  for (int step = 0; step < steps; ++step) {
    const int operation =
        model.empty() ? 0 : std::uniform_int_distribution<int>(0, operation_kinds - 1)(rng);
    SCOPED_TRACE("step " + std::to_string(step) + " operation " + std::to_string(operation));
    switch (operation) {
      case 0: {  // open
        if (static_cast<int>(model.size()) == layout.sequence_slots()) {
          expect_code(errc::capacity_exceeded, [&] { cache.open(); });
          break;
        }
        const SeqId seq = cache.open();
        ASSERT_FALSE(model.count(seq.slot));
        model[seq.slot] = {seq, SequenceModel{}};
        ++successes[operation];
        break;
      }
      case 1: {  // release, 1 time in 3
        if (std::uniform_int_distribution<int>(0, 2)(rng) != 0) break;
        const SeqId seq = pick().first;
        cache.release(seq);
        model.erase(seq.slot);
        stale.push_back(seq);
        ++successes[operation];
        break;
      }
      case 2: {  // reserve
        auto& [seq, sequence] = pick();
        const int n = std::uniform_int_distribution<int>(0, 12)(rng);
        const int target = sequence.max_length() + n;
        const bool can = cache.can_reserve(seq, n);
        if constexpr (std::is_same_v<Layout, Contiguous>) {
          ASSERT_EQ(can, target <= layout.max_tokens);
        } else if constexpr (std::is_same_v<Layout, SlidingWindow>) {
          ASSERT_TRUE(can);
        }
        if (can) {
          cache.reserve(seq, n);
          sequence.reserved = std::max(sequence.reserved, target);
          ++successes[operation];
        } else {
          expect_code(errc::capacity_exceeded, [&] { cache.reserve(seq, n); });
        }
        break;
      }
      case 3: {  // append n tokens to every layer, or (1 in 6) only to layer 0
        auto& [seq, sequence] = pick();
        const int room = sequence.reserved - sequence.max_length();
        const bool overflow = room <= 0 || std::uniform_int_distribution<int>(0, 19)(rng) == 0;
        const int n = overflow ? std::max(room, 0) + 1 : std::uniform_int_distribution<int>(1, room)(rng);
        const int layers = std::uniform_int_distribution<int>(0, 5)(rng) == 0 ? 1 : 2;
        for (int layer = 0; layer < layers; ++layer) {
          LayerModel& layer_model = sequence.layers[layer];
          if (layer_model.length() + n > sequence.reserved) {
            const std::vector<float> values(2 * static_cast<std::size_t>(n) * row, 1.0f);
            const std::span<const float> k(values.data(), n * row), v(values.data() + n * row, n * row);
            expect_code(errc::capacity_exceeded, [&] { cache.append(layer, seq, k, v); });
            continue;
          }
          // The other layer may be ahead and have chosen the ids already.
          while (static_cast<int>(sequence.ids.size()) < layer_model.length() + n) sequence.push_id(token(rng));
          std::vector<float> values;
          for (int kind = 0; kind < 2; ++kind)
            for (int t = 0; t < n; ++t) {
              const auto token_values = token_row(sequence.prefixes[layer_model.length() + t], layer, kind);
              values.insert(values.end(), token_values.begin(), token_values.end());
            }
          const std::span<const float> k(values.data(), n * row), v(values.data() + n * row, n * row);
          cache.append(layer, seq, k, v);
          for (int t = 0; t < n; ++t) {
            layer_model.k.push_back(stored<DType>({k.begin() + t * row, k.begin() + (t + 1) * row}, 4));
            layer_model.v.push_back(stored<DType>({v.begin() + t * row, v.begin() + (t + 1) * row}, 4));
            hold(layer_model);
          }
          ++successes[operation];
        }
        break;
      }
      case 4: {  // truncate; 1 in 10 past the end
        auto& [seq, sequence] = pick();
        const int length = sequence.min_length();
        if (std::uniform_int_distribution<int>(0, 9)(rng) == 0) {
          expect_code(errc::out_of_range, [&] { cache.truncate(seq, length + 1); });
          break;
        }
        const int n = std::uniform_int_distribution<int>(std::max(0, length - 6), length)(rng);
        // Attention at the new length sees [max(sinks, n - window), n): all must be held.
        bool exact = true;
        if (retention.window > 0)
          for (const LayerModel& layer : sequence.layers)
            for (int p = std::max(retention.sink_tokens, n - retention.window); p < n; ++p)
              exact = exact && layer.held[p];
        if (!exact) {
          expect_code(errc::position_overwritten, [&] { cache.truncate(seq, n); });
          break;
        }
        cache.truncate(seq, n);
        sequence.resize(n);
        sequence.reserved = n;
        ++successes[operation];
        break;
      }
      case 5: {  // fork
        auto& [seq, sequence] = pick();
        if (sequence.min_length() != sequence.max_length()) {
          expect_code(errc::out_of_range, [&] { cache.fork(seq); });
          break;
        }
        if (static_cast<int>(model.size()) == layout.sequence_slots()) {
          expect_code(errc::capacity_exceeded, [&] { cache.fork(seq); });
          break;
        }
        const SeqId child = cache.fork(seq);
        sequence.reserved = sequence.min_length();
        SequenceModel copy = sequence;
        model[child.slot] = {child, std::move(copy)};
        ++successes[operation];
        break;
      }
      case 6: {  // a stale handle is refused
        if (stale.empty()) break;
        const SeqId seq = stale[std::uniform_int_distribution<std::size_t>(0, stale.size() - 1)(rng)];
        expect_code(errc::unknown_sequence, [&] { (void)cache.length(seq); });
        ++successes[operation];
        break;
      }
      case 7: {  // publish a prefix of a sequence; 1 in 10 more ids than it holds; 1 in 200 clear
        if constexpr (prefix_caching) {
          if (std::uniform_int_distribution<int>(0, 199)(rng) == 0) {
            cache.clear_prefix_cache();
            published.clear();
            break;
          }
          auto& [seq, sequence] = pick();
          const int length = sequence.min_length();
          if (std::uniform_int_distribution<int>(0, 9)(rng) == 0) {
            std::vector<std::int32_t> ids(sequence.ids);
            ids.resize(length + 1, 0);
            expect_code(errc::out_of_range, [&] { cache.publish_prefix(seq, ids); });
            break;
          }
          const int n = std::uniform_int_distribution<int>(0, 1)(rng) ? length
                                                                      : std::uniform_int_distribution<int>(0, length)(rng);
          cache.publish_prefix(seq, std::span(sequence.ids).first(n));
          for (int blocks = 1; blocks * Layout::block_tokens <= n; ++blocks)
            published.emplace(sequence.ids.begin(), sequence.ids.begin() + blocks * Layout::block_tokens);
          ++successes[operation];
        }
        break;
      }
      case 8: {  // a new sequence starts from a prompt; shares what is cached of it
        if constexpr (prefix_caching) {
          if (static_cast<int>(model.size()) == layout.sequence_slots()) {  // a request ends
            if (std::uniform_int_distribution<int>(0, 3)(rng) != 0) break;
            const SeqId done = pick().first;
            cache.release(done);
            model.erase(done.slot);
            stale.push_back(done);
          }
          // A published prefix, a sequence's ids or nothing; then part of it, a few ids
          // changed, a few new ones after.
          std::vector<std::int32_t> prompt;
          const int source = std::uniform_int_distribution<int>(0, 2)(rng);
          if (source == 0 && !published.empty()) {
            auto it = published.begin();
            std::advance(it, std::uniform_int_distribution<std::size_t>(0, published.size() - 1)(rng));
            prompt = *it;
          } else if (source == 1) {
            prompt = pick().second.ids;
          }
          prompt.resize(std::uniform_int_distribution<std::size_t>(prompt.size() / 2, prompt.size())(rng));
          for (std::int32_t& id : prompt)
            if (std::uniform_int_distribution<int>(0, 15)(rng) == 0) id = token(rng);
          for (int extra = std::uniform_int_distribution<int>(0, 9)(rng); extra > 0; --extra)
            prompt.push_back(token(rng));
          const SeqId seq = cache.open();
          const std::uint64_t evictions_before = cache.pool_stats().evictions;
          const int matched = cache.match_prefix(seq, prompt);
          // An unlimited cache would match the longest published whole-block prefix that
          // leaves the last token; evictions can only shorten it.
          int ideal = 0;
          while ((ideal + 1) * Layout::block_tokens < static_cast<int>(prompt.size()) &&
                 published.count({prompt.begin(), prompt.begin() + (ideal + 1) * Layout::block_tokens}))
            ++ideal;
          ideal *= Layout::block_tokens;
          ASSERT_EQ(matched % Layout::block_tokens, 0);
          ASSERT_LE(matched, ideal);
          if (cache.pool_stats().evictions == 0) {
            ASSERT_EQ(matched, ideal);
          }
          ASSERT_EQ(cache.pool_stats().evictions, evictions_before);  // matching never evicts
          SequenceModel sequence;
          for (int p = 0; p < matched; ++p) sequence.push_id(prompt[p]);
          for (int layer = 0; layer < 2; ++layer)
            for (int p = 0; p < matched; ++p) {
              sequence.layers[layer].k.push_back(stored<DType>(token_row(sequence.prefixes[p], layer, 0), 4));
              sequence.layers[layer].v.push_back(stored<DType>(token_row(sequence.prefixes[p], layer, 1), 4));
              sequence.layers[layer].held.push_back(true);
            }
          sequence.reserved = matched;
          model[seq.slot] = {seq, std::move(sequence)};
          successes[operation] += matched > 0;
          // A sequence that holds tokens cannot match again.
          if (matched > 0) expect_code(errc::out_of_range, [&] { cache.match_prefix(seq, prompt); });
        }
        break;
      }
    }

    // Every sequence, every layer: lengths, reservation, and exactly the held rows.
    ASSERT_EQ(cache.open_sequences(), static_cast<int>(model.size()));
    for (const auto& [slot, entry] : model) {
      const auto& [seq, sequence] = entry;
      ASSERT_EQ(cache.length(seq), sequence.min_length());
      ASSERT_EQ(cache.reserved(seq), sequence.reserved);
      for (int layer = 0; layer < 2; ++layer) {
        const LayerModel& expected = sequence.layers[layer];
        const auto view = cache.view(layer, seq);
        ASSERT_EQ(view.length, expected.length());
        std::vector<bool> seen(expected.length(), false);
        for (int i = 0; i < view.segment_count(); ++i) {
          const auto segment = view.segment(i);
          for (int r = 0; r < segment.count; ++r) {
            const int position = segment.first_position + r;
            ASSERT_LT(position, expected.length());
            ASSERT_TRUE(expected.held[position]) << "position " << position << " should be gone";
            ASSERT_FALSE(seen[position]);
            seen[position] = true;
            for (int head = 0; head < 2; ++head)
              for (int d = 0; d < 4; ++d) {
                ASSERT_EQ(stored_value(segment, 0, head, r, d, 4), expected.k[position][head * 4 + d]);
                ASSERT_EQ(stored_value(segment, 1, head, r, d, 4), expected.v[position][head * 4 + d]);
              }
          }
        }
        for (int p = 0; p < expected.length(); ++p)
          ASSERT_EQ(seen[p], static_cast<bool>(expected.held[p])) << "position " << p;
      }
    }
    // Reference counts add up, every block is exactly one of free, cached or in use.
    ASSERT_NO_THROW(cache.audit());
  }

  for (int operation = 0; operation < operation_kinds; ++operation)
    EXPECT_GT(successes[operation], 50) << "operation " << operation << " was rarely exercised";
  for (const auto& [slot, entry] : model) cache.release(entry.first);
  EXPECT_EQ(cache.bookkeeping().pages_in_use(), 0);
  EXPECT_EQ(cache.stats().bytes_reserved, 0u);
  if constexpr (prefix_caching) {
    const PoolStats stats = cache.pool_stats();
    EXPECT_GT(stats.evictions, 50u) << "memory pressure was rarely reached";
    EXPECT_GT(stats.copy_on_write_blocks, 50u);
    EXPECT_EQ(stats.blocks_free + stats.blocks_cached, layout.num_blocks);  // nothing leaked
    cache.clear_prefix_cache();
    EXPECT_EQ(cache.bookkeeping().pool().free_count(), layout.num_blocks);
  }
}

}  // namespace
}  // namespace kvcache::testing
