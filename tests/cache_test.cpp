// KVCache: exact memory math, stats, sequence operations, and typed errors that leave the cache
// exactly as it was.
#include <kvcache/cache.hpp>

#include "support/oracle.hpp"

namespace kvcache::testing {
namespace {

// A CPU backend that records what the cache asks for, to prove the memory math is exact.
struct counting_cpu {
  static constexpr const char* name = "counting_cpu";
  static inline std::size_t bytes_allocated = 0;
  static void* allocate(std::size_t bytes) {
    bytes_allocated += bytes;
    return backend::cpu::allocate(bytes);
  }
  static void deallocate(void* memory, std::size_t bytes) noexcept {
    bytes_allocated -= bytes;
    backend::cpu::deallocate(memory, bytes);
  }
  static void copy(void* dst, const void* src, std::size_t bytes) { backend::cpu::copy(dst, src, bytes); }
  static void fill_zero(void* dst, std::size_t bytes) { backend::cpu::fill_zero(dst, bytes); }
  static void upload(void* dst, const void* src, std::size_t bytes) { backend::cpu::upload(dst, src, bytes); }
  static constexpr bool host_accessible = true;
  using stream_type = backend::cpu::stream_type;
};
static_assert(Backend<counting_cpu>);

template <class C>
class CacheTest : public ::testing::Test {};
TYPED_TEST_SUITE(CacheTest, AllConfigs, ConfigName);

TYPED_TEST(CacheTest, AllocatesExactlyWhatTheMemoryMathPredicts) {
  using C = TypeParam;
  const ModelShape shape{3, 8, 2, 24};
  const auto layout = make_layout<typename C::Layout>();
  const std::size_t tokens = static_cast<std::size_t>(layout.page_count()) * layout.page_tokens();
  {
    KVCache<typename C::Layout, typename C::DType, counting_cpu> cache(shape, layout);
    EXPECT_EQ(counting_cpu::bytes_allocated, bytes_for_tokens<typename C::DType>(shape, tokens));
    EXPECT_EQ(cache.stats().bytes_capacity, counting_cpu::bytes_allocated);
    EXPECT_EQ(bytes_per_token(shape, typename C::DType{}),
              2u * 3 * 2 * 24 * (C::DType::bits / 8));
  }
  EXPECT_EQ(counting_cpu::bytes_allocated, 0u);
}

// A policy sized from a byte budget allocates at most the budget, and one more page would not fit.
TYPED_TEST(CacheTest, ByteBudgetIsFilledWithWholePages) {
  using C = TypeParam;
  using Layout = typename C::Layout;
  using DType = typename C::DType;
  const ModelShape shape{3, 8, 2, 24};
  const std::size_t budget = 1'000'000;
  auto fit = [&](std::size_t bytes) {
    if constexpr (std::is_same_v<Layout, Contiguous>) return Layout::template from_budget<DType>(shape, bytes, 100);
    if constexpr (std::is_same_v<Layout, Paged<16>>) return Layout::template from_budget<DType>(shape, bytes);
    if constexpr (std::is_same_v<Layout, SlidingWindow>)
      return Layout::template from_budget<DType>(shape, bytes, 64, 4, 8);
  };
  const Layout layout = fit(budget);
  const KVCache<Layout, DType> cache(shape, layout);
  const std::size_t page_bytes = bytes_for_tokens<DType>(shape, layout.page_tokens());
  EXPECT_LE(cache.stats().bytes_capacity, budget);
  EXPECT_GT(cache.stats().bytes_capacity + page_bytes, budget);
  // A budget too small for one page gives a policy that the cache refuses, naming the field.
  EXPECT_THROW((KVCache<Layout, DType>(shape, fit(page_bytes - 1))), Error);
}

TYPED_TEST(CacheTest, StatsCountReservedAndUsedBytes) {
  using C = TypeParam;
  using Layout = typename C::Layout;
  const ModelShape shape{2, 4, 2, 8};
  const Layout layout = make_layout<Layout>();
  KVCache<Layout, typename C::DType> cache(shape, layout);
  const std::size_t per_token = bytes_per_token<typename C::DType>(shape);
  EXPECT_EQ(cache.stats().bytes_reserved, 0u);
  EXPECT_EQ(cache.stats().bytes_used, 0u);

  const SeqId seq = cache.open();
  cache.reserve(seq, 40);
  const std::vector<float> kv(40 * 2 * 8, 0.5f);
  for (int layer = 0; layer < 2; ++layer)
    cache.append(layer, seq, std::span<const float>(kv), std::span<const float>(kv));
  const MemoryStats stats = cache.stats();
  const int held = std::is_same_v<Layout, SlidingWindow> ? 3 + 28 : 40;  // sinks + ring
  EXPECT_EQ(stats.bytes_used, held * per_token);
  const int reserved_rows = std::is_same_v<Layout, Paged<16>> ? 48 : layout.page_tokens();
  EXPECT_EQ(stats.bytes_reserved, reserved_rows * per_token);
  EXPECT_DOUBLE_EQ(stats.utilization(), static_cast<double>(held) / reserved_rows);

  // A fork shares blocks in a paged cache (counted once) and copies rows in the others.
  const SeqId child = cache.fork(seq);
  EXPECT_EQ(cache.stats().bytes_used, (std::is_same_v<Layout, Paged<16>> ? 1 : 2) * held * per_token);
  cache.release(seq);
  cache.release(child);
  EXPECT_EQ(cache.stats().bytes_reserved, 0u);
  EXPECT_EQ(cache.stats().bytes_used, 0u);
}

// Everything a caller can observe: lengths, reservations, stats and every stored row.
template <class Cache>
struct Snapshot {
  std::vector<int> lengths;
  std::vector<float> rows;
  std::size_t reserved_bytes = 0, used_bytes = 0;
  int open = 0;

