// backend::cuda: the bytes of a cache in device memory from cudaMalloc (never managed memory);
// the bookkeeping (slots, block tables, prefix index) stays on the host, and the block tables
// kernels read are mirrored to the device when they change (storage/device_block_tables.hpp).
//
// Any translation unit may hold a KVCache<..., backend::cuda> (this header needs only the CUDA
// runtime). Calls that launch kernels (append, attention::decode and prefill) must be compiled
// by nvcc; they take a cudaStream_t, default the legacy default stream.
//
// Bookkeeping copies (fork of a contiguous or window sequence, copy-on-write of a paged block,
// block-table uploads) are synchronous and run on the legacy default stream, so they are ordered
// after the kernels of every blocking stream. Streams created with cudaStreamNonBlocking are not
// ordered with them: synchronize such a stream before a call that changes the bookkeeping.
//
// A failed CUDA call throws Error{backend_error}. Most CUDA errors are sticky (the context is
// lost), so unlike the other errors it does not promise an unchanged cache: treat it as fatal.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <new>
#include <span>

#include "../error.hpp"
#include "../storage/concept.hpp"
#include "concept.hpp"

KVCACHE_BEGIN_NAMESPACE

namespace backend {

struct cuda {
  static constexpr const char* name = "cuda";
  static constexpr bool host_accessible = false;
  using stream_type = cudaStream_t;

  static void* allocate(std::size_t bytes) {
    void* memory = nullptr;
    const cudaError_t status = cudaMalloc(&memory, bytes == 0 ? 256 : bytes);
    if (status == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();  // not sticky: clear it so later calls do not report it
      throw std::bad_alloc();
    }
    check(status, "cudaMalloc");
    const cudaError_t zeroed = cudaMemset(memory, 0, bytes);
    if (zeroed != cudaSuccess) {
      cudaFree(memory);
      check(zeroed, "cudaMemset");
    }
    return memory;
  }
  static void deallocate(void* memory, std::size_t) noexcept { cudaFree(memory); }
  static void copy(void* dst, const void* src, std::size_t bytes) {
    check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy (device to device)");
  }
  static void fill_zero(void* dst, std::size_t bytes) { check(cudaMemset(dst, 0, bytes), "cudaMemset"); }
  static void upload(void* dst, const void* src, std::size_t bytes) {
    check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy (host to device)");
  }

  // Throws Error{backend_error} naming the call and the runtime's reason.
  static void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess)
      detail::fail(errc::backend_error, what, " failed: ", cudaGetErrorName(status), " (",
                   cudaGetErrorString(status), ")");
  }

  // Writes rows.size() appended tokens: token i's kv-heads go to page rows[i].page, row
  // rows[i].row of the K and V pools ([kv_head][page][page_tokens][head_dim]), converted from
  // In (float, Eigen::half, Eigen::bfloat16 in device memory, [tokens][kv_heads][head_dim]) to
  // DType. Launches a kernel, so only translation units compiled by nvcc may call it.
  template <class DType, class In>
  static void store_rows(const RowTarget<typename DType::storage_type>& target, const In* k, const In* v,
                         std::span<const PageRow> rows, cudaStream_t stream);
};

static_assert(Backend<cuda>);

}  // namespace backend

KVCACHE_END_NAMESPACE

#if KVCACHE_CUDA_KERNELS
#include "cuda/store_rows.cuh"
#else
template <class DType, class In>
void kvcache::backend::cuda::store_rows(const RowTarget<typename DType::storage_type>&, const In*, const In*,
                                        std::span<const PageRow>, cudaStream_t) {
  static_assert(sizeof(In) == 0, "KVCache::append on backend::cuda launches a kernel: compile this file with nvcc");
}
#endif
