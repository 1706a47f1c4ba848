// Caches that keep each sequence's newest tokens in full precision and quantize them 32 at a
// time: int4 (keys per channel over the group, values per token) and the residual types
// (int8_residual, fp8_e4m3_residual: each row as their row type stores it). The memory math,
// what the cache stores (checked against a reference quantization of the model's rows, through
// the views), attention against the fp64 oracle on those values, and random operation sequences
// (append, truncate, fork, release) against a plain model, on every storage policy.
#include <kvcache/kvcache.hpp>

#include <map>

#include "../support/oracle.hpp"

namespace kvcache::testing {
namespace {

constexpr int group = int4::group_tokens;
static_assert(int8_residual::residual_tokens == group && fp8_e4m3_residual::residual_tokens == group);

// What a DType cache holds for one layer of a sequence whose rows ([position][kv_head][head_dim])
// are `rows`: whole groups of 32 positions quantized (int4: K per channel over the group, V per
// row; residual types: each row as their row type), the positions after the last whole group as
// they are.
template <class DType>
Rows stored_rows(const Rows& rows, int kind, int length, int kv_heads, int head_dim) {
  Rows result = rows;
  const std::size_t row = static_cast<std::size_t>(kv_heads) * head_dim;
  if constexpr (ResidualQuantizedElement<DType>) {
    round_trip_rows<DType>(std::span(result).first(static_cast<std::size_t>(length / group * group) * row), head_dim);
    result.resize(static_cast<std::size_t>(length) * row);
    return result;
  }
  auto dequantized = [](float x, Int4Params params) {
    return params.scale == 0.0f ? params.minimum
                                : params.minimum + static_cast<float>(detail::int4_code(x, params)) * params.scale;
  };
  for (int first = 0; first + group <= length; first += group)
    for (int head = 0; head < kv_heads; ++head) {
      if (kind == 0) {
        for (int d = 0; d < head_dim; ++d) {
          std::vector<float> channel;
          for (int p = first; p < first + group; ++p) channel.push_back(rows[p * row + head * head_dim + d]);
          const Int4Params params = int4_group_params(channel);
          for (int p = first; p < first + group; ++p)
            result[p * row + head * head_dim + d] = dequantized(rows[p * row + head * head_dim + d], params);
        }
      } else {
        for (int p = first; p < first + group; ++p) {
          const std::span<const float> values(&rows[p * row + head * head_dim], static_cast<std::size_t>(head_dim));
          const Int4Params params = int4_group_params(values);
          for (int d = 0; d < head_dim; ++d)
            result[p * row + head * head_dim + d] = dequantized(values[static_cast<std::size_t>(d)], params);
        }
      }
    }
  result.resize(static_cast<std::size_t>(length) * row);
  return result;
}

// The values a view holds, read through its layout alone ([position][kv_head][head_dim]; NaN for
// positions it does not hold).
template <class Storage>
Rows view_values(const SequenceView<Storage>& view, int kind) {
  const int hd = view.head_dim;
  const std::size_t row = static_cast<std::size_t>(view.kv_heads) * hd;
  Rows values(static_cast<std::size_t>(view.length) * row, std::nanf(""));
  // A stored element of (position, head, d): int4 decoded from its group's or row's parameters.
  auto element = [&](const Segment<Storage>& segment, int head, int r, int d) {
    if constexpr (std::same_as<Storage, int4x2>) {
      const int units = hd / 2;
      const int page_groups = static_cast<int>(segment.head_stride) / units / view.group_tokens;
      const int4x2* codes = (kind == 0 ? segment.k : segment.v) + head * segment.head_stride + r * units;
      if (kind == 0) {  // keys: a group's codes are laid out together (int4_key_code_at)
        const int group_index = (segment.first_position + r) / group - segment.first_position / group;
        const float* params = segment.k_scale + (head * page_groups + group_index) * 2 * hd;
        const int token = (segment.first_position + r) % group;
        return params[hd + d] + int4_key_code_at(codes - token * units, token, d) * params[d];
      }
      const float* params = segment.v_scale + (head * page_groups * group + r) * 2;
      return params[1] + int4_code_at(codes, d) * params[0];
    } else {
      return stored_value(segment, kind, head, r, d, hd);
    }
  };
  for (int i = 0; i < view.segment_count(); ++i) {
    const auto segment = view.segment(i);
    for (int head = 0; head < view.kv_heads; ++head)
      for (int r = 0; r < segment.count; ++r)
        for (int d = 0; d < hd; ++d) values[(segment.first_position + r) * row + head * hd + d] = element(segment, head, r, d);
  }
  const Segment<float>& residual = view.residual;
  for (int head = 0; head < view.kv_heads; ++head)
    for (int r = 0; r < residual.count; ++r)
      for (int d = 0; d < hd; ++d)
        values[(residual.first_position + r) * row + head * hd + d] =
            (kind == 0 ? residual.k : residual.v)[head * residual.head_stride + r * hd + d];
  return values;
}

template <class Layout>
Layout staged_layout();
template <>
Contiguous staged_layout<Contiguous>() { return {.max_sequences = 6, .max_tokens = 128}; }
template <>
Paged<32> staged_layout<Paged<32>>() { return {.num_blocks = 40, .max_sequences = 6}; }
template <>  // two groups per block: copy-on-write copies a quantized group with a residual one
Paged<64> staged_layout<Paged<64>>() { return {.num_blocks = 24, .max_sequences = 6}; }
template <>
SlidingWindow staged_layout<SlidingWindow>() {
  return {.max_sequences = 6, .window = 40, .sink_tokens = 32, .slack_tokens = 24};
}

template <class L, class D>
struct Config {
  using Layout = L;
  using DType = D;
};
template <class C>
class StagedCacheTest : public ::testing::Test {};
using StagedConfigs =
    ::testing::Types<Config<Contiguous, int4>, Config<Paged<32>, int4>, Config<Paged<64>, int4>, Config<SlidingWindow, int4>,
                     Config<Contiguous, int8_residual>, Config<Paged<32>, int8_residual>, Config<Paged<64>, int8_residual>,
                     Config<SlidingWindow, int8_residual>, Config<Contiguous, fp8_e4m3_residual>,
                     Config<SlidingWindow, fp8_e4m3_residual>>;
struct ConfigName {
  template <class C>
  static std::string GetName(int) {
    return std::string(C::Layout::name) + std::to_string(staged_layout<typename C::Layout>().page_tokens()) + "_" +
           std::string(C::DType::name);
  }
};
TYPED_TEST_SUITE(StagedCacheTest, StagedConfigs, ConfigName);

TYPED_TEST(StagedCacheTest, AllocatesExactlyWhatTheMemoryMathPredicts) {
  using DType = typename TypeParam::DType;
  const ModelShape shape{3, 8, 2, 32};
  const auto layout = staged_layout<typename TypeParam::Layout>();
  const KVCache<typename TypeParam::Layout, DType> cache(shape, layout);
  const std::size_t tokens = static_cast<std::size_t>(layout.page_count()) * layout.page_tokens();
  EXPECT_EQ(residual_bytes_per_sequence<DType>(shape), 3u * 2 * 2 * 32 * 32 * sizeof(float));
  EXPECT_EQ(cache.stats().bytes_capacity, bytes_for_tokens<DType>(shape, tokens) +
                                              layout.sequence_slots() * residual_bytes_per_sequence<DType>(shape));
}

TEST(StagedCache, BytesPerToken) {
  const ModelShape shape{3, 8, 2, 32};
  // Per layer and kv-head: 32 bytes of K and V codes, V's scale and minimum, and a 32nd of the
  // K group's 32 channel scales and minima.
  EXPECT_EQ(bytes_per_token<int4>(shape), 3u * 2 * (32 + 8 + 8));
  EXPECT_EQ(bytes_per_token<int4>(ModelShape{32, 32, 8, 128}) * 1000 / bytes_per_token<f16>(ModelShape{32, 32, 8, 128}),
            328u);  // Llama-3-8B: 168 bytes per kv-head token against f16's 512
  // The residual types' window is per sequence slot: a token takes what their row type's does.
  EXPECT_EQ(bytes_per_token<int8_residual>(shape), bytes_per_token<int8>(shape));
  EXPECT_EQ(bytes_per_token<fp8_e4m3_residual>(shape), bytes_per_token<fp8_e4m3>(shape));
  EXPECT_EQ(residual_bytes_per_sequence<int8>(shape), 0u);
}

template <class DType>
void expect_layouts_without_whole_groups_rejected() {
  auto expect_invalid = [](auto make) {
    try {
      make();
      ADD_FAILURE() << "expected invalid_configuration";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), errc::invalid_configuration) << error.what();
      EXPECT_NE(std::string(error.what()).find(DType::name), std::string::npos) << error.what();
    }
  };
  expect_invalid([] { KVCache<Paged<16>, DType>({1, 2, 2, 64}, {.num_blocks = 8, .max_sequences = 2}); });
  expect_invalid([] { KVCache<Contiguous, DType>({1, 2, 2, 64}, {.max_sequences = 2, .max_tokens = 100}); });
  expect_invalid([] { KVCache<SlidingWindow, DType>({1, 2, 2, 64}, {.max_sequences = 2, .window = 32, .sink_tokens = 4}); });
}

