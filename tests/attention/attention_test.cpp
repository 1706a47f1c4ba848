// Attention over every storage policy, element type and head layout equals the naive fp64
// oracle: chunked prefill, decode, ragged batches, soft-cap, large logits.
#include <kvcache/attention/attention.hpp>

#include <thread>

#include "../support/oracle.hpp"

namespace kvcache::testing {
namespace {

// KVCACHE_FAST_HEAD_DIMS by default: the three fast sizes, every other size portable.
static_assert(attention::has_fast_kernels(64) && attention::has_fast_kernels(128) && attention::has_fast_kernels(256) &&
              !attention::has_fast_kernels(96) && !attention::has_fast_kernels(8));

// Bounds on relative_error() against the oracle run on the original float K/V, i.e. including
// the rounding of K/V to the storage type: four unit roundoffs u of the type (f16 u = 2^-11,
// bf16 u = 2^-8). Measured worst cases over these tests: f16 7.0e-4 = 1.4u, bf16 5.5e-3 = 1.4u.
template <class DType>
constexpr double storage_bound = 1e-5;
template <>
constexpr double storage_bound<f16> = 4 * 0x1p-11;
template <>
constexpr double storage_bound<bf16> = 4 * 0x1p-8;

// The kernel itself: against the oracle run on the K/V values as stored.
constexpr double kernel_bound = 1e-5;

struct Heads {
  const char* name;
  int q_heads;
  int kv_heads;
};
// MHA; GQA with 4 groups of 4; MQA with more heads than one kernel pass takes (8).
constexpr Heads head_layouts[] = {{"MHA", 4, 4}, {"GQA", 16, 4}, {"MQA", 12, 1}};
constexpr int head_dims[] = {24, 64};  // a generic size and a fast path

template <class C>
class AttentionTest : public ::testing::Test {};
TYPED_TEST_SUITE(AttentionTest, AllConfigs, ConfigName);

// Appends `total` positions to one sequence in random chunks (at most 9, what the window's
// slack allows), checking chunked prefill of every chunk in both layers, then decodes
// `decode_steps` more positions one by one.
template <class C>
void check_sequence(const ModelShape& shape, std::mt19937& rng, int total) {
  using Cache = KVCache<typename C::Layout, typename C::DType>;
  const auto layout = make_layout<typename C::Layout>();
  Cache cache(shape, layout);
  const Mask mask = mask_of(layout);
  const SeqId seq = cache.open();
  const std::size_t kv_row = static_cast<std::size_t>(shape.kv_heads) * shape.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(shape.q_heads) * shape.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(shape.head_dim));

