// Device pieces shared by the CUDA attention kernels: finding a position's K/V row (and, for
// quantized types, its scales) in any policy's view, 16-byte row loads converted to fp32, the
// launch-parameter batch of views, and the growing device workspace for queries and split-K
// partial results.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../../backend/cuda.hpp"
#include "../../backend/cuda/launch.cuh"
#include "../../dtype/float.hpp"
#include "../../dtype/fp8.hpp"
#include "../../dtype/int8.hpp"
#include "../../view.hpp"
#include "../params.hpp"

// The head sizes whose CUDA attention kernels are compiled: a subset of 64, 128 and 256, as
// KVCACHE_FAST_HEAD_DIMS is for the CPU's kernels (each list applies to its own backend only).
// Define it alike in every translation unit of a program.
#ifndef KVCACHE_CUDA_HEAD_DIMS
#define KVCACHE_CUDA_HEAD_DIMS 64, 128, 256
#endif

KVCACHE_BEGIN_NAMESPACE

namespace attention::cuda::detail {

using backend::cuda_detail::launch;

inline constexpr int block_threads = 128;  // every kernel here: four warps
inline constexpr int block_warps = block_threads / 32;
inline constexpr float log2e = 1.4426950408889634f;  // softmax runs in base 2: exp2f is one instruction

// Views travel in the kernel's parameters (up to 32 KiB on Volta and later), so a launch copies
// nothing to the device first.
inline constexpr int views_per_launch = 64;
template <class Storage>
struct ViewBatch {
  SequenceView<Storage> views[views_per_launch];
};
static_assert(sizeof(ViewBatch<float>) < 30000, "kernel parameters are limited to 32 KiB");

// Element types stored as one byte codes with a float scale per row.
template <class Storage>
inline constexpr bool is_code = sizeof(Storage) == 1;

template <class Storage>
struct RowPair {
  const Storage* k;
  const Storage* v;
  float k_scale;  // quantized rows: the row's scales; 1 otherwise
  float v_scale;
};

// The K and V rows of kv_head at `position`. @pre the view holds position.
template <class Storage>
__device__ __forceinline__ RowPair<Storage> locate_row(const SequenceView<Storage>& view, int kv_head, int position) {
  const std::size_t head_dim = static_cast<std::size_t>(view.head_dim);
  for (int i = 0; i < view.direct_count; ++i) {
    const Segment<Storage>& segment = view.direct[i];
    const int row = position - segment.first_position;
    if (row >= 0 && row < segment.count) {
      const std::size_t offset = kv_head * segment.head_stride + row * head_dim;
      if constexpr (is_code<Storage>)
        return {segment.k + offset, segment.v + offset, __ldg(segment.k_scale + offset / head_dim),
                __ldg(segment.v_scale + offset / head_dim)};
      else
        return {segment.k + offset, segment.v + offset, 1.0f, 1.0f};
    }
  }
  const int block = position / view.block_tokens;
  const int row = position - block * view.block_tokens;
  const std::size_t offset =
      ((static_cast<std::size_t>(kv_head) * view.pool_pages + view.block_ids[block]) * view.block_tokens + row) *
      head_dim;
  if constexpr (is_code<Storage>)
    return {view.k_pool + offset, view.v_pool + offset, __ldg(view.k_scale_pool + offset / head_dim),
            __ldg(view.v_scale_pool + offset / head_dim)};
  else
    return {view.k_pool + offset, view.v_pool + offset, 1.0f, 1.0f};
}

// Loads N elements (a multiple of 16 bytes, 16-byte aligned) and converts them to fp32.
template <int N, class Storage>
__device__ __forceinline__ void load_floats(const Storage* source, float* out) {
  static_assert(N * sizeof(Storage) % 16 == 0, "whole 16-byte loads");
  const uint4* raw = reinterpret_cast<const uint4*>(source);
#pragma unroll
  for (int i = 0; i < static_cast<int>(N * sizeof(Storage) / 16); ++i) {
    const uint4 bits = __ldg(raw + i);
    const unsigned words[4] = {bits.x, bits.y, bits.z, bits.w};
    if constexpr (std::is_same_v<Storage, fp8_e4m3_code> || std::is_same_v<Storage, fp8_e5m2_code>) {
      // Two codes at a time through the hardware conversion to half, which is exact for both
      // formats (every fp8 value is a half), so the result equals fp8_codec::decode.
      constexpr __nv_fp8_interpretation_t format = std::is_same_v<Storage, fp8_e4m3_code> ? __NV_E4M3 : __NV_E5M2;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const auto pair = static_cast<__nv_fp8x2_storage_t>(words[j / 2] >> (16 * (j % 2)));
        const __half2_raw converted = __nv_cvt_fp8x2_to_halfraw2(pair, format);
        __half2 halves;
        memcpy(static_cast<void*>(&halves), &converted, 4);
        const float2 values = __half22float2(halves);
        out[16 * i + 2 * j] = values.x;
        out[16 * i + 2 * j + 1] = values.y;
      }
    } else if constexpr (is_code<Storage>) {  // int8 codes; the row's scale is applied later
#pragma unroll
      for (int j = 0; j < 16; ++j)
        out[16 * i + j] = static_cast<float>(static_cast<signed char>(words[j / 4] >> (8 * (j % 4))));
    } else if constexpr (std::is_same_v<Storage, float>) {
      out[4 * i + 0] = __uint_as_float(bits.x);
      out[4 * i + 1] = __uint_as_float(bits.y);
      out[4 * i + 2] = __uint_as_float(bits.z);
      out[4 * i + 3] = __uint_as_float(bits.w);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float2 pair;
        if constexpr (std::is_same_v<Storage, Eigen::half>) {
          __half2 halves;
          memcpy(static_cast<void*>(&halves), &words[j], 4);
          pair = __half22float2(halves);
        } else {
          static_assert(std::is_same_v<Storage, Eigen::bfloat16>, "f32, f16 or bf16 rows");
          __nv_bfloat162 halves;
          memcpy(static_cast<void*>(&halves), &words[j], 4);
          pair = __bfloat1622float2(halves);
        }
        out[8 * i + 2 * j] = pair.x;
        out[8 * i + 2 * j + 1] = pair.y;
      }
    }
  }
}