  Snapshot(const Cache& cache, const std::vector<SeqId>& seqs) {
    const MemoryStats stats = cache.stats();
    reserved_bytes = stats.bytes_reserved;
    used_bytes = stats.bytes_used;
    open = cache.open_sequences();
    for (SeqId seq : seqs) {
      if (!cache.contains(seq)) continue;
      lengths.push_back(cache.reserved(seq));
      for (int layer = 0; layer < cache.shape().layers; ++layer) {
        const auto view = cache.view(layer, seq);
        lengths.push_back(view.length);
        lengths.push_back(view.first_held);
        for (int i = 0; i < view.segment_count(); ++i) {
          const auto segment = view.segment(i);
          for (int head = 0; head < view.kv_heads; ++head)
            for (std::size_t e = 0; e < segment.count * static_cast<std::size_t>(view.head_dim); ++e) {
              rows.push_back(static_cast<float>(segment.k[head * segment.head_stride + e]));
              rows.push_back(static_cast<float>(segment.v[head * segment.head_stride + e]));
            }
        }
      }
    }
  }
  bool operator==(const Snapshot&) const = default;
};

// Runs `call`, which must throw Error{code} with `fragment` in its message, and checks that the
// cache is exactly as before.
template <class Cache, class Call>
void expect_error(const Cache& cache, const std::vector<SeqId>& seqs, errc code,
                  const std::string& fragment, Call call) {
  const Snapshot<Cache> before(cache, seqs);
  try {
    call();
    ADD_FAILURE() << "expected " << to_string(code) << " (" << fragment << ")";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), code) << error.what();
    EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos) << error.what();
  }
  EXPECT_TRUE(Snapshot<Cache>(cache, seqs) == before) << "the failed call changed the cache";
}

