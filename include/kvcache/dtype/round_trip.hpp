// What a cache of a row-wise element type holds for given K or V rows, as floats: the rows
// stored and read back. For measuring what an element type costs (kv_accuracy rounds only the
// keys, or only the values, this way) and for oracles that need the stored values.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "../config.hpp"
#include "concept.hpp"
#include "hadamard.hpp"

KVCACHE_BEGIN_NAMESPACE

// rows [rows.size() / head_dim][head_dim] <- what a cache of E stores for them: float types
// round each element; quantized types quantize each row with its own scale and decode it
// (rotated types rotate the row first and back after); for residual types, what they store
// once a row's group of tokens is whole. Group-quantized types (int4) have no row-wise answer:
// a key's codes depend on the other tokens of its group.
// @pre rows.size() % head_dim == 0; head_dim a power of two for rotated types.
template <class E>
  requires FloatElement<E> || QuantizedElement<E>
void round_trip_rows(std::span<float> rows, int head_dim) {
  const auto row_floats = static_cast<std::size_t>(head_dim);
  KVCACHE_ASSERT(head_dim > 0 && rows.size() % row_floats == 0, "round_trip_rows: rows must be whole rows of head_dim");
  if constexpr (FloatElement<E>) {
    for (float& value : rows) value = E::to_float(E::from_float(value));
  } else {
    std::vector<typename E::storage_type> codes(row_floats);
    for (std::size_t first = 0; first < rows.size(); first += row_floats) {
      const std::span<float> row = rows.subspan(first, row_floats);
      if constexpr (is_hadamard_rotated<E>) detail::hadamard_transform(row.data(), head_dim);
      const float scale = E::row_scale(row);
      E::quantize_row(row, scale, codes.data());
      for (std::size_t d = 0; d < row_floats; ++d) row[d] = E::decode(codes[d]) * scale;
      if constexpr (is_hadamard_rotated<E>) detail::hadamard_transform(row.data(), head_dim);  // H = H^-1
    }
  }
}

KVCACHE_END_NAMESPACE
