// backend::cuda::store_rows: the append kernel. One thread block per (new token, kv-head)
// converts that row of K (minus the cache's key offset, if any) and of V to the cache's element
// type and writes it to its page row; a quantized row is scaled and encoded by one thread, with
// the CPU's own row quantizer, after a thread per candidate scale has weighed its rounding error
// (dtype/scale_search.hpp, the same sums in the same order as the CPU's), so both backends store
// the same codes and scales.
// The page rows travel in the launch's parameters, so an append copies nothing to the device
// first; included by backend/cuda.hpp when nvcc compiles.
#pragma once

#include <algorithm>
#include <cstddef>

#include "../../dtype/concept.hpp"
#include "../../dtype/float.hpp"
#include "../../dtype/scale_search.hpp"
#include "../../shape.hpp"
#include "launch.cuh"

KVCACHE_BEGIN_NAMESPACE

namespace backend::cuda_detail {

inline constexpr int rows_per_launch = 1024;  // 8 KiB of kernel parameters

struct RowBatch {
  PageRow rows[rows_per_launch];
};

template <class DType, class In>
__global__ void store_rows_kernel(RowTarget<typename DType::storage_type> target, const In* k, const In* v,
                                  const RowBatch batch) {
  const int token = static_cast<int>(blockIdx.x), head = static_cast<int>(blockIdx.y);
  const PageRow at = batch.rows[token];
  const std::size_t head_dim = static_cast<std::size_t>(target.head_dim);
  const std::size_t stored =
      ((static_cast<std::size_t>(head) * target.page_count + at.page) * target.page_tokens + at.row) * head_dim;
  const std::size_t source = (static_cast<std::size_t>(token) * target.kv_heads + head) * head_dim;
  const float* key_offset = target.k_offset ? target.k_offset + static_cast<std::size_t>(head) * head_dim : nullptr;
  if constexpr (QuantizedElement<DType>) {
    __shared__ float row[ModelShape::max_head_dim];
    const std::span<const float> values(row, head_dim);
    for (int kind = 0; kind < 2; ++kind) {
      const In* input = (kind == 0 ? k : v) + source;
      const float* offset = kind == 0 ? key_offset : nullptr;
      for (std::size_t d = threadIdx.x; d < head_dim; d += blockDim.x)
        row[d] = to_float(input[d]) - (offset ? offset[d] : 0.0f);
      __syncthreads();
      float scale = 0.0f;  // thread 0's
      if constexpr (ScaleSearchingElement<DType>) {
        static_assert(DType::scale_candidates <= 32, "a candidate per thread of the block's first warp");
        __shared__ float errors[DType::scale_candidates];
        __shared__ float absmax_found;
        __shared__ bool search_found;
        if (threadIdx.x == 0) {  // once for the block, not once per thread: each reads the whole row
          absmax_found = detail::finite_absmax(values);
          search_found = detail::searches_scale<DType>(values, absmax_found);
        }
        __syncthreads();
        const float absmax = absmax_found;
        const bool search = search_found;
        if (search && threadIdx.x < DType::scale_candidates)
          errors[threadIdx.x] = detail::candidate_error<DType>(values, 1.0f / absmax, static_cast<int>(threadIdx.x));
        __syncthreads();
        if (threadIdx.x == 0) scale = DType::candidate_scale(absmax, search ? detail::least(errors) : 0);
      } else if (threadIdx.x == 0) {
        scale = DType::row_scale(values);
      }
      if (threadIdx.x == 0) {
        DType::quantize_row(values, scale, (kind == 0 ? target.k_pool : target.v_pool) + stored);
        (kind == 0 ? target.k_scale_pool : target.v_scale_pool)[stored / head_dim] = scale;
      }
      __syncthreads();  // before the next kind overwrites the row
    }
  } else {
    for (std::size_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
      target.k_pool[stored + d] = DType::from_float(to_float(k[source + d]) - (key_offset ? key_offset[d] : 0.0f));
      target.v_pool[stored + d] = DType::from_float(to_float(v[source + d]));
    }
  }
}

}  // namespace backend::cuda_detail

template <class DType, class In>
void backend::cuda::store_rows(const RowTarget<typename DType::storage_type>& target, const In* k, const In* v,
                               std::span<const PageRow> rows, cudaStream_t stream) {
  using namespace cuda_detail;
  const std::size_t row = static_cast<std::size_t>(target.kv_heads) * target.head_dim;
  const int threads = std::min(128, (target.head_dim + 31) / 32 * 32);
  for (std::size_t first = 0; first < rows.size(); first += rows_per_launch) {
    const int count = static_cast<int>(std::min<std::size_t>(rows_per_launch, rows.size() - first));
    RowBatch batch;
    std::copy_n(rows.begin() + static_cast<std::ptrdiff_t>(first), count, batch.rows);
    launch(store_rows_kernel<DType, In>, dim3(static_cast<unsigned>(count), static_cast<unsigned>(target.kv_heads)),
           dim3(static_cast<unsigned>(threads)), 0, stream, "append kernel launch", target, k + first * row,
           v + first * row, batch);
  }
}

KVCACHE_END_NAMESPACE