TEST(StagedCache, RejectsLayoutsWithoutWholeGroups) {
  expect_layouts_without_whole_groups_rejected<int4>();
  expect_layouts_without_whole_groups_rejected<int8_residual>();
  try {  // int4's packed codes and group scales need whole bytes per token
    KVCache<Paged<32>, int4>({1, 2, 2, 6}, {.num_blocks = 8, .max_sequences = 2});
    ADD_FAILURE() << "expected invalid_configuration";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), errc::invalid_configuration) << error.what();
  }
}

// Decode of ragged sequences and chunked prefill, MHA / GQA / MQA, fast and portable head sizes:
// the views hold exactly the reference quantization, and attention over them equals the oracle.
TYPED_TEST(StagedCacheTest, StoresTheReferenceQuantizationAndAttentionEqualsTheOracle) {
  using Layout = typename TypeParam::Layout;
  using DType = typename TypeParam::DType;
  std::mt19937 rng(44);
  for (const ModelShape& shape : oracle_shapes()) {
    const auto layout = staged_layout<Layout>();
    KVCache<Layout, DType> cache(shape, layout);
    const std::size_t kv_row = static_cast<std::size_t>(shape.kv_heads) * shape.head_dim;
    std::vector<SeqId> seqs;
    std::vector<Rows> k, v;
    const int lengths[] = {1, 31, 32, 77, 128};
    for (int length : lengths) {
      seqs.push_back(cache.open());
      // Channels of very different offsets and sizes: per-channel parameters keep each one's precision.
      Rows keys = random_values(rng, length * kv_row);
      for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = keys[i] * static_cast<float>(1 + i % 7) + static_cast<float>(i % 5) - 2;
      k.push_back(keys);
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
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      k_stored.push_back(stored_rows<DType>(k[i], 0, lengths[i], shape.kv_heads, shape.head_dim));
      v_stored.push_back(stored_rows<DType>(v[i], 1, lengths[i], shape.kv_heads, shape.head_dim));
      const auto view = cache.view(0, seqs[i]);
      ASSERT_EQ(view.residual.count, lengths[i] % group);
      const Rows k_view = view_values(view, 0), v_view = view_values(view, 1);
      const Mask mask = mask_of(layout);
      for (int p = 0; p < lengths[i]; ++p) {
        if (!mask.visible(p, lengths[i] - 1)) continue;  // a window's old positions may be gone
        for (std::size_t e = 0; e < kv_row; ++e) {
          ASSERT_EQ(k_view[p * kv_row + e], k_stored[i][p * kv_row + e]) << "K, length " << lengths[i] << ", position " << p;
          ASSERT_EQ(v_view[p * kv_row + e], v_stored[i][p * kv_row + e]) << "V, length " << lengths[i] << ", position " << p;
        }
      }
    }
    expect_attention_equals_oracle(cache, seqs, lengths, k_stored, v_stored, mask_of(layout), rng,
                                   kernel_bound<typename DType::storage_type>(shape.head_dim));
  }
}

