// Residual types (int8_residual, fp8_e4m3_residual: rows quantized 32 at a time, the newest
// tokens in full precision): the memory math, what the cache stores (checked against the row
// quantization of whole groups, through the views), attention against the fp64 oracle on those
// values, and random operation sequences (append, truncate, fork, release) against a plain
// model, on every storage policy.
#include <kvcache/kvcache.hpp>

#include <map>

#include "../support/oracle.hpp"

namespace kvcache::testing {
namespace {

constexpr int group = int8_residual::residual_tokens;
static_assert(fp8_e4m3_residual::residual_tokens == group);

// What a DType cache holds for one layer of a sequence of `length` positions whose rows
// ([position][kv_head][head_dim]) are `rows`: the positions of whole groups of 32 stored as
// their row type stores them, those after the last whole group as they are.
template <class DType>
Rows residual_stored(Rows rows, int length, int head_dim) {
  const std::size_t row = rows.size() / static_cast<std::size_t>(std::max(length, 1));
  const std::size_t quantized = static_cast<std::size_t>(length / group * group) * row;
  round_trip_rows<DType>(std::span(rows).first(quantized), head_dim);
  return rows;
}

// The values a view holds, read through its layout alone ([position][kv_head][head_dim]; NaN for
// positions it does not hold).
template <class View>
Rows view_values(const View& view, int kind) {
  const int hd = view.head_dim;
  const std::size_t row = static_cast<std::size_t>(view.kv_heads) * hd;
  Rows values(static_cast<std::size_t>(view.length) * row, std::nanf(""));
  auto set = [&](int position, int head, int d, float value) { values[position * row + head * hd + d] = value; };
  for (int i = 0; i < view.segment_count(); ++i) {
    const auto segment = view.segment(i);
    for (int head = 0; head < view.kv_heads; ++head)
      for (int r = 0; r < segment.count; ++r)
        for (int d = 0; d < hd; ++d) set(segment.first_position + r, head, d, stored_value(segment, kind, head, r, d, hd));
  }
  const Segment<float>& residual = view.residual;
  for (int head = 0; head < view.kv_heads; ++head)
    for (int r = 0; r < residual.count; ++r)
      for (int d = 0; d < hd; ++d)
        set(residual.first_position + r, head, d, (kind == 0 ? residual.k : residual.v)[head * residual.head_stride + r * hd + d]);
  return values;
}

template <class Layout>
Layout residual_layout();
template <>
Contiguous residual_layout<Contiguous>() { return {.max_sequences = 6, .max_tokens = 128}; }
template <>
Paged<32> residual_layout<Paged<32>>() { return {.num_blocks = 40, .max_sequences = 6}; }
template <>  // two groups per block: copy-on-write copies a quantized group with a residual one
Paged<64> residual_layout<Paged<64>>() { return {.num_blocks = 24, .max_sequences = 6}; }
template <>
SlidingWindow residual_layout<SlidingWindow>() {
  return {.max_sequences = 6, .window = 40, .sink_tokens = 32, .slack_tokens = 24};
}

template <class Layout>
class ResidualCacheTest : public ::testing::Test {};
using ResidualLayouts = ::testing::Types<Contiguous, Paged<32>, Paged<64>, SlidingWindow>;
struct LayoutName {
  template <class Layout>
  static std::string GetName(int) {
    return std::string(Layout::name) + std::to_string(residual_layout<Layout>().page_tokens());
  }
};
TYPED_TEST_SUITE(ResidualCacheTest, ResidualLayouts, LayoutName);

TYPED_TEST(ResidualCacheTest, AllocatesExactlyWhatTheMemoryMathPredicts) {
  const ModelShape shape{3, 8, 2, 32};
  const auto layout = residual_layout<TypeParam>();
  const KVCache<TypeParam, int8_residual> cache(shape, layout);
  const std::size_t tokens = static_cast<std::size_t>(layout.page_count()) * layout.page_tokens();
  EXPECT_EQ(bytes_per_token<int8_residual>(shape), bytes_per_token<int8>(shape));  // the window is per sequence
  EXPECT_EQ(residual_bytes_per_sequence<int8_residual>(shape), 3u * 2 * 2 * 32 * 32 * sizeof(float));
  EXPECT_EQ(residual_bytes_per_sequence<int8>(shape), 0u);
  EXPECT_EQ(cache.stats().bytes_capacity, bytes_for_tokens<int8_residual>(shape, tokens) +
                                              layout.sequence_slots() * residual_bytes_per_sequence<int8_residual>(shape));
}

TEST(ResidualCache, RejectsLayoutsWithoutWholeGroups) {
  auto expect_invalid = [](auto make) {
    try {
      make();
      ADD_FAILURE() << "expected invalid_configuration";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), errc::invalid_configuration) << error.what();
      EXPECT_NE(std::string(error.what()).find("int8_residual"), std::string::npos) << error.what();
    }
  };
  expect_invalid([] { KVCache<Paged<16>, int8_residual>({1, 2, 2, 64}, {.num_blocks = 8, .max_sequences = 2}); });
  expect_invalid([] { KVCache<Contiguous, int8_residual>({1, 2, 2, 64}, {.max_sequences = 2, .max_tokens = 100}); });
  expect_invalid(
      [] { KVCache<SlidingWindow, int8_residual>({1, 2, 2, 64}, {.max_sequences = 2, .window = 32, .sink_tokens = 4}); });
}