TYPED_TEST(CacheTest, BadInputThrowsAndChangesNothing) {
  using C = TypeParam;
  using Layout = typename C::Layout;
  using Cache = KVCache<Layout, typename C::DType>;
  const ModelShape shape{2, 4, 2, 8};
  Cache cache(shape, make_layout<Layout>());
  std::vector<SeqId> seqs;
  std::mt19937 rng(1);
  for (int i = 0; i < 3; ++i) {
    const SeqId seq = cache.open();
    seqs.push_back(seq);
    cache.reserve(seq, 40);
    for (int layer = 0; layer < 2; ++layer) {
      const auto kv = random_values(rng, 40 * 16);
      cache.append(layer, seq, std::span<const float>(kv), std::span<const float>(kv));
    }
  }
  const SeqId released = cache.open();
  cache.release(released);
  const SeqId seq = seqs[0];
  const std::vector<float> one(16, 1.0f), odd(15, 1.0f);

  // unknown sequence: stale handle, never-opened slot
  expect_error(cache, seqs, errc::unknown_sequence, "seq#3.0", [&] { cache.reserve(released, 1); });
  expect_error(cache, seqs, errc::unknown_sequence, "seq#99.0", [&] { cache.release({99, 0}); });
  expect_error(cache, seqs, errc::unknown_sequence, "no such open sequence",
               [&] { cache.append(0, released, std::span<const float>(one), std::span<const float>(one)); });
  // shape mismatch
  expect_error(cache, seqs, errc::shape_mismatch, "k has 15 and v 15",
               [&] { cache.append(0, seq, std::span<const float>(odd), std::span<const float>(odd)); });
  expect_error(cache, seqs, errc::shape_mismatch, "k has 16 and v 15",
               [&] { cache.append(0, seq, std::span<const float>(one), std::span<const float>(odd)); });
  // capacity: append past the reservation, reserve past what the policy holds
  expect_error(cache, seqs, errc::capacity_exceeded, "call reserve(seq, 1) first",
               [&] { cache.append(1, seq, std::span<const float>(one), std::span<const float>(one)); });
  // a batch append checks every sequence before it writes anything
  cache.reserve(seqs[1], 1);
  const std::vector<float> two(32, 1.0f), three(48, 1.0f);
  expect_error(cache, seqs, errc::shape_mismatch, "both must be batch * kv_heads * head_dim = 32", [&] {
    cache.append(0, std::span<const SeqId>(seqs.data(), 2), std::span<const float>(three), std::span<const float>(three));
  });
  const std::vector<SeqId> twice{seqs[1], seqs[2], seqs[1]};
  expect_error(cache, seqs, errc::out_of_range, "seq#1.0 is listed twice", [&] {
    cache.append(0, std::span<const SeqId>(twice), std::span<const float>(three), std::span<const float>(three));
  });
  const std::vector<SeqId> unreserved{seqs[1], seqs[0]};
  expect_error(cache, seqs, errc::capacity_exceeded, "seq#0.0 holds 40 positions and has no more reserved", [&] {
    cache.append(0, std::span<const SeqId>(unreserved), std::span<const float>(two), std::span<const float>(two));
  });
  const std::vector<SeqId> stale{seqs[1], released};
  expect_error(cache, seqs, errc::unknown_sequence, "no such open sequence", [&] {
    cache.append(0, std::span<const SeqId>(stale), std::span<const float>(two), std::span<const float>(two));
  });
  if constexpr (!std::is_same_v<Layout, SlidingWindow>)
    expect_error(cache, seqs, errc::capacity_exceeded, "reserve(seq#0.0, 5000)",
                 [&] { cache.reserve(seq, 5000); });
  if constexpr (std::is_same_v<Layout, Paged<16>>) {
    // 40 blocks, 3 * 3 in use: 31 free = 496 positions; 600 more do not fit.
    EXPECT_FALSE(cache.can_reserve(seq, 600));
    expect_error(cache, seqs, errc::capacity_exceeded, "31 of 40 paged pages are free",
                 [&] { cache.reserve(seq, 600); });
  }
  // out of range
  expect_error(cache, seqs, errc::out_of_range, "layers are [0, 2)", [&] { cache.view(2, seq); });
  expect_error(cache, seqs, errc::out_of_range, "must be in [0, 40]", [&] { cache.truncate(seq, 41); });
  // position overwritten: a window of 20 + 8 slack at length 40 rolls back at most 8
  if constexpr (std::is_same_v<Layout, SlidingWindow>) {
    expect_error(cache, seqs, errc::position_overwritten, "rolls back at most slack_tokens = 8",
                 [&] { cache.truncate(seq, 31); });
    EXPECT_NO_THROW(cache.truncate(seqs[1], 32));
  }
  // capacity: every sequence slot taken
  while (cache.can_open()) seqs.push_back(cache.open());
  expect_error(cache, seqs, errc::capacity_exceeded, "sequence slots are in use", [&] { cache.open(); });
  expect_error(cache, seqs, errc::capacity_exceeded, "sequence slots are in use", [&] { cache.fork(seq); });
  // out of range: fork mid-step
  cache.release(seqs.back());
  seqs.pop_back();
  cache.reserve(seqs[2], 1);
  cache.append(0, seqs[2], std::span<const float>(one), std::span<const float>(one));
  expect_error(cache, seqs, errc::out_of_range, "fork between steps", [&] { cache.fork(seqs[2]); });
}