  std::vector<Rows> k(shape.layers), v(shape.layers);
  std::uniform_int_distribution<int> chunk_size(1, 9);
  for (int length = 0; length < total;) {
    const int n = std::min(total - length, chunk_size(rng));
    cache.reserve(seq, n);
    for (int layer = 0; layer < shape.layers; ++layer) {
      const auto new_k = random_values(rng, n * kv_row), new_v = random_values(rng, n * kv_row);
      cache.append(layer, seq, std::span<const float>(new_k), std::span<const float>(new_v));
      k[layer].insert(k[layer].end(), new_k.begin(), new_k.end());
      v[layer].insert(v[layer].end(), new_v.begin(), new_v.end());

      const auto q = random_values(rng, n * q_row);
      std::vector<float> out(q.size());
      attention::prefill(cache, layer, seq, std::span<const float>(q), std::span<float>(out));

      const auto exact = oracle_attention(shape, k[layer], v[layer], length + n, q, n, mask, scale);
      const auto as_stored = oracle_attention(shape, rounded<typename C::DType>(k[layer]),
                                              rounded<typename C::DType>(v[layer]), length + n, q,
                                              n, mask, scale);
      ASSERT_LE(relative_error(out, as_stored), kernel_bound) << "length " << length + n;
      ASSERT_LE(relative_error(out, exact), storage_bound<typename C::DType>)
          << "length " << length + n;
    }
    length += n;
  }
}

TYPED_TEST(AttentionTest, ChunkedPrefillMatchesOracle) {
  std::mt19937 rng(7);
  for (const Heads& heads : head_layouts)
    for (int head_dim : head_dims) {
      SCOPED_TRACE(std::string(heads.name) + " head_dim " + std::to_string(head_dim));
      // 70 positions: 5 blocks of 16 (the last partial), 3+ wraps of the window's ring.
      check_sequence<TypeParam>({2, heads.q_heads, heads.kv_heads, head_dim}, rng, 70);
    }
}

// One decode call over a batch of sequences of different lengths, including lengths on both
// sides of the block and window edges.
TYPED_TEST(AttentionTest, RaggedBatchDecodeMatchesOracle) {
  using C = TypeParam;
  std::mt19937 rng(11);
  const int lengths[] = {1, 15, 16, 17, 23, 64};
  for (const Heads& heads : head_layouts) {
    const ModelShape shape{1, heads.q_heads, heads.kv_heads, 64};
    const auto layout = make_layout<typename C::Layout>();
    KVCache<typename C::Layout, typename C::DType> cache(shape, layout);
    const std::size_t kv_row = static_cast<std::size_t>(shape.kv_heads) * shape.head_dim;
    const std::size_t q_row = static_cast<std::size_t>(shape.q_heads) * shape.head_dim;
    std::vector<SeqId> seqs;
    std::vector<Rows> k, v;
    for (int length : lengths) {
      const SeqId seq = cache.open();
      seqs.push_back(seq);
      k.push_back(random_values(rng, length * kv_row));
      v.push_back(random_values(rng, length * kv_row));
      cache.reserve(seq, length);
      cache.append(0, seq, std::span<const float>(k.back()), std::span<const float>(v.back()));
    }
    const auto q = random_values(rng, seqs.size() * q_row);
    std::vector<float> out(q.size());
    attention::decode(cache, 0, std::span<const SeqId>(seqs), std::span<const float>(q),
                      std::span<float>(out));
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const std::vector<float> q_i(q.begin() + i * q_row, q.begin() + (i + 1) * q_row);
      const std::vector<float> out_i(out.begin() + i * q_row, out.begin() + (i + 1) * q_row);
      const auto expected = oracle_attention(shape, rounded<typename C::DType>(k[i]),
                                             rounded<typename C::DType>(v[i]), lengths[i], q_i, 1,
                                             mask_of(layout), 1.0 / 8.0);
      EXPECT_LE(relative_error(out_i, expected), kernel_bound)
          << heads.name << " length " << lengths[i];
    }
  }
}

// The threaded kernel: 1, 2 and 3 threads, sequences long enough to be split by token range
// (odd lengths), paged sequences whose blocks are scattered through the pool (appended in
// interleaved chunks, beside a released sequence's holes), fast and generic head sizes. Every
// thread count reads the same cache against the same oracle results (the oracle, computed
// once, is most of the test's time).
template <class Layout, class DType>
void check_threaded(const ModelShape& shape, const Layout& layout) {
  std::mt19937 rng(17);
  KVCache<Layout, DType> cache(shape, layout);
  const std::size_t kv_row = static_cast<std::size_t>(shape.kv_heads) * shape.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(shape.q_heads) * shape.head_dim;
  const int lengths[] = {1, 17, 1001, 2049};
  std::vector<SeqId> seqs;
  std::vector<Rows> k(4), v(4);
  const SeqId hole = cache.open();
  for (std::size_t i = 0; i < 4; ++i) seqs.push_back(cache.open());
  cache.reserve(hole, 40);
  for (int done = 0; done < 2049; done += 37)  // interleaved chunks scatter the blocks
    for (std::size_t i = 0; i < 4; ++i) {
      const int n = std::min(37, lengths[i] - done);
      if (n <= 0) continue;
      const auto new_k = random_values(rng, n * kv_row), new_v = random_values(rng, n * kv_row);
      cache.reserve(seqs[i], n);
      cache.append(0, seqs[i], new_k, new_v);
      k[i].insert(k[i].end(), new_k.begin(), new_k.end());
      v[i].insert(v[i].end(), new_v.begin(), new_v.end());
      if (done == 0 && i == 1) cache.release(hole);
    }
  const double scale = 1.0 / std::sqrt(static_cast<double>(shape.head_dim));
  const auto q = random_values(rng, seqs.size() * q_row);
  std::vector<std::vector<double>> expected;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const std::vector<float> q_i(q.begin() + i * q_row, q.begin() + (i + 1) * q_row);
    expected.push_back(oracle_attention(shape, rounded<DType>(k[i]), rounded<DType>(v[i]), lengths[i], q_i, 1,
                                        mask_of(layout), scale));
  }
  // Chunked prefill of the last 40 positions of the longest sequence.
  const auto q_prefill = random_values(rng, 40 * q_row);
  const auto expected_prefill = oracle_attention(shape, rounded<DType>(k[3]), rounded<DType>(v[3]), 2049, q_prefill,
                                                 40, mask_of(layout), scale);
  for (int threads : {1, 2, 3}) {
    backend::cpu::set_threads(threads);
    std::vector<float> out(q.size());
    attention::decode(cache, 0, std::span<const SeqId>(seqs), q, out);
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const std::vector<float> out_i(out.begin() + i * q_row, out.begin() + (i + 1) * q_row);
      EXPECT_LE(relative_error(out_i, expected[i]), kernel_bound) << threads << " threads, length " << lengths[i];
    }
    std::vector<float> out_prefill(q_prefill.size());
    attention::prefill(cache, 0, seqs[3], q_prefill, out_prefill);
    EXPECT_LE(relative_error(out_prefill, expected_prefill), kernel_bound) << threads << " threads, prefill";
  }
  backend::cpu::set_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

