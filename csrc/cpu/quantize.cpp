// quantize_per_token on the CPU: one pass for the row's absmax, one to quantize (the row is
// still in cache), rows split across threads. The AVX-512 and AVX2 paths are bit-identical
// to the scalar one: IEEE division and round-half-to-even conversion in every path.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/isa.h"
#include "cpu/quantize.h"
#include "cpu/vec_load.h"

#if FRUGAL_X86
#include <immintrin.h>
#endif

namespace frugal::cpu {
namespace {

constexpr float kQMax = 127.0f;

// Writes the row's quantized values; returns its scale.
template <typename T>
float quantize_row_scalar(const T* x, int8_t* q, int64_t K) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(static_cast<float>(x[k]));
    finite &= a <= FLT_MAX;  // false for inf and NaN
    amax = std::max(amax, a);
  }
  if (!finite) {
    std::memset(q, 0, K);
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float scale = amax / kQMax;
  if (scale == 0.0f) {
    std::memset(q, 0, K);
    return scale;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float r = std::min(std::max(static_cast<float>(x[k]) / scale, -kQMax), kQMax);
    q[k] = static_cast<int8_t>(std::nearbyint(r));
  }
  return scale;
}

#if FRUGAL_X86

template <typename T>
FRUGAL_TARGET_AVX512 float quantize_row_avx512(const T* x, int8_t* q, int64_t K) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 fmax = _mm512_set1_ps(FLT_MAX);
  __m512 amax0 = _mm512_setzero_ps(), amax1 = _mm512_setzero_ps();
  __mmask16 bad = 0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 a0 = _mm512_andnot_ps(sign, load16(x + k, 0xFFFF));
    const __m512 a1 = _mm512_andnot_ps(sign, load16(x + k + 16, 0xFFFF));
    bad |= _mm512_cmp_ps_mask(a0, fmax, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(a1, fmax, _CMP_NLE_UQ);
    amax0 = _mm512_max_ps(amax0, a0);
    amax1 = _mm512_max_ps(amax1, a1);
  }
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 a = _mm512_andnot_ps(sign, load16(x + k, m));
    bad |= _mm512_cmp_ps_mask(a, fmax, _CMP_NLE_UQ);
    amax0 = _mm512_max_ps(amax0, a);
  }
  if (bad) {
    std::memset(q, 0, K);
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float scale = _mm512_reduce_max_ps(_mm512_max_ps(amax0, amax1)) / kQMax;
  if (scale == 0.0f) {
    std::memset(q, 0, K);
    return scale;
  }
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_set1_ps(-kQMax), hi = _mm512_set1_ps(kQMax);
  for (k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 r = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(load16(x + k, m), vs), lo), hi);
    // cvtps rounds with MXCSR's mode: round to nearest, ties to even.
    _mm512_mask_cvtsepi32_storeu_epi8(q + k, m, _mm512_cvtps_epi32(r));
  }
  return scale;
}

template <typename T>
FRUGAL_TARGET_AVX2 float quantize_row_avx2(const T* x, int8_t* q, int64_t K) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 fmax = _mm256_set1_ps(FLT_MAX);
  __m256 amax = _mm256_setzero_ps();
  int bad = 0;
  const int64_t kv = K - K % 8;
  for (int64_t k = 0; k < kv; k += 8) {
    const __m256 a = _mm256_andnot_ps(sign, load8(x + k));
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));
    amax = _mm256_max_ps(amax, a);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, amax);
  float amax_s = 0.0f;
  for (float v : lanes) amax_s = std::max(amax_s, v);
  for (int64_t k = kv; k < K; ++k) {
    const float a = std::fabs(static_cast<float>(x[k]));
    bad |= !(a <= FLT_MAX);
    amax_s = std::max(amax_s, a);
  }
  if (bad) {
    std::memset(q, 0, K);
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float scale = amax_s / kQMax;
  if (scale == 0.0f) {
    std::memset(q, 0, K);
    return scale;
  }
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_set1_ps(-kQMax), hi = _mm256_set1_ps(kQMax);
  for (int64_t k = 0; k < kv; k += 8) {
    const __m256 r = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(load8(x + k), vs), lo), hi);
    const __m256i i32 = _mm256_cvtps_epi32(r);
    const __m128i i16 =
        _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
  }
  for (int64_t k = kv; k < K; ++k) {
    const float r = std::min(std::max(static_cast<float>(x[k]) / scale, -kQMax), kQMax);
    q[k] = static_cast<int8_t>(std::nearbyint(r));
  }
  return scale;
}

#endif  // FRUGAL_X86

template <typename T>
float quantize_row_for(const T* x, int8_t* q, int64_t K, Isa isa) {
#if FRUGAL_X86
  if (isa >= Isa::kAvx512) return quantize_row_avx512(x, q, K);
  if (isa >= Isa::kAvx2) return quantize_row_avx2(x, q, K);
#endif
  (void)isa;
  return quantize_row_scalar(x, q, K);
}

template <typename T>
void quantize_rows(const T* x, int64_t row_stride, int8_t* q, float* scale, int64_t M,
                   int64_t K) {
  const Isa isa = current_isa();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      scale[m] = quantize_row_for(x + m * row_stride, q + m * K, K, isa);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "quantize_per_token: x must have at least 1 dim; got a 0-d tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "quantize_per_token: x must be float32, float16 or bfloat16; got ", x.scalar_type());
  const int64_t K = x.size(-1);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const int64_t M = scale.numel();
  if (M == 0) return {q, scale};
  if (K == 0) {
    scale.zero_();
    return {q, scale};
  }
  at::Tensor x2 = x.reshape({M, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t row_stride = x2.stride(0);
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  switch (x2.scalar_type()) {
    case at::kFloat:
      quantize_rows(x2.const_data_ptr<float>(), row_stride, qp, sp, M, K);
      break;
    case at::kHalf:
      quantize_rows(x2.const_data_ptr<c10::Half>(), row_stride, qp, sp, M, K);
      break;
    default:
      quantize_rows(x2.const_data_ptr<c10::BFloat16>(), row_stride, qp, sp, M, K);
      break;
  }
  return {q, scale};
}

}  // namespace

float quantize_row(const float* x, int8_t* q, int64_t K, Isa isa) {
  return quantize_row_for(x, q, K, isa);
}
float quantize_row(const c10::Half* x, int8_t* q, int64_t K, Isa isa) {
  return quantize_row_for(x, q, K, isa);
}
float quantize_row(const c10::BFloat16* x, int8_t* q, int64_t K, Isa isa) {
  return quantize_row_for(x, q, K, isa);
}

}  // namespace frugal::cpu

TORCH_LIBRARY_IMPL(frugal, CPU, m) {
  m.impl("quantize_per_token", &frugal::cpu::quantize_per_token_cpu);
}