// A decode step's batch append stores exactly what one append per sequence stores.
TYPED_TEST(CacheTest, BatchAppendEqualsOneAppendPerSequence) {
  using C = TypeParam;
  using Cache = KVCache<typename C::Layout, typename C::DType>;
  const ModelShape shape{2, 4, 2, 8};
  const std::size_t row = 2 * 8;
  Cache batched(shape, make_layout<typename C::Layout>()), single(shape, make_layout<typename C::Layout>());
  std::mt19937 rng(3);
  std::vector<SeqId> seqs;
  for (int i = 0; i < 3; ++i) {
    const SeqId seq = batched.open();
    ASSERT_EQ(single.open(), seq);
    seqs.push_back(seq);
    const int prompt = 3 + 7 * i;  // ragged, straddling block edges as the steps go on
    batched.reserve(seq, prompt);
    single.reserve(seq, prompt);
    for (int layer = 0; layer < 2; ++layer) {
      const auto k = random_values(rng, prompt * row), v = random_values(rng, prompt * row);
      batched.append(layer, seq, k, v);
      single.append(layer, seq, k, v);
    }
  }
  for (int step = 0; step < 25; ++step) {
    for (SeqId seq : seqs) {
      batched.reserve(seq, 1);
      single.reserve(seq, 1);
    }
    for (int layer = 0; layer < 2; ++layer) {
      const auto k = random_values(rng, seqs.size() * row), v = random_values(rng, seqs.size() * row);
      batched.append(layer, std::span<const SeqId>(seqs), k, v);
      for (std::size_t i = 0; i < seqs.size(); ++i)
        single.append(layer, seqs[i], std::span<const float>(k).subspan(i * row, row),
                      std::span<const float>(v).subspan(i * row, row));
    }
  }
  EXPECT_EQ(batched.length(seqs[2]), 17 + 25);
  EXPECT_TRUE(Snapshot<Cache>(batched, seqs) == Snapshot<Cache>(single, seqs));
}

TEST(CacheErrors, InvalidConfigurationNamesTheField) {
  auto expect_invalid = [](auto make, const std::string& fragment) {
    try {
      make();
      ADD_FAILURE() << "accepted: " << fragment;
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), errc::invalid_configuration);
      EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos) << error.what();
    }
  };
  const ModelShape good{2, 8, 4, 8};
  expect_invalid([&] { KVCache<Contiguous, f32>({2, 6, 4, 8}, {1, 8}); },
                 "q_heads = 6 is not a multiple of kv_heads = 4");
  expect_invalid([&] { KVCache<Contiguous, f32>({2, 8, 4, 2000}, {1, 8}); }, "head_dim = 2000");
  expect_invalid([&] { KVCache<Contiguous, f32>({0, 8, 4, 8}, {1, 8}); }, "layers = 0");
  expect_invalid([&] { KVCache<Contiguous, f32>(good, {0, 8}); }, "Contiguous::max_sequences = 0");
  expect_invalid([&] { KVCache<Paged<16>, f16>(good, {.num_blocks = 0}); }, "Paged::num_blocks = 0");
  expect_invalid([&] { KVCache<SlidingWindow, bf16>(good, {.max_sequences = 2, .window = 0}); },
                 "SlidingWindow::window = 0");
  expect_invalid([&] { KVCache<Paged<16>, f32>(good, {.num_blocks = 1 << 28}); },
                 "exceeds 2147483647 positions");
}