// Decode of ragged sequences and chunked prefill, MHA / GQA / MQA, fast and portable head sizes:
// the views hold exactly the row quantization of whole groups and the newest rows as appended,
// and attention over them equals the oracle.
template <class Layout, class DType>
void expect_reference_storage_and_attention() {
  SCOPED_TRACE(DType::name);
  std::mt19937 rng(45);
  struct Heads {
    int q, kv;
  };
  for (const Heads heads : {Heads{4, 4}, Heads{8, 2}, Heads{6, 1}})
    for (const int head_dim : {64, 40}) {
      const ModelShape shape{1, heads.q, heads.kv, head_dim};
      const auto layout = residual_layout<Layout>();
      KVCache<Layout, DType> cache(shape, layout);
      const std::size_t kv_row = static_cast<std::size_t>(heads.kv) * head_dim;
      std::vector<SeqId> seqs;
      std::vector<Rows> k, v;
      const int lengths[] = {1, 31, 32, 77, 128};
      for (int length : lengths) {
        seqs.push_back(cache.open());
        k.push_back(random_values(rng, length * kv_row, 2.0f));
        v.push_back(random_values(rng, length * kv_row, seqs.size() % 2 ? 0.01f : 3.0f));
        cache.reserve(seqs.back(), length);
        // Appended in pieces: a group fills across calls.
        for (int done = 0, piece = 1; done < length; done += piece, piece *= 3) {
          piece = std::min(piece, length - done);
          cache.append(0, seqs.back(), std::span<const float>(k.back()).subspan(done * kv_row, piece * kv_row),
                       std::span<const float>(v.back()).subspan(done * kv_row, piece * kv_row));
        }
      }
      std::vector<Rows> k_stored, v_stored;
      const Mask mask = mask_of(layout);
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        k_stored.push_back(residual_stored<DType>(k[i], lengths[i], head_dim));
        v_stored.push_back(residual_stored<DType>(v[i], lengths[i], head_dim));
        const auto view = cache.view(0, seqs[i]);
        ASSERT_EQ(view.residual.count, lengths[i] % group);
        const Rows k_view = view_values(view, 0), v_view = view_values(view, 1);
        for (int p = 0; p < lengths[i]; ++p) {
          if (!mask.visible(p, lengths[i] - 1)) continue;  // a window's old positions may be gone
          for (std::size_t e = 0; e < kv_row; ++e) {
            ASSERT_EQ(k_view[p * kv_row + e], k_stored[i][p * kv_row + e]) << "K, length " << lengths[i] << ", position " << p;
            ASSERT_EQ(v_view[p * kv_row + e], v_stored[i][p * kv_row + e]) << "V, length " << lengths[i] << ", position " << p;
          }
        }
      }
      expect_attention_equals_oracle(cache, seqs, lengths, k_stored, v_stored, mask, rng,
                                     kernel_bound<typename DType::storage_type>(head_dim));
    }
}

TYPED_TEST(ResidualCacheTest, StoresTheReferenceQuantizationAndAttentionEqualsTheOracle) {
  expect_reference_storage_and_attention<TypeParam, int8_residual>();
  expect_reference_storage_and_attention<TypeParam, fp8_e4m3_residual>();
}

