// Library-wide configuration: version, ABI namespace, host/device annotation, assertions.
//
// Every macro here can be defined by the user before the first kvcache include; the definition
// given wins. Tests redefine KVCACHE_ASSERT to throw so that every precondition is testable.
#pragma once

#define KVCACHE_VERSION_MAJOR 0
#define KVCACHE_VERSION_MINOR 1
#define KVCACHE_VERSION_PATCH 0

// Two engines linking different kvcache versions fail to link instead of mixing layouts.
#define KVCACHE_BEGIN_NAMESPACE \
  namespace kvcache {           \
  inline namespace v0 {
#define KVCACHE_END_NAMESPACE \
  }                           \
  }

// Shared index math, views, conversions and softmax state are compiled by g++ and nvcc alike.
#ifndef KVCACHE_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define KVCACHE_HOST_DEVICE __host__ __device__ inline
#else
#define KVCACHE_HOST_DEVICE inline
#endif
#endif

// Whether this translation unit compiles kvcache's CUDA kernels: nvcc does. (The CUDA tests also
// run them on the CPU: tests/cuda/emulator.hpp defines it to 1 for a host compiler.)
#ifndef KVCACHE_CUDA_KERNELS
#if defined(__CUDACC__)
#define KVCACHE_CUDA_KERNELS 1
#else
#define KVCACHE_CUDA_KERNELS 0
#endif
#endif

// Internal invariant checks on hot paths. Public-API validation throws kvcache::Error instead;
// this is for "cannot happen unless kvcache has a bug or a caller broke a documented @pre".
#ifndef KVCACHE_ASSERT
#include <cassert>
#define KVCACHE_ASSERT(condition, message) assert((condition) && (message))
#endif

// Debug builds check the cache's bookkeeping after every call that changes it (see
// KVCache::audit); define KVCACHE_AUDIT to 0 or 1 to choose.
#ifndef KVCACHE_AUDIT
#ifdef NDEBUG
#define KVCACHE_AUDIT 0
#else
#define KVCACHE_AUDIT 1
#endif
#endif
