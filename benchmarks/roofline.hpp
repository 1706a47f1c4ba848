// The two ceilings of this machine, measured in the same process as the kernels they judge:
// how fast `threads` threads read memory far larger than any cache, and how many fp32 FMAs
// per second they issue. A kernel's roofline time is max(bytes / read rate, flops / FMA rate).
#pragma once

#include <kvcache/backend/cpu.hpp>
#include <kvcache/detail/simd.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <map>
#include <vector>

namespace kvcache::bench {

struct Roofline {
  double read_bytes_per_second = 0;
  double flops_per_second = 0;

  double seconds(double bytes, double flops) const {
    return std::max(bytes / read_bytes_per_second, flops / flops_per_second);
  }
};

namespace detail {

// The best of `runs` timings: a ceiling is what the machine can do, not what it usually does.
template <class F>
double best_seconds(int runs, F&& f) {
  double best = 1e30;
  for (int i = 0; i < runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

// 1 GiB of floats in `threads` slices, read as one stream per thread and as two streams taking
// turns of 8 KiB (as decode reads a kv-head's K and V rows); the faster pattern is the ceiling.
inline double measure_read(int threads) {
  static std::vector<float> buffer(std::size_t{1} << 28, 1.0f);
  std::vector<float> sums(static_cast<std::size_t>(threads));
  double best = 0.0;
  for (std::size_t turn : {std::size_t{0}, std::size_t{2048}}) {  // floats per turn; 0: one stream
    auto read = [&](int t) {
      const std::size_t slice = buffer.size() / static_cast<std::size_t>(threads);
      const float* start = buffer.data() + slice * static_cast<std::size_t>(t);
      if (turn == 0) {
        sums[static_cast<std::size_t>(t)] = Eigen::Map<const Eigen::ArrayXf>(start, static_cast<Eigen::Index>(slice)).sum();
        return;
      }
      const float* second = start + slice / 2;
      float total = 0.0f;
      for (std::size_t at = 0; at + turn <= slice / 2; at += turn)
        total += Eigen::Map<const Eigen::ArrayXf>(start + at, static_cast<Eigen::Index>(turn)).sum() +
                 Eigen::Map<const Eigen::ArrayXf>(second + at, static_cast<Eigen::Index>(turn)).sum();
      sums[static_cast<std::size_t>(t)] = total;
    };
    const double seconds = best_seconds(5, [&] { backend::cpu::pool().run(threads, read); });
    best = std::max(best, static_cast<double>(buffer.size() * sizeof(float)) / seconds);
  }
  return best;
}

// Independent FMA chains, enough to cover the FMA latency, on every thread.
inline double measure_fma(int threads) {
  namespace simd = kvcache::detail::simd;
  constexpr int chains = 12;
  constexpr long iterations = 20'000'000;
  constexpr int width = simd::width > 0 ? simd::width : 1;
  std::vector<float> sink(static_cast<std::size_t>(threads));
  auto run = [&](int t) {
    if constexpr (simd::width > 0) {
      simd::floats acc[chains];
      for (int c = 0; c < chains; ++c) acc[c] = simd::broadcast(static_cast<float>(c));
      const simd::floats a = simd::broadcast(0.999999f), b = simd::broadcast(1e-7f);
      for (long i = 0; i < iterations; ++i)
        for (int c = 0; c < chains; ++c) acc[c] = simd::fma(acc[c], a, b);
      simd::floats total = acc[0];
      for (int c = 1; c < chains; ++c) total = simd::add(total, acc[c]);
      sink[static_cast<std::size_t>(t)] = simd::sum(total);
    } else {
      float acc[chains] = {};
      for (long i = 0; i < iterations; ++i)
        for (int c = 0; c < chains; ++c) acc[c] = acc[c] * 0.999999f + 1e-7f;
      sink[static_cast<std::size_t>(t)] = acc[0];
    }
  };
  const double seconds = best_seconds(5, [&] { backend::cpu::pool().run(threads, run); });
  return 2.0 * chains * width * static_cast<double>(iterations) * threads / seconds;
}

}  // namespace detail

// Measured once per thread count, on first use. Sets the backend to `threads` threads.
inline const Roofline& roofline(int threads) {
  static std::map<int, Roofline> measured;
  if (backend::cpu::threads() != threads) backend::cpu::set_threads(threads);
  auto found = measured.find(threads);
  if (found == measured.end())
    found = measured.emplace(threads, Roofline{detail::measure_read(threads), detail::measure_fma(threads)}).first;
  return found->second;
}

}  // namespace kvcache::bench