TEST(Attention, ThreadedSplitsMatchOracle) {
  check_threaded<Paged<16>, f16>({1, 8, 1, 128}, {.num_blocks = 400, .max_sequences = 5});  // MQA
  check_threaded<Paged<16>, bf16>({1, 32, 8, 64}, {.num_blocks = 400, .max_sequences = 5});  // GQA
  check_threaded<Contiguous, f32>({1, 4, 4, 256}, {.max_sequences = 5, .max_tokens = 2100});  // MHA
  check_threaded<SlidingWindow, f16>({1, 16, 4, 128}, {.max_sequences = 5, .window = 700, .sink_tokens = 5,
                                                      .slack_tokens = 40});
  check_threaded<Contiguous, f32>({1, 6, 2, 40}, {.max_sequences = 5, .max_tokens = 2100});  // generic
}

// The calling thread's scratch holds one row of partial results per query head and token
// range (a task's rows start on a cache line), not a fixed block per task: Llama-3-8B's GQA
// (4 query heads per kv-head) at head_dim 128, two sequences of 3000 keys split in 2 ranges
// each, is 2 x 8 x 2 tasks of 4 rows: 128 rows of 128 floats of accumulators. Run on a thread
// of its own, whose scratch starts empty.
TEST(Attention, ScratchHoldsOneRowPerQueryHeadAndRange) {
  const ModelShape shape{1, 32, 8, 128};
  KVCache<Contiguous, f16> cache(shape, {.max_sequences = 2, .max_tokens = 3000});
  std::mt19937 rng(3);
  const auto rows = random_values(rng, 3000 * 8 * 128);
  std::vector<SeqId> seqs;
  for (int i = 0; i < 2; ++i) {
    seqs.push_back(cache.open());
    cache.reserve(seqs.back(), 3000);
    cache.append(0, seqs.back(), rows, rows);
  }
  const auto q = random_values(rng, 2 * 32 * 128);
  std::vector<float> out(q.size());
  std::size_t accumulators = 0, states = 0;
  std::thread([&] {
    attention::decode(cache, 0, std::span<const SeqId>(seqs), q, out);
    accumulators = attention::cpu::detail::scratch().acc.size();
    states = attention::cpu::detail::scratch().softmax.size();
  }).join();
  EXPECT_EQ(accumulators, 128u * 128);
  EXPECT_EQ(states, 2u * 8 * 2 * 8);  // 4 rows per task, padded to a line of 8 states
}

// Passes of more than 4 heads score a tile as a matrix product with the heads in SIMD lanes
// (1 to 4 registers of 16): every register count, heads that fill none of them exactly, each
// fast head size, tiles cut short (45 = 32 + 13 keys; 13 and 29 pad to 16 and 32 rows), for
// decode (MQA) and for prefill (queries x heads share a pass), against the oracle.
template <class DType>
void check_many_heads(int q_heads, int head_dim) {
  std::mt19937 rng(static_cast<unsigned>(q_heads * 1000 + head_dim));
  const ModelShape shape{1, q_heads, 1, head_dim};
  KVCache<Contiguous, DType> cache(shape, {.max_sequences = 2, .max_tokens = 64});
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  for (int length : {13, 29, 45}) {
    const SeqId seq = cache.open();
    const auto k = random_values(rng, static_cast<std::size_t>(length) * head_dim);
    const auto v = random_values(rng, k.size());
    cache.reserve(seq, length);
    cache.append(0, seq, k, v);
    const int queries = std::min(length, 5);  // prefill blocks of 64 / q_heads queries
    const auto q = random_values(rng, static_cast<std::size_t>(queries) * q_heads * head_dim);
    std::vector<float> out(q.size());
    attention::prefill(cache, 0, seq, std::span<const float>(q), std::span<float>(out));
    EXPECT_LE(relative_error(out, oracle_attention(shape, rounded<DType>(k), rounded<DType>(v), length, q, queries, {},
                                                   scale)),
              kernel_bound)
        << "prefill, length " << length;
    const std::vector<float> q_last(q.end() - q_heads * head_dim, q.end());
    std::vector<float> out_last(q_last.size());
    const SeqId seqs[] = {seq};
    attention::decode(cache, 0, std::span<const SeqId>(seqs), std::span<const float>(q_last), std::span<float>(out_last));
    EXPECT_LE(relative_error(out_last, oracle_attention(shape, rounded<DType>(k), rounded<DType>(v), length, q_last, 1,
                                                        {}, scale)),
              kernel_bound)
        << "decode, length " << length;
    cache.release(seq);
  }
}

