// Runs kvcache's CUDA kernels on the CPU, so that a machine without a GPU still tests their
// logic (indexing, masks, split merging, block tables) against the CPU backend. Include it
// before any kvcache header in a file a host compiler builds.
//
// A launch runs its thread blocks one after another. The threads of a block are fibers that
// switch only at __syncthreads and warp shuffles, which wait for every unfinished thread of the
// block or warp, as on the device. A fiber starts on its own stack through ucontext, once, and
// then switches with _setjmp/_longjmp, which unlike swapcontext make no system call
// (swapcontext saves the signal mask, two syscalls a switch, and the switches were 85% of the
// run time); it serves its thread index in every block of every launch that has one.
// __shared__ variables become statics, which the fibers of the running block share. "Device
// memory" is host memory: the CUDA runtime calls the library makes are defined below (this
// file stands in for libcudart, so include it in exactly one translation unit of a program).
//
// Loads through __ldg fault when misaligned, as on the device. What it cannot find: data races
// between threads, misaligned stores, bank conflicts, anything about speed; compute-sanitizer
// and the benchmark on a GPU cover those.
#pragma once

// Fortified longjmp refuses to jump to another stack, which is what switching fibers does.
#undef _FORTIFY_SOURCE

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define KVCACHE_CUDA_KERNELS 1
#define KVCACHE_CUDA_EMULATOR 1

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace kvcache_emulator {

struct Barrier {
  int arrived = 0;
  int live = 0;  // threads of the group that have not finished
  unsigned generation = 0;
};

struct Thread {
  ucontext_t start{};     // made once; setcontext enters it the first time the fiber runs
  jmp_buf resume{};       // where the fiber continues: at its last switch, or at its next block
  bool entered = false;   // the fiber runs (setcontext, which makes a system call, only once)
  std::unique_ptr<char[]> stack;
  uint3 index{};
  bool done = false;
  unsigned shuffles = 0;  // parity picks the exchange buffer
};

struct Block {
  dim3 grid{}, size{};
  uint3 index{};
  std::deque<Thread> threads;  // growing never moves a thread: its start context points into itself
  int current = 0;
  jmp_buf scheduler{};
  std::function<void()> body;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<unsigned long long> exchange[2];  // [threads] one shuffle value per lane, double-buffered
  std::vector<unsigned char> dynamic_shared;
};

inline Block& block() {
  static Block instance;
  return instance;
}

inline void yield() {
  Block& b = block();
  if (_setjmp(b.threads[static_cast<std::size_t>(b.current)].resume) == 0) _longjmp(b.scheduler, 1);
}

// Waits until every unfinished thread of the barrier's group has arrived.
inline void wait(Barrier& barrier) {
  const unsigned generation = barrier.generation;
  ++barrier.arrived;
  while (barrier.generation == generation) {
    if (barrier.arrived >= barrier.live) {
      barrier.arrived = 0;
      ++barrier.generation;
      break;
    }
    yield();
  }
}

inline void syncthreads() { wait(block().block_barrier); }

template <class T>
T shuffle(T value, int source_lane) {
  static_assert(sizeof(T) <= sizeof(unsigned long long) && std::is_trivially_copyable_v<T>);
  // One barrier per shuffle: a lane can only overwrite this buffer two shuffles later, after
  // every lane has passed the next shuffle's barrier, so after every lane read this one.
  Block& b = block();
  const int thread = b.current, warp = thread / 32;
  std::vector<unsigned long long>& exchange = b.exchange[b.threads[static_cast<std::size_t>(thread)].shuffles++ % 2];
  unsigned long long bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  exchange[static_cast<std::size_t>(thread)] = bits;
  wait(b.warp_barriers[static_cast<std::size_t>(warp)]);
  bits = exchange[static_cast<std::size_t>(warp * 32 + (source_lane & 31))];
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

// A fiber's whole life: the body of one block's thread after another. Between blocks it waits
// here, and the next block's first switch to it resumes it; it never returns (a fiber of a
// thread index that a later launch does not use is dropped with its stack).
inline void thread_entry() {
  for (;;) {
    Block& b = block();
    b.body();
    b.threads[static_cast<std::size_t>(b.current)].done = true;
    --b.block_barrier.live;
    --b.warp_barriers[static_cast<std::size_t>(b.current / 32)].live;
    yield();
  }
}

// Runs the block's current thread until it next yields or finishes. Out of line, so that the
// scheduler's loop counters are not locals of the function that calls _setjmp.
[[gnu::noinline]] inline void run_to_next_switch(Block& b, Thread& thread) {
  if (_setjmp(b.scheduler) != 0) return;  // the thread jumped back
  if (thread.entered) _longjmp(thread.resume, 1);
  thread.entered = true;
  setcontext(&thread.start);
}

// Gives the thread its stack and its start context. Out of line: getcontext returns twice, and
// the caller's locals would then be at risk.
[[gnu::noinline]] inline void make_fiber(Thread& thread) {
  constexpr std::size_t stack_bytes = 256 * 1024;
  thread.stack = std::make_unique<char[]>(stack_bytes);
  getcontext(&thread.start);
  thread.start.uc_stack.ss_sp = thread.stack.get();
  thread.start.uc_stack.ss_size = stack_bytes;
  thread.start.uc_link = nullptr;
  makecontext(&thread.start, thread_entry, 0);
}

// Runs body() as every thread of one block, round robin between switch points.
inline void run_block(const std::function<void()>& body) {
  Block& b = block();
  const int count = static_cast<int>(b.size.x * b.size.y * b.size.z);
  b.body = body;
  b.threads.resize(static_cast<std::size_t>(count));
  b.warp_barriers.assign(static_cast<std::size_t>((count + 31) / 32), Barrier{});
  for (int w = 0; w < static_cast<int>(b.warp_barriers.size()); ++w)
    b.warp_barriers[static_cast<std::size_t>(w)].live = std::min(32, count - 32 * w);
  b.block_barrier = {.live = count};
  for (auto& exchange : b.exchange) exchange.assign(static_cast<std::size_t>(count), 0);
  for (int t = 0; t < count; ++t) {
    Thread& thread = b.threads[static_cast<std::size_t>(t)];
    if (!thread.stack) make_fiber(thread);
    thread.done = false;
    thread.shuffles = 0;
    thread.index = {static_cast<unsigned>(t) % b.size.x, static_cast<unsigned>(t) / b.size.x % b.size.y,
                    static_cast<unsigned>(t) / (b.size.x * b.size.y)};
  }
  for (bool running = true; running;) {
    running = false;
    for (int t = 0; t < count; ++t) {
      Thread& thread = b.threads[static_cast<std::size_t>(t)];
      if (thread.done) continue;
      running = true;
      b.current = t;
      run_to_next_switch(b, thread);
    }
  }
}

}  // namespace kvcache_emulator

// ---- the device side the kernels use ----
#define threadIdx (::kvcache_emulator::block().threads[static_cast<std::size_t>(::kvcache_emulator::block().current)].index)
#define blockIdx (::kvcache_emulator::block().index)
#define blockDim (::kvcache_emulator::block().size)
#define gridDim (::kvcache_emulator::block().grid)

inline void __syncthreads() { kvcache_emulator::syncthreads(); }
template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  const int lane = kvcache_emulator::block().current % 32;
  return kvcache_emulator::shuffle(value, lane ^ lane_mask);
}
template <class T>
T __shfl_sync(unsigned, T value, int source_lane) {
  return kvcache_emulator::shuffle(value, source_lane);
}
// Loads as the device does them, which faults on an address not aligned to the load's size.
template <class T>
T __ldg(const T* address) {
  if (reinterpret_cast<std::uintptr_t>(address) % sizeof(T) != 0) {
    std::fprintf(stderr, "emulated CUDA: misaligned %zu-byte load at %p\n", sizeof(T), static_cast<const void*>(address));
    std::abort();
  }
  return *address;
}
inline float __uint_as_float(unsigned bits) { return std::bit_cast<float>(bits); }
using std::max;
using std::min;

