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

template <class F>
double median_seconds(int runs, F&& f) {
  std::vector<double> seconds;
  for (int i = 0; i < runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    f();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

// 1 GiB of floats, read in `threads` slices.
inline double measure_read(int threads) {
  static std::vector<float> buffer(std::size_t{1} << 28, 1.0f);
  std::vector<float> sums(static_cast<std::size_t>(threads));
  auto read = [&](int t) {
    const std::size_t slice = buffer.size() / static_cast<std::size_t>(threads);
    sums[static_cast<std::size_t>(t)] =
        Eigen::Map<const Eigen::ArrayXf>(buffer.data() + slice * t, static_cast<Eigen::Index>(slice)).sum();
  };
  const double seconds = median_seconds(7, [&] { backend::cpu::pool().run(threads, read); });
  return static_cast<double>(buffer.size() * sizeof(float)) / seconds;
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
  const double seconds = median_seconds(5, [&] { backend::cpu::pool().run(threads, run); });
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