TEST(Attention, ManyHeadPassesMatchOracle) {
  for (int head_dim : {64, 128, 256})
    for (int q_heads : {5, 16, 20, 33, 64}) {
      SCOPED_TRACE(std::to_string(q_heads) + " heads, head_dim " + std::to_string(head_dim));
      check_many_heads<f32>(q_heads, head_dim);
      check_many_heads<f16>(q_heads, head_dim);
      check_many_heads<bf16>(q_heads, head_dim);
    }
}

TEST(Attention, SoftCapAndLargeLogitsStayExact) {
  std::mt19937 rng(3);
  const ModelShape shape{1, 8, 2, 64};
  KVCache<Paged<16>, f32> cache(shape, {.num_blocks = 8});
  const SeqId seq = cache.open();
  const int length = 50;
  // Logits around +-1e4: a softmax without the running max overflows exp().
  const auto k = random_values(rng, length * 2 * 64, 30.0f);
  const auto v = random_values(rng, length * 2 * 64);
  const auto q = random_values(rng, 8 * 64, 30.0f);
  cache.reserve(seq, length);
  cache.append(0, seq, std::span<const float>(k), std::span<const float>(v));
  for (float soft_cap : {0.0f, 50.0f}) {
    std::vector<float> out(q.size());
    const AttentionParams params{.scale = 1.0f, .soft_cap = soft_cap};
    attention::decode(cache, 0, std::span<const SeqId>(&seq, 1), std::span<const float>(q),
                      std::span<float>(out), params);
    for (float value : out) ASSERT_TRUE(std::isfinite(value));
    const auto expected = oracle_attention(shape, k, v, length, q, 1, {}, 1.0, soft_cap);
    EXPECT_LE(relative_error(out, expected), kernel_bound) << "soft_cap " << soft_cap;
  }
}

TEST(Attention, HalfPrecisionQueriesAndOutputs) {
  std::mt19937 rng(5);
  const ModelShape shape{1, 4, 2, 32};
  KVCache<Contiguous, bf16> cache(shape, {.max_sequences = 1, .max_tokens = 40});
  const SeqId seq = cache.open();
  const auto k = random_values(rng, 40 * 64), v = random_values(rng, 40 * 64);
  std::vector<Eigen::half> q(4 * 32 * 3);
  std::vector<float> q_float(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) q_float[i] = static_cast<float>(q[i] = Eigen::half(std::normal_distribution<float>()(rng)));
  cache.reserve(seq, 40);
  cache.append(0, seq, std::span<const float>(k), std::span<const float>(v));
  std::vector<Eigen::bfloat16> out(q.size());
  attention::prefill(cache, 0, seq, std::span<const Eigen::half>(q), std::span<Eigen::bfloat16>(out));
  const auto expected = oracle_attention(shape, rounded<bf16>(k), rounded<bf16>(v), 40, q_float, 3,
                                         {}, 1.0 / std::sqrt(32.0));
  EXPECT_LE(relative_error(out, expected), 4e-3);  // the output's bf16 rounding
}

