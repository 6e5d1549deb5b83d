// Per-row symmetric int8 quantization (csrc/cpu/quantize.cpp), for kernels that quantize
// activations on the fly (the fused dynamic int8 linear in int8_matmul.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cpu/isa.h"

namespace frugal::cpu {

// Quantizes one row of K values as quantize_per_token does, with the kernel of ISA level
// `isa` (every level gives the same bits): writes q[0, K) and returns the row's scale
// (absmax / 127; 0 for a row of zeros, NaN, with q all zeros, for a row holding inf or NaN).
float quantize_row(const float* x, int8_t* q, int64_t K, Isa isa);
float quantize_row(const c10::Half* x, int8_t* q, int64_t K, Isa isa);
float quantize_row(const c10::BFloat16* x, int8_t* q, int64_t K, Isa isa);

}  // namespace frugal::cpu
