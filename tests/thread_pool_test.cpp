// The CPU backend's thread pool: every task runs exactly once, on any number of threads, and
// run() returns only when all are done.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <kvcache/detail/thread_pool.hpp>
#include <thread>
#include <vector>

namespace kvcache {
namespace {

using detail::ThreadPool;

TEST(ThreadPool, RunsEveryTaskOnceOnAnyNumberOfThreads) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    for (int tasks : {0, 1, 2, 3, 7, 64, 1000}) {
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(tasks));
      auto task = [&](int t) { runs[static_cast<std::size_t>(t)].fetch_add(1, std::memory_order_relaxed); };
      pool.run(tasks, task);
      for (int t = 0; t < tasks; ++t)
        ASSERT_EQ(runs[static_cast<std::size_t>(t)].load(), 1) << "task " << t << " of " << tasks << ", " << threads << " threads";
    }
  }
}

TEST(ThreadPool, SharesTasksBetweenThreadsAndWaitsForAll) {
  ThreadPool pool(2);
  constexpr int tasks = 256;
  const std::thread::id caller = std::this_thread::get_id();
  std::vector<std::thread::id> ran_on(tasks);
  std::atomic<bool> started[2] = {false, false};  // [0]: a task on the caller, [1]: on the worker
  std::atomic<int> done{0};
  auto task = [&](int t) {
    // Each thread waits (10 s at most) until the other has started a task, so both take some
    // however the threads are scheduled.
    const int own = std::this_thread::get_id() == caller ? 0 : 1;
    started[own].store(true);
    const auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!started[1 - own].load() && std::chrono::steady_clock::now() < limit) std::this_thread::yield();
    ran_on[static_cast<std::size_t>(t)] = std::this_thread::get_id();
    done.fetch_add(1, std::memory_order_relaxed);
  };
  pool.run(tasks, task);
  EXPECT_EQ(done.load(), tasks) << "run() returned before every task was done";
  int on_caller = 0;
  for (const std::thread::id id : ran_on) on_caller += id == caller;
  EXPECT_GT(on_caller, 0) << "the calling thread took no task";
  EXPECT_LT(on_caller, tasks) << "the worker took no task";
}

}  // namespace
}  // namespace kvcache
