// exp(x) for x <= 0, as the softmax of the CPU attention kernels (paged_attention.cpp,
// sparse_attention.cpp) needs it: 2^n * p(r) with n = round(x log2 e) and r = x - n ln 2 (ln 2 in
// two parts, Cody-Waite), p the Cephes expf polynomial. Checked against a correctly rounded exp on
// every float in [-87, 0]: at most 1 ulp off, in every version. Below -87 the result would leave
// the normal floats; the versions differ in what they give there (see each).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/isa.h"

#if FRUGAL_X86
#include <immintrin.h>
#endif

namespace frugal::cpu {

constexpr float kExpMin = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// Scalar, written so that compilers vectorize loops over it: exactly 0 below -87 (so
// exp(-inf) = 0), and NaN stays NaN (a NaN score makes its row NaN, as in the reference). n is
// rounded, and 2^n built from its bits, with the 1.5 * 2^23 constant in unsigned arithmetic:
// unlike a float -> int conversion, that is defined for every input, NaN included.
inline float exp_neg(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: t = v + kRound rounds v into t's low bits
  const float xc = x < kExpMin ? kExpMin : x;
  const float t = xc * kLog2e + kRound;
  const float n = t - kRound;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kExpP[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpP[i];
  const float y = p * (r * r) + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < kExpMin ? 0.0f : y * two_n;
}

// tanh(x) through exp_neg, branch-free so that loops over it vectorize: (1 - e) / (1 + e) with
// e = exp(-2|x|), the sign put back; below |x| = 0.1, where 1 - e would cancel, the series
// x (1 - x^2 / 3 + 2 x^4 / 15) (its next term is 5.4e-8 x relative: under fp32's half ulp).
// Within a few ulp of tanh; +-inf give +-1, NaN stays NaN.
inline float tanh_exp(float x) {
  const float a = std::fabs(x);
  const float e = exp_neg(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  const float x2 = x * x;
  const float small = a * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f)));
  const float t = a < 0.1f ? small : big;
  return std::copysign(t, x);
}

#if FRUGAL_X86

// p(r) and n for x clamped to [-87, 0] (NaN stays NaN: max's operand order keeps it).
FRUGAL_TARGET_AVX512 inline __m512 exp16_poly(__m512 x, __m512* n) {
  x = _mm512_max_ps(_mm512_set1_ps(kExpMin), x);
  *n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(*n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(*n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP[i]));
  return _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
}

// Inputs below -87 give exp(-87) ~ 1.6e-38 (for decode: only ever a weight beside the weight 1
// of the running max, or a factor of a zero accumulator); NaN stays NaN.
FRUGAL_TARGET_AVX512 inline __m512 exp16_clamped(__m512 x) {
  __m512 n;
  const __m512 y = exp16_poly(x, &n);
  return _mm512_scalef_ps(y, n);
}

// Exactly 0 below -87 and for -inf (masked-out scores); NaN stays NaN.
FRUGAL_TARGET_AVX512 inline __m512 exp16_flush(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_NLT_UQ);
  __m512 n;
  const __m512 y = exp16_poly(x, &n);
  return _mm512_maskz_scalef_ps(live, y, n);
}

// exp16_clamped on 8 lanes (AVX2).
FRUGAL_TARGET_AVX2 inline __m256 exp8_clamped(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(kExpMin), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP[i]));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  // n >= -126 (x >= -87): 2^n is a normal float built from its exponent bits.
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#endif  // FRUGAL_X86

}  // namespace frugal::cpu
