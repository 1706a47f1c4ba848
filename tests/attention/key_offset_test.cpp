// Key offsets (KVCache's key_offsets): a cache with offsets must behave exactly like the same
// cache without them fed keys minus the offsets, through every operation (append, batch append,
// truncate, fork, release), on every storage policy and element type: the twin cache is the
// model, and attention outputs must be bit-identical. Attention over an f32 cache must equal
// the fp64 oracle on the original keys (softmax cancels the offset), and so must soft-capped
// attention, which adds the offset's share of each score back; a quantized cache must lose
// far less to rounding when keys carry the large channel means that offsets remove.
#include <kvcache/kvcache.hpp>

#include <bit>
#include <map>
#include <span>

#include "../support/oracle.hpp"

namespace kvcache::testing {
namespace {

constexpr int layers = 2;
const ModelShape shape{layers, 8, 2, 64};
constexpr std::size_t kv_row = 2 * 64;

// Offsets of the size of trained models' channel means: most channels near 0, a few large.
std::vector<float> channel_means(std::mt19937& rng) {
  std::vector<float> means = random_values(rng, layers * kv_row, 0.5f);
  for (std::size_t i = 0; i < means.size(); i += 16) means[i] = 20.0f * (i % 32 == 0 ? 1.0f : -1.0f);
  return means;
}

// Keys around `means`: every row is means + N(0, 1) noise.
Rows keys_around(std::mt19937& rng, const std::vector<float>& means, int layer, int tokens) {
  Rows k = random_values(rng, static_cast<std::size_t>(tokens) * kv_row);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] += means[static_cast<std::size_t>(layer) * kv_row + i % kv_row];
  return k;
}

// Every row of k minus one layer's offsets ([kv_heads][head_dim]).
Rows minus_offsets(Rows k, std::span<const float> layer_offsets) {
  for (std::size_t i = 0; i < k.size(); ++i) k[i] -= layer_offsets[i % layer_offsets.size()];
  return k;
}
std::span<const float> layer_offsets(const std::vector<float>& offsets, int layer) {
  return std::span(offsets).subspan(static_cast<std::size_t>(layer) * kv_row, kv_row);
}

template <class Layout>
Layout offset_test_layout() {
  if constexpr (std::same_as<Layout, Paged<32>>) return {.num_blocks = 24, .max_sequences = 6};
  else if constexpr (std::same_as<Layout, SlidingWindow>)
    return {.max_sequences = 6, .window = 40, .sink_tokens = 32, .slack_tokens = 24};
  else return make_layout<Layout>();
}

template <class C>
class KeyOffsetTest : public ::testing::Test {};
using KeyOffsetConfigs = ::testing::Types<
    Config<Contiguous, f32>, Config<Paged<16>, f16>, Config<SlidingWindow, bf16>, Config<Contiguous, int8>,
    Config<Paged<16>, fp8_e4m3>, Config<SlidingWindow, fp8_e5m2>, Config<Contiguous, int8_hadamard>,
    Config<Paged<32>, int4>, Config<SlidingWindow, int4>, Config<Paged<32>, int8_residual>>;
TYPED_TEST_SUITE(KeyOffsetTest, KeyOffsetConfigs, ConfigName);

TYPED_TEST(KeyOffsetTest, BehavesAsKeysMinusOffsetsThroughRandomOperations) {
  using Layout = typename TypeParam::Layout;
  using DType = typename TypeParam::DType;
  std::mt19937 rng(5);
  const std::vector<float> offsets = channel_means(rng);
  const Layout layout = offset_test_layout<Layout>();
  KVCache<Layout, DType> cache(shape, layout, offsets);
  KVCache<Layout, DType> model(shape, layout);  // fed keys minus offsets
  ASSERT_EQ(cache.key_offset(1).size(), kv_row);
  EXPECT_EQ(cache.key_offset(1)[3], offsets[kv_row + 3]);
  EXPECT_TRUE(model.key_offset(1).empty());

  std::map<std::uint32_t, std::pair<SeqId, SeqId>> open;  // cache's slot -> (cache's, model's)
  auto pick = [&]() -> std::pair<SeqId, SeqId>& {
    auto it = open.begin();
    std::advance(it, std::uniform_int_distribution<int>(0, static_cast<int>(open.size()) - 1)(rng));
    return it->second;
  };
  const AttentionParams params{.scale = 0.125f};
  int appends = 0, checks = 0;
  for (int step = 0; step < 400; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const int operation = open.empty() ? 0 : std::uniform_int_distribution<int>(0, 6)(rng);
    if (operation == 0) {
      if (!cache.can_open()) continue;
      const SeqId id = cache.open();
      open[id.slot] = {id, model.open()};
    } else if (operation == 1) {
      if (std::uniform_int_distribution<int>(0, 3)(rng) != 0) continue;
      const auto [id, twin] = pick();
      cache.release(id);
      model.release(twin);
      open.erase(id.slot);
    } else if (operation <= 3) {  // append 1..40 tokens
      const auto [id, twin] = pick();
      const int n = std::uniform_int_distribution<int>(1, 40)(rng);
      if (!cache.can_reserve(id, n)) continue;
      cache.reserve(id, n);
      model.reserve(twin, n);
      for (int layer = 0; layer < layers; ++layer) {
        const Rows k = keys_around(rng, offsets, layer, n), v = random_values(rng, n * kv_row);
        cache.append(layer, id, k, v);
        model.append(layer, twin, minus_offsets(k, layer_offsets(offsets, layer)), v);
      }
      ++appends;
    } else if (operation == 4) {  // a decode step's batch append, one token for every open sequence
      std::vector<SeqId> ids, twins;
      for (const auto& [slot, pair] : open)
        if (cache.can_reserve(pair.first, 1)) ids.push_back(pair.first), twins.push_back(pair.second);
      for (std::size_t i = 0; i < ids.size(); ++i) cache.reserve(ids[i], 1), model.reserve(twins[i], 1);
      for (int layer = 0; layer < layers; ++layer) {
        const Rows k = keys_around(rng, offsets, layer, static_cast<int>(ids.size()));
        const Rows v = random_values(rng, ids.size() * kv_row);
        cache.append(layer, std::span<const SeqId>(ids), k, v);
        model.append(layer, std::span<const SeqId>(twins), minus_offsets(k, layer_offsets(offsets, layer)), v);
      }
    } else if (operation == 5) {  // truncate (into a quantized group, for the staged types)
      const auto [id, twin] = pick();
      const int length = std::uniform_int_distribution<int>(0, cache.length(id))(rng);
      try {
        cache.truncate(id, length);
      } catch (const Error& error) {
        ASSERT_EQ(error.code(), errc::position_overwritten) << error.what();
        continue;
      }
      model.truncate(twin, length);
    } else {  // fork
      const auto [id, twin] = pick();
      if (!cache.can_open() || cache.length(id) == 0) continue;
      SeqId child;
      try {
        child = cache.fork(id);
      } catch (const Error& error) {
        ASSERT_EQ(error.code(), errc::capacity_exceeded) << error.what();
        continue;
      }
      open[child.slot] = {child, model.fork(twin)};
    }
    // Decode every open, non-empty sequence in both caches: the same bits.
    for (const auto& [slot, pair] : open) {
      if (cache.length(pair.first) == 0) continue;
      ASSERT_EQ(cache.length(pair.first), model.length(pair.second));
      const int layer = step % layers;
      const Rows q = random_values(rng, static_cast<std::size_t>(shape.q_heads) * shape.head_dim);
      Rows out(q.size()), expected(q.size());
      attention::decode(cache, layer, pair.first, q, out, params);
      attention::decode(model, layer, pair.second, q, expected, params);
      ASSERT_EQ(out, expected);
      ++checks;
    }
  }
  EXPECT_GT(appends, 50);
  EXPECT_GT(checks, 400);
}

// Attention over a cache with offsets equals the oracle on the original keys (what the cache
// holds plus the offsets), for decode and chunked prefill, MHA, GQA and MQA: softmax cancels
// the offset, and soft-capped logits (soft_cap > 0), which are not shift-invariant, get
// q . offset added back before the cap; the rotated type too, whose offsets come off before
// the rotation. A cap of 1 bends logits of the size these offsets add (around 1.5), so a
// kernel that left the shift out would be far off.
template <class DType>
void expect_attention_on_the_original_keys(double soft_cap) {
  std::mt19937 rng(17);
  for (const ModelShape& s : oracle_shapes()) {
    if (is_hadamard_rotated<DType> && !std::has_single_bit(static_cast<unsigned>(s.head_dim))) continue;
    const std::size_t row = static_cast<std::size_t>(s.kv_heads) * s.head_dim;
    Rows offsets = random_values(rng, row, 0.5f);
    for (std::size_t i = 0; i < row; i += 8) offsets[i] = i % 16 == 0 ? 20.0f : -20.0f;
    KVCache<Paged<16>, DType> cache(s, make_layout<Paged<16>>(), offsets);
    std::vector<SeqId> seqs;
    std::vector<Rows> k_original, v_stored;
    const int lengths[] = {1, 17, 40, 64};
    for (const int length : lengths) {
      seqs.push_back(cache.open());
      Rows keys = random_values(rng, length * row);
      for (std::size_t i = 0; i < keys.size(); ++i) keys[i] += offsets[i % row];
      const Rows values = random_values(rng, length * row);
      cache.reserve(seqs.back(), length);
      cache.append(0, seqs.back(), keys, values);
      Rows k_stored = stored<DType>(minus_offsets(keys, offsets), s.head_dim);
      for (std::size_t i = 0; i < k_stored.size(); ++i) k_stored[i] += offsets[i % row];
      k_original.push_back(k_stored);
      v_stored.push_back(stored<DType>(values, s.head_dim));
    }
    expect_attention_equals_oracle(cache, seqs, lengths, k_original, v_stored, {}, rng,
                                  kernel_bound<typename DType::storage_type>(s.head_dim), 3, 5, soft_cap);
  }
}

TEST(KeyOffset, AttentionEqualsTheOracleOnTheOriginalKeys) { expect_attention_on_the_original_keys<f32>(0.0); }

TEST(KeyOffset, SoftCappedAttentionEqualsTheOracleOnTheOriginalKeys) {
  expect_attention_on_the_original_keys<f32>(1.0);
  expect_attention_on_the_original_keys<int8>(1.0);
  expect_attention_on_the_original_keys<fp8_e4m3>(1.0);
  expect_attention_on_the_original_keys<int8_hadamard>(1.0);
}

// Keys with large channel means: int8 and fp8_e4m3 round them far less coarsely once offsets
// remove the means (the error of attention against the oracle on the original keys).
template <class DType>
std::pair<double, double> decode_errors_without_and_with_offsets() {
  std::mt19937 rng(13);
  const ModelShape s{1, 8, 2, 64};
  Rows means = random_values(rng, kv_row, 0.5f);
  for (std::size_t i = 0; i < means.size(); i += 8) means[i] = 30.0f;
  const int length = 64;
  Rows k = random_values(rng, length * kv_row);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] += means[i % kv_row];
  const Rows v = random_values(rng, length * kv_row);
  const Rows q = random_values(rng, static_cast<std::size_t>(s.q_heads) * s.head_dim, 0.3f);
  const auto expected = oracle_attention(s, k, v, length, q, 1, {}, 0.125);
  auto error_of = [&](std::span<const float> offsets) {
    KVCache<Contiguous, DType> cache(s, make_layout<Contiguous>(), offsets);
    const SeqId seq = cache.open();
    cache.reserve(seq, length);
    cache.append(0, seq, k, v);
    Rows out(q.size());
    attention::decode(cache, 0, seq, q, out, {.scale = 0.125f});
    return relative_error(out, expected);
  };
  return {error_of({}), error_of(means)};
}