// A batch append (one token for each of several sequences) stores what one append per sequence
// does, groups filling and quantizing mid-batch included.
template <class DType>
void expect_batch_append_equals_one_append_per_sequence() {
  SCOPED_TRACE(DType::name);
  const ModelShape shape{1, 4, 2, 64};
  const Paged<32> layout{.num_blocks = 24, .max_sequences = 3};
  KVCache<Paged<32>, DType> batched(shape, layout), single(shape, layout);
  std::mt19937 rng(31);
  std::vector<SeqId> a, b;
  for (int i = 0; i < 3; ++i) {
    a.push_back(batched.open());
    b.push_back(single.open());
    const int start = 10 * i + 25;  // each sequence completes a group at a different step
    const Rows k = random_values(rng, start * 128), v = random_values(rng, start * 128);
    batched.reserve(a[i], start + 20);
    single.reserve(b[i], start + 20);
    batched.append(0, a[i], k, v);
    single.append(0, b[i], k, v);
  }
  for (int step = 0; step < 20; ++step) {
    const Rows k = random_values(rng, 3 * 128), v = random_values(rng, 3 * 128);
    batched.append(0, std::span<const SeqId>(a), k, v);
    for (int i = 0; i < 3; ++i)
      single.append(0, b[i], std::span<const float>(k).subspan(i * 128, 128), std::span<const float>(v).subspan(i * 128, 128));
  }
  for (int i = 0; i < 3; ++i) {
    const auto x = batched.view(0, a[i]), y = single.view(0, b[i]);
    ASSERT_EQ(x.length, y.length);
    EXPECT_EQ(view_values(x, 0), view_values(y, 0)) << "sequence " << i;
    EXPECT_EQ(view_values(x, 1), view_values(y, 1)) << "sequence " << i;
  }
}

