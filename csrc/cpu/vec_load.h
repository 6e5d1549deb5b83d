// Loads of fp32, fp16, bf16 and int8 elements widened to fp32 vectors, shared by the CPU kernels
// (paged_attention.cpp, quantize.cpp). load16: 16 lanes (AVX-512), a mask reads only the lanes it
// names (no access past them, masked lanes are 0). load8: 8 lanes (AVX2), all read; load8(p, n)
// reads only the first n and gives 0 after.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cpu/isa.h"

#if FRUGAL_X86
#include <immintrin.h>

namespace frugal::cpu {

FRUGAL_TARGET_AVX512 inline __m512 load16(const float* p, __mmask16 m) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
FRUGAL_TARGET_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                     : _mm256_maskz_loadu_epi16(m, p));
}
FRUGAL_TARGET_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
FRUGAL_TARGET_AVX512 inline __m512 load16(const int8_t* p, __mmask16 m) {
  const __m128i raw = m == 0xFFFF ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                  : _mm_maskz_loadu_epi8(m, p);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

FRUGAL_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FRUGAL_TARGET_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FRUGAL_TARGET_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
FRUGAL_TARGET_AVX2 inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The first n (<= 8) elements at p, zeros after: no read past p[n - 1].
template <typename T>
FRUGAL_TARGET_AVX2 inline __m256 load8(const T* p, int64_t n) {
  if (n >= 8) return load8(p);
  alignas(32) float tmp[8] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(tmp);
}

}  // namespace frugal::cpu

#endif  // FRUGAL_X86