TEST(KeyOffset, QuantizedKeysLoseLessWithTheirMeansRemoved) {
  const auto [int8_without, int8_with] = decode_errors_without_and_with_offsets<int8>();
  EXPECT_LT(int8_with * 4, int8_without) << int8_with << " vs " << int8_without;
  const auto [fp8_without, fp8_with] = decode_errors_without_and_with_offsets<fp8_e4m3>();
  EXPECT_LT(fp8_with * 2, fp8_without) << fp8_with << " vs " << fp8_without;
}

// call() throws kvcache::Error with `code`.
template <class Call>
void expect_code(errc code, Call call) {
  try {
    call();
    ADD_FAILURE() << "no error; expected " << to_string(code);
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), code) << error.what();
  }
}

TEST(KeyOffset, RejectsBadOffsets) {
  const Contiguous layout = make_layout<Contiguous>();
  expect_code(errc::shape_mismatch, [&] { (void)KVCache<Contiguous, int8>(shape, layout, Rows(kv_row)); });
  Rows offsets(layers * kv_row, 1.0f);
  offsets[kv_row + 5] = std::numeric_limits<float>::quiet_NaN();
  expect_code(errc::invalid_configuration, [&] { (void)KVCache<Contiguous, int8>(shape, layout, offsets); });
  offsets[kv_row + 5] = std::numeric_limits<float>::infinity();
  expect_code(errc::invalid_configuration, [&] { (void)KVCache<Contiguous, int8>(shape, layout, offsets); });

  offsets[kv_row + 5] = 1.0f;
  KVCache<Contiguous, f32> cache(shape, layout, offsets);
  expect_code(errc::out_of_range, [&] { cache.key_offset(layers); });
  const SeqId seq = cache.open();
  cache.reserve(seq, 1);
  const Rows row(kv_row, 0.5f);
  cache.append(0, seq, row, row);
  const Rows q(static_cast<std::size_t>(shape.q_heads) * shape.head_dim, 0.1f);
  Rows out(q.size(), -1.0f);
  attention::decode(cache, 0, seq, q, out, {.scale = 0.125f});
  EXPECT_NEAR(out[0], 0.5f, 1e-6f);  // one position: its value
}

}  // namespace
}  // namespace kvcache::testing