TEST(StagedCache, BatchAppendEqualsOneAppendPerSequence) {
  expect_batch_append_equals_one_append_per_sequence<int4>();
  expect_batch_append_equals_one_append_per_sequence<int8_residual>();
}

// int4_hadamard stores H x: attention equals the oracle on H^-1 (stored_rows<int4> of H x).
TEST(StagedCache, HadamardRotatedRowsAttendLikeTheirReference) {
  const ModelShape shape{1, 8, 2, 64};
  KVCache<Contiguous, int4_hadamard> cache(shape, {.max_sequences = 1, .max_tokens = 96});
  std::mt19937 rng(12);
  const int length = 77;
  Rows k = random_values(rng, length * 128), v = random_values(rng, length * 128);
  for (std::size_t i = 0; i < k.size(); i += 64) k[i + 5] += 20.0f;  // an outlier channel
  const SeqId seq = cache.open();
  cache.reserve(seq, length);
  cache.append(0, seq, k, v);
  auto rotate_rows = [](Rows rows) {
    for (std::size_t i = 0; i < rows.size(); i += 64) detail::hadamard_transform(&rows[i], 64);
    return rows;
  };
  const Rows k_stored = rotate_rows(stored_rows<int4>(rotate_rows(k), 0, length, 2, 64));  // H = H^-1
  const Rows v_stored = rotate_rows(stored_rows<int4>(rotate_rows(v), 1, length, 2, 64));
  const double scale = 1.0 / 8.0;
  const auto q = random_values(rng, 4 * 8 * 64, 0.3f);
  std::vector<float> out(q.size());
  attention::prefill(cache, 0, seq, q, out, {.scale = static_cast<float>(scale)});
  EXPECT_LE(relative_error(out, oracle_attention(shape, k_stored, v_stored, length, q, 4, {}, scale)), kernel_bound<int4x2>(64));
}

