// Row-quantized element types with a full-precision window of the newest tokens (KIVI's
// residual): the cache keeps each sequence's newest tokens as f32 rows and quantizes them
// residual_tokens at a time, when the last of them is appended, as int4 does with its K groups.
//
// Why: a key's rounding moves attention weights far more than a value's moves the output, and
// attention often weighs the newest positions most. On stories260K (examples/kv_accuracy) int8's
// mean KLD falls from 7.1e-4 to 9.2e-5 with groups of 32, fp8_e4m3's from 3.8e-3 to 4.7e-4.
// The window costs residual_tokens f32 rows of K and V per layer and kv-head of every sequence
// slot (residual_bytes_per_sequence), and nothing per token.
#pragma once

#include "../config.hpp"
#include "concept.hpp"
#include "fp8.hpp"
#include "int8.hpp"

KVCACHE_BEGIN_NAMESPACE

// Element type E (row-quantized) whose cache quantizes rows `Tokens` at a time.
template <class E, const char* Name, int Tokens = 32>
  requires QuantizedElement<E> && (Tokens > 0)
struct with_residual : E {
  static constexpr const char* name = Name;
  static constexpr int residual_tokens = Tokens;
};

namespace detail {
inline constexpr char int8_residual_name[] = "int8_residual";
inline constexpr char fp8_e4m3_residual_name[] = "fp8_e4m3_residual";
}  // namespace detail

using int8_residual = with_residual<int8, detail::int8_residual_name>;
using fp8_e4m3_residual = with_residual<fp8_e4m3, detail::fp8_e4m3_residual_name>;

static_assert(ResidualQuantizedElement<int8_residual> && ResidualQuantizedElement<fp8_e4m3_residual>);

KVCACHE_END_NAMESPACE