inline unsigned char* kvcache_emulated_shared_memory() { return kvcache_emulator::block().dynamic_shared.data(); }

// A launch: the arguments are copied as the kernel's parameters, then every block runs.
template <class... Params, class... Args>
void kvcache_emulated_launch(void (*kernel)(Params...), dim3 grid, dim3 size, std::size_t shared_bytes, cudaStream_t,
                             Args&&... args) {
  auto parameters = std::make_unique<std::tuple<std::decay_t<Params>...>>(std::forward<Args>(args)...);
  kvcache_emulator::Block& b = kvcache_emulator::block();
  b.grid = grid;
  b.size = size;
  b.dynamic_shared.assign(shared_bytes, 0);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.index = {x, y, z};
        kvcache_emulator::run_block([&] { std::apply(kernel, *parameters); });
      }
}

// ---- the CUDA runtime calls kvcache and its tests make, on host memory ----
cudaError_t cudaMalloc(void** pointer, size_t bytes) {
  *pointer = std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
  return *pointer == nullptr ? cudaErrorMemoryAllocation : cudaSuccess;
}
cudaError_t cudaFree(void* pointer) {
  std::free(pointer);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* pointer, int value, size_t bytes) {
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* to, const void* from, size_t bytes, cudaMemcpyKind) {
  std::memmove(to, from, bytes);
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA runtime error"; }
const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