// Natural-log logit -> base-2 logit, with the optional soft cap applied first.
__device__ __forceinline__ float to_log2_logit(float logit, float soft_cap) {
  if (soft_cap > 0.0f) logit = soft_cap * tanhf(logit / soft_cap);
  return logit * log2e;
}

// Every query row, scaled by `scale`, as fp32: [rows][head_dim] with rows = count / head_dim.
template <class Q>
__global__ void prepare_queries(const Q* q, float scale, std::size_t count, float* scaled) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    scaled[i] = scale * to_float(q[i]);
}

template <class Q>
void launch_prepare_queries(const Q* q, float scale, std::size_t count, float* scaled, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((count + block_threads - 1) / block_threads);
  launch(prepare_queries<Q>, dim3(blocks < 1024u ? blocks : 1024u), dim3(block_threads), 0, stream,
         "attention query kernel launch", q, scale, count, scaled);
}

// Device scratch that only grows (cudaFree synchronizes, so a kernel still reading the old
// buffer finishes first). One per host thread, like the CPU kernels' scratch.
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    if (data_ != nullptr) cudaFree(data_);
  }

  float* floats(std::size_t count) {
    const std::size_t bytes = count * sizeof(float);
    if (bytes > bytes_) {
      if (data_ != nullptr) cudaFree(data_);
      data_ = nullptr;
      bytes_ = 0;
      void* memory = nullptr;
      backend::cuda::check(cudaMalloc(&memory, bytes), "cudaMalloc (attention workspace)");
      data_ = static_cast<float*>(memory);
      bytes_ = bytes;
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  std::size_t bytes_ = 0;
};

inline Workspace& workspace() {
  thread_local Workspace instance;
  return instance;
}

// attention::dispatch_head_dim for the CUDA kernels (KVCACHE_CUDA_HEAD_DIMS): any other
// head_dim throws.
#define KVCACHE_CUDA_TEXT_OF(...) #__VA_ARGS__
#define KVCACHE_CUDA_TEXT(...) KVCACHE_CUDA_TEXT_OF(__VA_ARGS__)
template <class F>
void dispatch_head_dim(int head_dim, F&& f) {
  attention::detail::dispatch_head_dim_in<KVCACHE_CUDA_HEAD_DIMS>(head_dim, [&](auto head_dim_constant) {
    if constexpr (decltype(head_dim_constant)::value == 0)
      kvcache::detail::fail(errc::invalid_configuration, "head_dim = ", head_dim,
                            ": the CUDA attention kernels are built for head_dim " KVCACHE_CUDA_TEXT(KVCACHE_CUDA_HEAD_DIMS)
                            " (KVCACHE_CUDA_HEAD_DIMS)");
    else
      f(head_dim_constant);
  });
}
#undef KVCACHE_CUDA_TEXT
#undef KVCACHE_CUDA_TEXT_OF

}  // namespace attention::cuda::detail

KVCACHE_END_NAMESPACE