TEST(Cache, ForkIsCopyOnWriteForPagedStorage) {
  const ModelShape shape{2, 2, 1, 4};
  KVCache<Paged<4>, f32> cache(shape, {.num_blocks = 8});
  const SeqId parent = cache.open();
  cache.reserve(parent, 6);  // blocks 0, 1
  std::vector<float> kv(6 * 4);
  for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = static_cast<float>(i);
  for (int layer = 0; layer < 2; ++layer)
    cache.append(layer, parent, std::span<const float>(kv), std::span<const float>(kv));
  const int free_before = cache.bookkeeping().pool().free_count();
  const SeqId child = cache.fork(parent);
  EXPECT_EQ(cache.bookkeeping().pool().free_count(), free_before) << "fork copied a block";
  EXPECT_EQ(cache.reserved(parent), 6);

  // The child's first write lands in the shared, partly filled block 1: only it is copied.
  cache.reserve(child, 1);
  EXPECT_EQ(cache.bookkeeping().pool().free_count(), free_before - 1);
  const auto parent_blocks = cache.bookkeeping().tables().blocks(parent.slot);
  const auto child_blocks = cache.bookkeeping().tables().blocks(child.slot);
  EXPECT_EQ(parent_blocks[0], child_blocks[0]);
  EXPECT_NE(parent_blocks[1], child_blocks[1]);
  const std::vector<float> row(4, -1.0f);
  for (int layer = 0; layer < 2; ++layer)
    cache.append(layer, child, std::span<const float>(row), std::span<const float>(row));
  const auto parent_view = cache.view(1, parent);
  const auto child_view = cache.view(1, child);
  EXPECT_EQ(parent_view.length, 6);
  EXPECT_EQ(child_view.length, 7);
  EXPECT_EQ(child_view.segment(1).k[2 * 4], -1.0f);  // position 6 of the child
  EXPECT_EQ(child_view.segment(1).k[1 * 4], 20.0f);  // position 5, copied
  EXPECT_EQ(parent_view.segment(1).k[1 * 4], 20.0f);

  cache.release(parent);
  cache.release(child);
  EXPECT_EQ(cache.bookkeeping().pool().free_count(), 8);
}

TEST(Cache, SlidingWindowRollbackIsExactWithinTheSlack) {
  const ModelShape shape{1, 1, 1, 2};
  KVCache<SlidingWindow, f32> cache(shape, {.max_sequences = 1, .window = 4, .sink_tokens = 1,
                                            .slack_tokens = 2});
  const SeqId seq = cache.open();
  auto append_positions = [&](int from, int to) {
    for (int p = from; p < to; ++p) {
      cache.reserve(seq, 1);
      const std::vector<float> kv{static_cast<float>(p), static_cast<float>(-p)};
      cache.append(0, seq, std::span<const float>(kv), std::span<const float>(kv));
    }
  };
  auto held_positions = [&] {
    std::vector<int> held;
    const auto view = cache.view(0, seq);
    for (int i = 0; i < view.segment_count(); ++i) {
      const auto segment = view.segment(i);
      for (int r = 0; r < segment.count; ++r) {
        EXPECT_EQ(segment.k[r * 2], static_cast<float>(segment.first_position + r));
        held.push_back(segment.first_position + r);
      }
    }
    std::sort(held.begin(), held.end());
    return held;
  };
  append_positions(0, 12);  // ring of 6 holds 6..11, sink 0
  EXPECT_EQ(held_positions(), (std::vector<int>{0, 6, 7, 8, 9, 10, 11}));
  cache.truncate(seq, 10);  // attention at 10 needs 6..9: held
  EXPECT_EQ(held_positions(), (std::vector<int>{0, 6, 7, 8, 9}));
  EXPECT_THROW(cache.truncate(seq, 9), Error);  // would need 5, overwritten at length 12
  append_positions(10, 14);
  EXPECT_EQ(held_positions(), (std::vector<int>{0, 8, 9, 10, 11, 12, 13}));
  // Back to the sinks alone: attention there needs no ring position, and the ring refills.
  cache.truncate(seq, 1);
  EXPECT_EQ(held_positions(), (std::vector<int>{0}));
  append_positions(1, 5);
  EXPECT_EQ(held_positions(), (std::vector<int>{0, 1, 2, 3, 4}));
}

}  // namespace
}  // namespace kvcache::testing