TEST(Attention, BadInputThrowsTypedErrors) {
  const ModelShape shape{1, 4, 2, 8};
  KVCache<SlidingWindow, f32> cache(shape, {.max_sequences = 2, .window = 4, .slack_tokens = 1});
  const SeqId seq = cache.open();
  std::vector<float> q(4 * 8), out(4 * 8);
  // No position appended yet: nothing for the query to attend.
  EXPECT_THROW(attention::decode(cache, 0, std::span<const SeqId>(&seq, 1),
                                 std::span<const float>(q), std::span<float>(out)),
               Error);
  cache.reserve(seq, 8);
  const std::vector<float> kv(8 * 2 * 8, 1.0f);
  cache.append(0, seq, std::span<const float>(kv), std::span<const float>(kv));
  std::vector<float> wrong(3);
  try {
    attention::decode(cache, 0, std::span<const SeqId>(&seq, 1), std::span<const float>(wrong),
                      std::span<float>(out));
    FAIL() << "a query of the wrong size was accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), errc::shape_mismatch);
    EXPECT_NE(std::string(error.what()).find("q has 3"), std::string::npos) << error.what();
  }
  // A chunk of 3 queries needs positions the ring (4 + 1 slack) no longer holds.
  std::vector<float> q3(3 * 4 * 8), out3(q3.size());
  try {
    attention::prefill(cache, 0, seq, std::span<const float>(q3), std::span<float>(out3));
    FAIL() << "a prefill chunk larger than the ring's slack was accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), errc::position_overwritten);
  }
  // Two queries fit the slack.
  std::vector<float> q2(2 * 4 * 8), out2(q2.size());
  EXPECT_NO_THROW(attention::prefill(cache, 0, seq, std::span<const float>(q2), std::span<float>(out2)));
}

// Continuous batching: one prefill call over several sequences' chunks gives each sequence what
// its own prefill call gives (bit for bit), and a count per sequence is required.
TYPED_TEST(AttentionTest, BatchedPrefillEqualsOneCallPerSequence) {
  using C = TypeParam;
  std::mt19937 rng(21);
  const ModelShape shape{1, 8, 2, 64};
  KVCache<typename C::Layout, typename C::DType> cache(shape, make_layout<typename C::Layout>());
  const std::size_t kv_row = 2 * 64, q_row = 8 * 64;
  const int cached[] = {0, 5, 16, 30}, chunk[] = {7, 1, 9, 4};  // chunks within the window's slack
  std::vector<SeqId> seqs;
  std::vector<int> counts;
  int all = 0;
  for (int i = 0; i < 4; ++i) {
    const SeqId seq = cache.open();
    const int n = cached[i] + chunk[i];
    const auto k = random_values(rng, n * kv_row), v = random_values(rng, n * kv_row);
    cache.reserve(seq, n);
    cache.append(0, seq, k, v);
    seqs.push_back(seq);
    counts.push_back(chunk[i]);
    all += chunk[i];
  }
  const auto q = random_values(rng, all * q_row);
  std::vector<float> batched(q.size());
  attention::prefill(cache, 0, std::span<const SeqId>(seqs), std::span<const int>(counts), q, batched);
  std::size_t offset = 0;
  for (int i = 0; i < 4; ++i) {
    const std::size_t rows = static_cast<std::size_t>(counts[static_cast<std::size_t>(i)]) * q_row;
    std::vector<float> alone(rows);
    attention::prefill(cache, 0, seqs[static_cast<std::size_t>(i)], std::span<const float>(q).subspan(offset, rows),
                       alone);
    EXPECT_TRUE(std::equal(alone.begin(), alone.end(), batched.begin() + static_cast<std::ptrdiff_t>(offset)))
        << "sequence " << i;
    offset += rows;
  }
  try {
    attention::prefill(cache, 0, std::span<const SeqId>(seqs), std::span<const int>(counts).first(3), q, batched);
    FAIL() << "three counts for four sequences were accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), errc::shape_mismatch);
    EXPECT_NE(std::string(error.what()).find("4 sequences but 3 query counts"), std::string::npos) << error.what();
  }
}

TEST(OnlineSoftmax, MergeOfSplitsEqualsOnePass) {
  std::mt19937 rng(9);
  const auto scores = random_values(rng, 100, 20.0f);
  attention::OnlineSoftmax whole, first, second;
  auto add = [&](attention::OnlineSoftmax& state, int begin, int end) {
    for (int i = begin; i < end; ++i) {
      state.raise_max(scores[i]);
      state.sum += std::exp(scores[i] - state.max);
    }
  };
  add(whole, 0, 100);
  add(first, 0, 40);
  add(second, 40, 100);
  float own = 0, other = 0;
  first.merge(second, &own, &other);
  EXPECT_EQ(first.max, whole.max);
  EXPECT_NEAR(first.sum, whole.sum, 1e-5 * whole.sum);
  attention::OnlineSoftmax empty;
  empty.merge(whole, &own, &other);
  EXPECT_EQ(own, 0.0f);
  EXPECT_EQ(other, 1.0f);
  EXPECT_EQ(empty.sum, whole.sum);
}

}  // namespace
}  // namespace kvcache::testing