// The newest rows are exact: attention over a residual cache shorter than a group equals that
// over an f32 cache bit for bit, where the plain row type's does not.
TEST(ResidualCache, NewestTokensAttendAtFullPrecision) {
  const ModelShape shape{1, 8, 2, 64};
  const Contiguous layout{.max_sequences = 1, .max_tokens = 64};
  KVCache<Contiguous, int8_residual> residual(shape, layout);
  KVCache<Contiguous, int8> plain(shape, layout);
  KVCache<Contiguous, f32> exact(shape, layout);
  std::mt19937 rng(3);
  const Rows k = random_values(rng, 20 * 128), v = random_values(rng, 20 * 128), q = random_values(rng, 8 * 64);
  std::vector<float> a(q.size()), b(q.size()), c(q.size());
  const SeqId x = residual.open(), y = plain.open(), z = exact.open();
  residual.reserve(x, 20);
  plain.reserve(y, 20);
  exact.reserve(z, 20);
  residual.append(0, x, k, v);
  plain.append(0, y, k, v);
  exact.append(0, z, k, v);
  attention::decode(residual, 0, x, q, a);
  attention::decode(plain, 0, y, q, b);
  attention::decode(exact, 0, z, q, c);
  EXPECT_EQ(a, c);
  EXPECT_NE(b, c);
}

// Published blocks hold whole quantized groups: a sequence that shares them and appends the
// rest attends exactly as the one that computed them.
TEST(ResidualCache, SharedPrefixBlocksAttendLikeTheirOwner) {
  const ModelShape shape{2, 8, 2, 64};
  KVCache<Paged<32>, fp8_e4m3_residual> cache(shape, {.num_blocks = 16, .max_sequences = 2});
  std::mt19937 rng(9);
  const int length = 75;
  std::vector<std::int32_t> ids(length);
  for (int i = 0; i < length; ++i) ids[i] = i * 7 % 11;
  const Rows k = random_values(rng, length * 128), v = random_values(rng, length * 128);
  const SeqId owner = cache.open();
  cache.reserve(owner, length);
  for (int layer = 0; layer < 2; ++layer) cache.append(layer, owner, k, v);
  cache.publish_prefix(owner, ids);
  const SeqId sharer = cache.open();
  const int shared = cache.match_prefix(sharer, ids);
  ASSERT_EQ(shared, 64);
  cache.reserve(sharer, length - shared);
  for (int layer = 0; layer < 2; ++layer)
    cache.append(layer, sharer, std::span<const float>(k).subspan(shared * 128), std::span<const float>(v).subspan(shared * 128));
  const auto q = random_values(rng, 8 * 64);
  std::vector<float> a(q.size()), b(q.size());
  for (int layer = 0; layer < 2; ++layer) {
    attention::decode(cache, layer, owner, q, a);
    attention::decode(cache, layer, sharer, q, b);
    EXPECT_EQ(a, b) << "layer " << layer;
  }
}

