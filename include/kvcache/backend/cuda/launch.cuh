// The one place kvcache launches a CUDA kernel and reaches dynamic shared memory, so that a
// host compiler can run the same kernels on the CPU (tests/cuda/emulator.hpp provides
// kvcache_emulated_launch and kvcache_emulated_shared_memory there).
#pragma once

#include <cstddef>
#include <utility>

KVCACHE_BEGIN_NAMESPACE

namespace backend::cuda_detail {

// Queues kernel<<<grid, block, shared_bytes, stream>>>(args...); a failed launch throws
// Error{backend_error} naming `what`.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t stream,
            const char* what, Args&&... args) {
#if defined(__CUDACC__)
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#else
  kvcache_emulated_launch(kernel, grid, block, shared_bytes, stream, std::forward<Args>(args)...);
#endif
  cuda::check(cudaGetLastError(), what);
}

// The block's dynamic shared memory (the launch's shared_bytes), 16-byte aligned.
#if defined(__CUDACC__)
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char memory[];
  return memory;
}
#else
inline unsigned char* dynamic_shared_memory() { return kvcache_emulated_shared_memory(); }
#endif

}  // namespace backend::cuda_detail

KVCACHE_END_NAMESPACE