// The newest rows are exact: attention over a residual cache shorter than a group equals that
// over an f32 cache bit for bit, where the plain row type's does not.
TEST(StagedCache, NewestTokensAttendAtFullPrecision) {
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
template <class DType>
void expect_shared_prefix_blocks_attend_like_their_owner() {
  SCOPED_TRACE(DType::name);
  const ModelShape shape{2, 8, 2, 64};
  KVCache<Paged<32>, DType> cache(shape, {.num_blocks = 16, .max_sequences = 2});
  std::mt19937 rng(8);
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

TEST(StagedCache, SharedPrefixBlocksAttendLikeTheirOwner) {
  expect_shared_prefix_blocks_attend_like_their_owner<int4>();
  expect_shared_prefix_blocks_attend_like_their_owner<fp8_e4m3_residual>();
}

// The staged part of the model test: every layer of every sequence is a list of rows as appended
// (or, after a truncation into a quantized group, as dequantized), and the cache must hold
// stored_rows of them, and attend to them, after every operation.
TYPED_TEST(StagedCacheTest, RandomOperationsMatchModel) {
  using Layout = typename TypeParam::Layout;
  using DType = typename TypeParam::DType;
  const ModelShape shape{2, 4, 2, 8};
  const std::size_t row = 2 * 8;
  Layout layout = staged_layout<Layout>();
  if constexpr (std::same_as<Layout, SlidingWindow>)  // a window shorter than a group: truncation
    layout = {.max_sequences = 6, .window = 8, .sink_tokens = 0, .slack_tokens = 56};  // meets reused rows
  const Mask mask = mask_of(layout);
  KVCache<Layout, DType> cache(shape, layout);
  struct Sequence {
    SeqId id;
    Rows k[2], v[2];     // [layer]: rows as appended (full precision)
    int first_held = 0;  // a window's positions before this (and after the sinks) were overwritten
    // stored_rows of k and v, recomputed only after they change: re-quantizing every sequence at
    // every step made this test the slowest of the suite under the sanitizers.
    Rows k_stored[2], v_stored[2];
    bool stored_current = false;
    int length() const { return static_cast<int>(k[0].size() / 16); }
    void update_stored() {
      if (stored_current) return;
      for (int layer = 0; layer < 2; ++layer) {
        k_stored[layer] = stored_rows<DType>(k[layer], 0, length(), 2, 8);
        v_stored[layer] = stored_rows<DType>(v[layer], 1, length(), 2, 8);
      }
      stored_current = true;
    }
  };
  std::map<std::uint32_t, Sequence> model;
  std::mt19937 rng(77);
  int truncations_into_groups = 0, forks = 0, checks = 0;
  for (int step = 0; step < 3000; ++step) {
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
      model[id.slot].id = id;
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
      seq.stored_current = false;
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
      seq.update_stored();
      for (int layer = 0; layer < 2; ++layer) {
        // The new last group's positions, if it was quantized, come back dequantized; a window's
        // positions that the ring reused come back as zeros.
        if (length / group != old_length / group) {
          const int first = length / group * group;
          const Rows& k_stored = seq.k_stored[layer];
          const Rows& v_stored = seq.v_stored[layer];
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
      seq.stored_current = false;
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
    for (auto& [slot, seq] : model) {
      seq.update_stored();
      for (int layer = 0; layer < 2; ++layer) {
        const auto view = cache.view(layer, seq.id);
        ASSERT_EQ(view.length, seq.length());
        if (seq.length() == 0) continue;
        const Rows k_view = view_values(view, 0), v_view = view_values(view, 1);
        const Rows& k_stored = seq.k_stored[layer];
        const Rows& v_stored = seq.v_stored[layer];
        for (int p = 0; p < seq.length(); ++p) {
          if (!mask.visible(p, seq.length() - 1)) continue;
          for (std::size_t e = 0; e < row; ++e) {
            ASSERT_EQ(k_view[p * row + e], k_stored[p * row + e]) << "K of layer " << layer << ", position " << p;
            ASSERT_EQ(v_view[p * row + e], v_stored[p * row + e]) << "V of layer " << layer << ", position " << p;
          }
        }
      }
    }
    if (!model.empty() && step % 7 == 0) {
      const Sequence& seq = pick();
      if (seq.length() == 0) continue;
      const auto q = random_values(rng, 4 * 8, 0.5f);
      std::vector<float> out(q.size());
      attention::decode(cache, 1, seq.id, q, out);
      const auto expected =
          oracle_attention(shape, seq.k_stored[1], seq.v_stored[1], seq.length(), q, 1, mask, 1.0 / std::sqrt(8.0));
      EXPECT_LE(relative_error(out, expected), kernel_bound<typename DType::storage_type>(8));
      ++checks;
    }
  }
  EXPECT_GT(truncations_into_groups, 50);
  EXPECT_GT(forks, 50);
  EXPECT_GT(checks, 100);
}

}  // namespace
}  // namespace kvcache::testing
