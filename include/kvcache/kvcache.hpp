// kvcache: a header-only KV cache for LLM inference engines. Include this header.
#pragma once

#include "config.hpp"
#include "error.hpp"
#include "sequence.hpp"
#include "shape.hpp"
#include "stats.hpp"
#include "view.hpp"

#include "dtype/concept.hpp"
#include "dtype/float.hpp"
#include "dtype/fp8.hpp"
#include "dtype/hadamard.hpp"
#include "dtype/int8.hpp"
#include "dtype/residual.hpp"
#include "dtype/round_trip.hpp"
#include "dtype/scale_search.hpp"

#include "prefix/block_hash.hpp"
#include "prefix/eviction.hpp"
#include "prefix/events.hpp"
#include "prefix/prefix_index.hpp"

#include "storage/block_pool.hpp"
#include "storage/block_table.hpp"
#include "storage/concept.hpp"
#include "storage/contiguous.hpp"
#include "storage/paged.hpp"
#include "storage/sliding_window.hpp"

#include "backend/concept.hpp"
#include "backend/cpu.hpp"
#if KVCACHE_CUDA_KERNELS
#include "backend/cuda.hpp"  // device storage; its kernels need nvcc, so nvcc alone sees it here
#endif

#include "cache.hpp"

#include "attention/attention.hpp"
#include "attention/online_softmax.hpp"
#include "attention/params.hpp"