// Every layer of every sequence is a list of rows as appended (or, after a truncation into a
// quantized group, as dequantized), and the cache must hold residual_stored of them, and
// attend to them, after every operation.
template <class Layout, class DType>
void expect_random_operations_match_model() {
  SCOPED_TRACE(DType::name);
  const ModelShape shape{2, 4, 2, 8};
  const std::size_t row = 2 * 8;
  Layout layout = residual_layout<Layout>();
  if constexpr (std::same_as<Layout, SlidingWindow>)  // a window shorter than a group: truncation
    layout = {.max_sequences = 6, .window = 8, .sink_tokens = 0, .slack_tokens = 56};  // meets reused rows
  const Mask mask = mask_of(layout);
  KVCache<Layout, DType> cache(shape, layout);
  struct Sequence {
    SeqId id;
    Rows k[2], v[2];     // [layer]: rows as appended (full precision)
    int first_held = 0;  // a window's positions before this (and after the sinks) were overwritten
    int length() const { return static_cast<int>(k[0].size() / 16); }
  };
  std::map<std::uint32_t, Sequence> model;
  std::mt19937 rng(78);
  int truncations_into_groups = 0, forks = 0, checks = 0;
  for (int step = 0; step < 1500; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const int operation = model.empty() ? 0 : std::uniform_int_distribution<int>(0, 5)(rng);
    auto pick = [&]() -> Sequence& {
      auto it = model.begin();
      std::advance(it, std::uniform_int_distribution<int>(0, static_cast<int>(model.size()) - 1)(rng));
      return it->second;
    };
    if (operation == 0) {
      if (!cache.can_open()) continue;
      const SeqId id = cache.open();
      model[id.slot] = Sequence{id, {}, {}};
    } else if (operation == 1) {
      if (std::uniform_int_distribution<int>(0, 3)(rng) != 0) continue;
      const SeqId id = pick().id;
      cache.release(id);
      model.erase(id.slot);
    } else if (operation <= 3) {  // append 1..40 tokens
      Sequence& seq = pick();
      const int n = std::uniform_int_distribution<int>(1, 40)(rng);
      if (!cache.can_reserve(seq.id, n)) continue;
      cache.reserve(seq.id, n);
      for (int layer = 0; layer < 2; ++layer) {
        const Rows k = random_values(rng, n * row, 2.0f), v = random_values(rng, n * row);
        cache.append(layer, seq.id, k, v);
        seq.k[layer].insert(seq.k[layer].end(), k.begin(), k.end());
        seq.v[layer].insert(seq.v[layer].end(), v.begin(), v.end());
      }
      if (layout.retention().ring_tokens > 0)
        seq.first_held = std::max(seq.first_held, seq.length() - layout.retention().ring_tokens);
    } else if (operation == 4) {  // truncate
      Sequence& seq = pick();
      const int length = std::uniform_int_distribution<int>(0, seq.length())(rng);
      try {
        cache.truncate(seq.id, length);
      } catch (const Error& error) {
        ASSERT_EQ(error.code(), errc::position_overwritten) << error.what();
        continue;
      }
      const int old_length = seq.length();
      if (length / group != old_length / group) ++truncations_into_groups;
      for (int layer = 0; layer < 2; ++layer) {
        // The new last group's positions, if it was quantized, come back dequantized; a window's
        // positions that the ring reused come back as zeros.
        if (length / group != old_length / group) {
          const int first = length / group * group;
          const Rows k_stored = residual_stored<DType>(seq.k[layer], old_length, 8);
          const Rows v_stored = residual_stored<DType>(seq.v[layer], old_length, 8);
          const Retention retention = layout.retention();
          for (int p = first; p < length; ++p) {
            const bool held = retention.ring_tokens == 0 || p < retention.sink_tokens || p >= seq.first_held;
            for (std::size_t e = 0; e < row; ++e) {
              seq.k[layer][p * row + e] = held ? k_stored[p * row + e] : 0.0f;
              seq.v[layer][p * row + e] = held ? v_stored[p * row + e] : 0.0f;
            }
          }
        }
        seq.k[layer].resize(length * row);
        seq.v[layer].resize(length * row);
      }
      seq.first_held = std::min(seq.first_held, length);
    } else {  // fork
      Sequence& seq = pick();
      if (!cache.can_open()) continue;
      const SeqId child = cache.fork(seq.id);
      Sequence copy = seq;
      copy.id = child;
      model[child.slot] = copy;
      ++forks;
    }
    // Every sequence holds what the model says; attention of one agrees with the oracle.
    for (const auto& [slot, seq] : model)
      for (int layer = 0; layer < 2; ++layer) {
        const auto view = cache.view(layer, seq.id);
        ASSERT_EQ(view.length, seq.length());
        if (seq.length() == 0) continue;
        const Rows k_view = view_values(view, 0), v_view = view_values(view, 1);
        const Rows k_stored = residual_stored<DType>(seq.k[layer], seq.length(), 8);
        const Rows v_stored = residual_stored<DType>(seq.v[layer], seq.length(), 8);
        for (int p = 0; p < seq.length(); ++p) {
          if (!mask.visible(p, seq.length() - 1)) continue;
          for (std::size_t e = 0; e < row; ++e) {
            ASSERT_EQ(k_view[p * row + e], k_stored[p * row + e]) << "K of layer " << layer << ", position " << p;
            ASSERT_EQ(v_view[p * row + e], v_stored[p * row + e]) << "V of layer " << layer << ", position " << p;
          }
        }
      }
    if (!model.empty() && step % 7 == 0) {
      const Sequence& seq = pick();
      if (seq.length() == 0) continue;
      const auto q = random_values(rng, 4 * 8, 0.5f);
      std::vector<float> out(q.size());
      attention::decode(cache, 1, seq.id, q, out);
      const auto expected = oracle_attention(shape, residual_stored<DType>(seq.k[1], seq.length(), 8),
                                             residual_stored<DType>(seq.v[1], seq.length(), 8), seq.length(), q, 1, mask,
                                             1.0 / std::sqrt(8.0));
      EXPECT_LE(relative_error(out, expected), kernel_bound<typename DType::storage_type>(8));
      ++checks;
    }
  }
  EXPECT_GT(truncations_into_groups, 25);
  EXPECT_GT(forks, 25);
  EXPECT_GT(checks, 50);
}

TYPED_TEST(ResidualCacheTest, RandomOperationsMatchModel) {
  expect_random_operations_match_model<TypeParam, int8_residual>();
  expect_random_operations_match_model<TypeParam, fp8_e4m3_residual>();
}

}  // namespace
}  // namespace kvcache::testing
