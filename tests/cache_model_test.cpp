// Model-based test: long random sequences of open, reserve, append, truncate, fork and release,
// checked after every step against a plain std::vector model of every sequence's K/V.
#include <kvcache/cache.hpp>

#include <map>

#include "support/oracle.hpp"

namespace kvcache::testing {
namespace {

constexpr int operations = 10'000;
const ModelShape shape{2, 2, 2, 4};
constexpr int row = 2 * 4;  // kv_heads * head_dim

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

struct SequenceModel {
  int reserved = 0;
  std::vector<LayerModel> layers = std::vector<LayerModel>(2);
  int min_length() const { return std::min(layers[0].length(), layers[1].length()); }
  int max_length() const { return std::max(layers[0].length(), layers[1].length()); }
};

template <class C>
class ModelTest : public ::testing::Test {};
using ModelConfigs = ::testing::Types<Config<Contiguous, f32>, Config<Contiguous, bf16>,
                                      Config<Paged<4>, f32>, Config<Paged<4>, f16>,
                                      Config<SlidingWindow, f32>, Config<SlidingWindow, f16>>;
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
  int successes[7] = {};

  for (int step = 0; step < operations; ++step) {
    const int operation = model.empty() ? 0 : std::uniform_int_distribution<int>(0, 6)(rng);
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
          const auto values = random_values(rng, 2 * static_cast<std::size_t>(n) * row);
          const std::span<const float> k(values.data(), n * row), v(values.data() + n * row, n * row);
          if (layer_model.length() + n > sequence.reserved) {
            expect_code(errc::capacity_exceeded, [&] { cache.append(layer, seq, k, v); });
            continue;
          }
          cache.append(layer, seq, k, v);
          for (int t = 0; t < n; ++t) {
            layer_model.k.push_back(rounded<DType>({k.begin() + t * row, k.begin() + (t + 1) * row}));
            layer_model.v.push_back(rounded<DType>({v.begin() + t * row, v.begin() + (t + 1) * row}));
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
        for (LayerModel& layer : sequence.layers) {
          layer.k.resize(n);
          layer.v.resize(n);
          layer.held.resize(n);
        }
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
                const std::size_t at = head * segment.head_stride + r * 4 + d;
                ASSERT_EQ(static_cast<float>(segment.k[at]), expected.k[position][head * 4 + d]);
                ASSERT_EQ(static_cast<float>(segment.v[at]), expected.v[position][head * 4 + d]);
              }
          }
        }
        for (int p = 0; p < expected.length(); ++p)
          ASSERT_EQ(seen[p], static_cast<bool>(expected.held[p])) << "position " << p;
      }
    }
    if constexpr (std::is_same_v<Layout, Paged<4>>) {
      // Reference counts add up: each block is owned exactly as often as tables name it.
      const BlockPool& pool = cache.bookkeeping().pool();
      std::vector<int> named(pool.block_count(), 0);
      for (const auto& [slot, entry] : model)
        for (std::int32_t block : cache.bookkeeping().tables().blocks(static_cast<int>(slot)))
          ++named[block];
      int used = 0;
      for (int block = 0; block < pool.block_count(); ++block) {
        ASSERT_EQ(pool.owners(block), named[block]) << "block " << block;
        used += named[block] > 0;
      }
      ASSERT_EQ(used + pool.free_count(), pool.block_count());
    }
  }

  for (int operation = 0; operation < 7; ++operation)
    EXPECT_GT(successes[operation], 50) << "operation " << operation << " was rarely exercised";
  for (const auto& [slot, entry] : model) cache.release(entry.first);
  EXPECT_EQ(cache.bookkeeping().pages_in_use(), 0);
  EXPECT_EQ(cache.stats().bytes_reserved, 0u);
  if constexpr (std::is_same_v<Layout, Paged<4>>) {
    EXPECT_EQ(cache.bookkeeping().pool().free_count(), layout.num_blocks);
  }
}

}  // namespace
}  // namespace kvcache::testing
