// ISA kernels behind csrc/cpu/int8_matmul.cpp (included by it alone): register tiles for the
// packed int8 GEMM, their epilogues, and the int8 weight-only GEMM for few rows.
//
// A tile reads K4 steps of a packed weight group ([K4][W][4] bytes, W = 16 * NB columns) and
// MR rows of a as pack_a_* wrote them, and writes int32 sums [MR][kGroupCols]:
//   VNNI       vpdpbusd needs unsigned a: a ^ 0x80 = a + 128, and the GEMM starts the sums
//              at comp[n] = -128 * sum_k b[n, k]. Sums wrap mod 2^32 on the way; the result
//              fits in int32 (K <= 131071), so it is exact.
//   AVX-512,   signed a; each 32-bit lane's 4 bytes are split into sign-extended 16-bit pairs
//   AVX2       (k0, k2) and (k1, k3) and multiplied with vpmaddwd, exact in int32. AVX2, when
//              a holds no -128: |b| times a with b's sign with vpmaddubsw (TileAvx2Sign).
//   scalar     signed a, int32 sums.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/amx.h"
#include "cpu/isa.h"

#if FRUGAL_X86
#include <immintrin.h>
#endif

namespace frugal::cpu::int8_kernels {

constexpr int64_t kGroupCols = 64;
constexpr int kMaxMr = 6;
constexpr int kMrVnni = 6;  // 6 x 64 int32: 24 accumulators + 4 weight vectors in 32 zmm
constexpr int kMrAvx512 = 4;
constexpr int kMrAvx2 = 4;
constexpr int kMrScalar = 4;

enum class OutType { kInt32, kFloat, kHalf, kBFloat16 };

// out[m, n] = acc (kInt32), or T(float(acc) * a_scale[m] * b_scale[n] + bias[n]).
struct Epilogue {
  void* out = nullptr;
  int64_t ldo = 0;
  OutType out_type = OutType::kInt32;
  const float* a_scale = nullptr;
  int64_t a_scale_stride = 0;  // 0: one scale for every row
  const float* b_scale = nullptr;
  const float* bias = nullptr;  // nullptr: no bias
};

// One row of a, K bytes, to 4 * K4 bytes (zero-padded), as the tiles read it.
using PackAFn = void (*)(const int8_t* a, int64_t K, int64_t K4, uint8_t* dst);
// out[r][c] = init[r * init_stride + c] + sum_k a[r][k] b[c][k] for the MR x 16 NB tile, with
// init == nullptr read as 0 and init == out allowed. a: rows at stride lda, 4 * K4 bytes of
// them; b: K4 steps of a packed group of 16 * NB columns.
using TileFn = void (*)(const uint8_t* a, int64_t lda, const int8_t* b, int64_t K4,
                        const int32_t* init, int64_t init_stride, int32_t* out);
using EpilogueFn = void (*)(const int32_t* tile, int rows, int64_t m0, int64_t n0, int nc,
                            const Epilogue& epi);

inline void pack_a_signed(const int8_t* a, int64_t K, int64_t K4, uint8_t* dst) {
  if (K > 0) std::memcpy(dst, a, K);  // a is null for K = 0, and memcpy's pointers never may be
  std::memset(dst + K, 0, 4 * K4 - K);
}

inline void pack_a_vnni(const int8_t* a, int64_t K, int64_t K4, uint8_t* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<uint8_t>(a[k]) ^ 0x80u;
  std::memset(dst + K, 0x80, 4 * K4 - K);
}

inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Picks the instantiation Tile<MR, NB> for a runtime (mr, nb), mr in [1, MaxMr], nb in [1, 4].
template <template <int, int> class Tile, int MR>
TileFn pick_nb(int nb) {
  switch (nb) {
    case 1: return &Tile<MR, 1>::run;
    case 2: return &Tile<MR, 2>::run;
    case 3: return &Tile<MR, 3>::run;
    default: return &Tile<MR, 4>::run;
  }
}

template <template <int, int> class Tile, int MaxMr>
TileFn pick_tile(int mr, int nb) {
  switch (mr) {
    case 1: return pick_nb<Tile, 1>(nb);
    case 2: return pick_nb<Tile, 2>(nb);
    case 3: return pick_nb<Tile, 3>(nb);
    case 4: return pick_nb<Tile, 4>(nb);
    case 5:
      if constexpr (MaxMr >= 5) return pick_nb<Tile, 5>(nb);
      break;
    case 6:
      if constexpr (MaxMr >= 6) return pick_nb<Tile, 6>(nb);
      break;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Scalar
// ---------------------------------------------------------------------------------------------

template <int MR, int NB>
struct TileScalar {
  static void run(const uint8_t* a, int64_t lda, const int8_t* b, int64_t K4,
                  const int32_t* init, int64_t init_stride, int32_t* out) {
    constexpr int W = NB * 16;
    for (int r = 0; r < MR; ++r) {
      const auto* row = reinterpret_cast<const int8_t*>(a + r * lda);
      int32_t acc[W] = {};
      if (init != nullptr) std::memcpy(acc, init + r * init_stride, sizeof(acc));
      for (int64_t k4 = 0; k4 < K4; ++k4) {
        const int8_t* ak = row + 4 * k4;
        const int8_t* bk = b + k4 * W * 4;
        for (int c = 0; c < W; ++c) {
          for (int j = 0; j < 4; ++j) acc[c] += int32_t{ak[j]} * int32_t{bk[c * 4 + j]};
        }
      }
      std::memcpy(out + r * kGroupCols, acc, sizeof(acc));
    }
  }
};

inline TileFn tile_scalar(int mr, int nb) { return pick_tile<TileScalar, kMrScalar>(mr, nb); }

// Hides a product from the compiler so it is not fused with the add that follows into an FMA:
// the epilogue rounds the product and the sum separately in every path, as the reference does.
inline float opaque(float v) {
  asm("" : "+m"(v));
  return v;
}

template <template <typename> class Epi>
void epilogue_dispatch(const int32_t* tile, int rows, int64_t m0, int64_t n0, int nc,
                       const Epilogue& epi) {
  switch (epi.out_type) {
    case OutType::kInt32: return Epi<int32_t>::run(tile, rows, m0, n0, nc, epi);
    case OutType::kFloat: return Epi<float>::run(tile, rows, m0, n0, nc, epi);
    case OutType::kHalf: return Epi<c10::Half>::run(tile, rows, m0, n0, nc, epi);
    case OutType::kBFloat16: return Epi<c10::BFloat16>::run(tile, rows, m0, n0, nc, epi);
  }
}

template <typename T>
struct EpilogueScalar {
  static void run(const int32_t* tile, int rows, int64_t m0, int64_t n0, int nc,
                  const Epilogue& epi) {
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      T* out = static_cast<T*>(epi.out) + m * epi.ldo + n0;
      const int32_t* acc = tile + r * kGroupCols;
      if constexpr (std::is_same_v<T, int32_t>) {
        std::memcpy(out, acc, nc * sizeof(int32_t));
      } else {
        const float as = epi.a_scale[m * epi.a_scale_stride];
        for (int c = 0; c < nc; ++c) {
          float y = opaque(static_cast<float>(acc[c]) * as * epi.b_scale[n0 + c]);
          if (epi.bias != nullptr) y = y + epi.bias[n0 + c];
          out[c] = static_cast<T>(y);
        }
      }
    }
  }
};

inline void epilogue_scalar(const int32_t* tile, int rows, int64_t m0, int64_t n0, int nc,
                            const Epilogue& epi) {
  epilogue_dispatch<EpilogueScalar>(tile, rows, m0, n0, nc, epi);
}

#if FRUGAL_X86

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI
// ---------------------------------------------------------------------------------------------

template <int MR, int NB>
struct TileVnni {
  FRUGAL_TARGET_AVX512_VNNI static void run(const uint8_t* a, int64_t lda, const int8_t* b,
                                            int64_t K4, const int32_t* init, int64_t init_stride,
                                            int32_t* out) {
    __m512i acc[MR][NB];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        acc[r][j] = init == nullptr ? _mm512_setzero_si512()
                                    : _mm512_loadu_si512(init + r * init_stride + 16 * j);
      }
    }
    for (int64_t k4 = 0; k4 < K4; ++k4) {
      const int8_t* bk = b + k4 * NB * 64;
      const uint8_t* ak = a + 4 * k4;
      __m512i bv[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) bv[j] = _mm512_loadu_si512(bk + 64 * j);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m512i av = _mm512_set1_epi32(load_i32(ak + r * lda));
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, bv[j]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) _mm512_storeu_si512(out + r * kGroupCols + 16 * j, acc[r][j]);
    }
  }
};

inline TileFn tile_vnni(int mr, int nb) { return pick_tile<TileVnni, kMrVnni>(mr, nb); }

// ---------------------------------------------------------------------------------------------
// AVX-512 without VNNI
// ---------------------------------------------------------------------------------------------

// Sign-extended 16-bit lanes of bytes 0 and 2 (even) and 1 and 3 (odd) of each 32-bit lane.
FRUGAL_TARGET_AVX512 inline __m512i even_bytes(__m512i v) {
  return _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8);
}
FRUGAL_TARGET_AVX512 inline __m512i odd_bytes(__m512i v) { return _mm512_srai_epi16(v, 8); }

template <int MR, int NB>
struct TileAvx512 {
  FRUGAL_TARGET_AVX512 static void run(const uint8_t* a, int64_t lda, const int8_t* b,
                                       int64_t K4, const int32_t* init, int64_t init_stride,
                                       int32_t* out) {
    __m512i acc[MR][NB];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        acc[r][j] = init == nullptr ? _mm512_setzero_si512()
                                    : _mm512_loadu_si512(init + r * init_stride + 16 * j);
      }
    }
    for (int64_t k4 = 0; k4 < K4; ++k4) {
      const int8_t* bk = b + k4 * NB * 64;
      const uint8_t* ak = a + 4 * k4;
      __m512i ae[MR], ao[MR];
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m512i av = _mm512_set1_epi32(load_i32(ak + r * lda));
        ae[r] = even_bytes(av);
        ao[r] = odd_bytes(av);
      }
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const __m512i bv = _mm512_loadu_si512(bk + 64 * j);
        const __m512i be = even_bytes(bv), bo = odd_bytes(bv);
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const __m512i s =
              _mm512_add_epi32(_mm512_madd_epi16(be, ae[r]), _mm512_madd_epi16(bo, ao[r]));
          acc[r][j] = _mm512_add_epi32(acc[r][j], s);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) _mm512_storeu_si512(out + r * kGroupCols + 16 * j, acc[r][j]);
    }
  }
};

inline TileFn tile_avx512(int mr, int nb) { return pick_tile<TileAvx512, kMrAvx512>(mr, nb); }

FRUGAL_TARGET_AVX512 inline void store16(int32_t* p, __m512i v, __mmask16 m) {
  _mm512_mask_storeu_epi32(p, m, v);
}
FRUGAL_TARGET_AVX512 inline void store16(float* p, __m512 y, __mmask16 m) {
  _mm512_mask_storeu_ps(p, m, y);
}
FRUGAL_TARGET_AVX512 inline void store16(c10::Half* p, __m512 y, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even as c10::BFloat16 does: NaN -> 0x7FC0, else (u + 0x7FFF + lsb) >> 16.
FRUGAL_TARGET_AVX512 inline void store16(c10::BFloat16* p, __m512 y, __mmask16 m) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounding = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, rounding), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

template <typename T>
struct EpilogueAvx512 {
  // The _round forms with the current rounding mode (nearest even) are plain multiplies and
  // adds that the compiler cannot fuse into an FMA.
  FRUGAL_TARGET_AVX512 static void run(const int32_t* tile, int rows, int64_t m0, int64_t n0,
                                       int nc, const Epilogue& epi) {
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      T* out = static_cast<T*>(epi.out) + m * epi.ldo + n0;
      const int32_t* acc = tile + r * kGroupCols;
      for (int c = 0; c < nc; c += 16) {
        const __mmask16 mask = nc - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (nc - c)) - 1);
        const __m512i v = _mm512_loadu_si512(acc + c);
        if constexpr (std::is_same_v<T, int32_t>) {
          store16(out + c, v, mask);
        } else {
          __m512 y = _mm512_mul_round_ps(_mm512_cvtepi32_ps(v),
                                         _mm512_set1_ps(epi.a_scale[m * epi.a_scale_stride]),
                                         _MM_FROUND_CUR_DIRECTION);
          y = _mm512_mul_round_ps(y, _mm512_maskz_loadu_ps(mask, epi.b_scale + n0 + c),
                                  _MM_FROUND_CUR_DIRECTION);
          if (epi.bias != nullptr) {
            y = _mm512_add_round_ps(y, _mm512_maskz_loadu_ps(mask, epi.bias + n0 + c),
                                    _MM_FROUND_CUR_DIRECTION);
          }
          store16(out + c, y, mask);
        }
      }
    }
  }
};

inline void epilogue_avx512(const int32_t* tile, int rows, int64_t m0, int64_t n0, int nc,
                            const Epilogue& epi) {
  epilogue_dispatch<EpilogueAvx512>(tile, rows, m0, n0, nc, epi);
}

// ---------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------

FRUGAL_TARGET_AVX2 inline __m256i even_bytes(__m256i v) {
  return _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
}
FRUGAL_TARGET_AVX2 inline __m256i odd_bytes(__m256i v) { return _mm256_srai_epi16(v, 8); }

// One 16-column block of the group at a time: 4 x 2 accumulators fit the 16 ymm registers.
template <int MR, int NB>
struct TileAvx2 {
  FRUGAL_TARGET_AVX2 static void run(const uint8_t* a, int64_t lda, const int8_t* b,
                                     int64_t K4, const int32_t* init, int64_t init_stride,
                                     int32_t* out) {
    for (int jb = 0; jb < NB; ++jb) {
      __m256i acc[MR][2];
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          acc[r][h] = init == nullptr
                          ? _mm256_setzero_si256()
                          : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                init + r * init_stride + jb * 16 + 8 * h));
        }
      }
      for (int64_t k4 = 0; k4 < K4; ++k4) {
        const int8_t* bk = b + k4 * NB * 64 + jb * 64;
        const uint8_t* ak = a + 4 * k4;
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk + 32));
        const __m256i e0 = even_bytes(b0), o0 = odd_bytes(b0);
        const __m256i e1 = even_bytes(b1), o1 = odd_bytes(b1);
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const __m256i av = _mm256_set1_epi32(load_i32(ak + r * lda));
          const __m256i ae = even_bytes(av), ao = odd_bytes(av);
          acc[r][0] = _mm256_add_epi32(
              acc[r][0], _mm256_add_epi32(_mm256_madd_epi16(e0, ae), _mm256_madd_epi16(o0, ao)));
          acc[r][1] = _mm256_add_epi32(
              acc[r][1], _mm256_add_epi32(_mm256_madd_epi16(e1, ae), _mm256_madd_epi16(o1, ao)));
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        int32_t* o = out + r * kGroupCols + jb * 16;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), acc[r][0]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), acc[r][1]);
      }
    }
  }
};

inline TileFn tile_avx2(int mr, int nb) { return pick_tile<TileAvx2, kMrAvx2>(mr, nb); }

// AVX2 for a without -128 (the GEMM checks a as it packs it; else TileAvx2): vpmaddubsw
// multiplies |b| (unsigned, |-128| = 128) by a with b's sign (vpsignb: -a where b < 0, 0 where
// b = 0) and sums each pair in int16 with no saturation (|b| <= 128, |a| <= 127:
// 2 * 128 * 127 < 2^15); vpmaddwd with ones sums the pairs into the int32 lanes. Exact, with
// 4 operations per 32 products (one of them the sign) where TileAvx2 takes about 6.
// Few rows take several 16-column blocks per k4 step (8 accumulators: 1 row x 4 blocks,
// 2 x 2), so that each step reads whole lines of the group in order; one block at a time
// reads every fourth 64-byte line of it, four times over, and its first pass prefetches the
// lines the others read. Paired against TileAvx2 (the same call with one a byte -128), Zen 4
// capped at AVX2, 4096 x 4096 weights from memory, 2 threads: M = 1 2.1x, 2 1.6x, 4 1.4x,
// 16 1.4x, 64 1.2x, 256 1.2x.
template <int MR, int NB>
struct TileAvx2Sign {
  // PF: the first pass of several also prefetches (into L2) the lines of each k4 step that
  // the later passes read, 8 steps ahead, so that the group comes from memory in order once.
  template <int J, bool PF>
  FRUGAL_TARGET_AVX2 static void cols(const uint8_t* a, int64_t lda, const int8_t* b,
                                      int64_t K4, const int32_t* init, int64_t init_stride,
                                      int32_t* out, int jb0) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MR][2 * J];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < 2 * J; ++v) {
        acc[r][v] = init == nullptr
                        ? _mm256_setzero_si256()
                        : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                              init + r * init_stride + jb0 * 16 + 8 * v));
      }
    }
    for (int64_t k4 = 0; k4 < K4; ++k4) {
      const int8_t* bk = b + k4 * NB * 64 + jb0 * 64;
      const uint8_t* ak = a + 4 * k4;
      if constexpr (PF) {
#pragma GCC unroll 4
        for (int l = J; l < NB; ++l) {  // past the group's end: a prefetch never faults
          _mm_prefetch(reinterpret_cast<const char*>(bk + 8 * NB * 64 + l * 64), _MM_HINT_T1);
        }
      }
#pragma GCC unroll 8
      for (int v = 0; v < 2 * J; ++v) {
        const __m256i bv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk + 32 * v));
        const __m256i u = _mm256_abs_epi8(bv);
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const __m256i av = _mm256_set1_epi32(load_i32(ak + r * lda));
          acc[r][v] = _mm256_add_epi32(
              acc[r][v],
              _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(av, bv)), ones));
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < 2 * J; ++v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kGroupCols + jb0 * 16 + 8 * v),
                            acc[r][v]);
      }
    }
  }

  FRUGAL_TARGET_AVX2 static void run(const uint8_t* a, int64_t lda, const int8_t* b,
                                     int64_t K4, const int32_t* init, int64_t init_stride,
                                     int32_t* out) {
    constexpr int kJ = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
    constexpr int J = kJ < NB ? kJ : NB;
    cols<J, (J < NB)>(a, lda, b, K4, init, init_stride, out, 0);
    int jb0 = J;
    for (; jb0 + J <= NB; jb0 += J) cols<J, false>(a, lda, b, K4, init, init_stride, out, jb0);
    if constexpr (NB % J != 0) {
      cols<NB % J, false>(a, lda, b, K4, init, init_stride, out, jb0);
    }
  }
};

inline TileFn tile_avx2_sign(int mr, int nb) {
  return pick_tile<TileAvx2Sign, kMrAvx2>(mr, nb);
}

FRUGAL_TARGET_AVX2 inline __m256 opaque(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// 8 output values of type T from y (or v for int32), the first n (1..8) of them stored.
FRUGAL_TARGET_AVX2 inline void store8(int32_t* p, __m256i v, int n) {
  if (n == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    alignas(32) int32_t tmp[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
    std::memcpy(p, tmp, n * sizeof(int32_t));
  }
}
FRUGAL_TARGET_AVX2 inline void store8(float* p, __m256 y, int n) {
  if (n == 8) {
    _mm256_storeu_ps(p, y);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, y);
    std::memcpy(p, tmp, n * sizeof(float));
  }
}
FRUGAL_TARGET_AVX2 inline void store8_u16(void* p, __m128i h, int n) {
  if (n == 8) {
    _mm_storeu_si128(static_cast<__m128i*>(p), h);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(p, tmp, n * sizeof(uint16_t));
  }
}
FRUGAL_TARGET_AVX2 inline void store8(c10::Half* p, __m256 y, int n) {
  store8_u16(p, _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), n);
}
FRUGAL_TARGET_AVX2 inline void store8(c10::BFloat16* p, __m256 y, int n) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounding = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, rounding), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0),
                         _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
  // Values are <= 0xFFFF: packus keeps them; the permute puts lanes 0..7 in the low half.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  store8_u16(p, _mm256_castsi256_si128(packed), n);
}

FRUGAL_TARGET_AVX2 inline __m256 load8_masked(const float* p, int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
}

template <typename T>
struct EpilogueAvx2 {
  FRUGAL_TARGET_AVX2 static void run(const int32_t* tile, int rows, int64_t m0, int64_t n0,
                                     int nc, const Epilogue& epi) {
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      T* out = static_cast<T*>(epi.out) + m * epi.ldo + n0;
      const int32_t* acc = tile + r * kGroupCols;
      for (int c = 0; c < nc; c += 8) {
        const int n = nc - c >= 8 ? 8 : nc - c;
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + c));
        if constexpr (std::is_same_v<T, int32_t>) {
          store8(out + c, v, n);
        } else {
          __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(v),
                                   _mm256_set1_ps(epi.a_scale[m * epi.a_scale_stride]));
          y = opaque(_mm256_mul_ps(y, load8_masked(epi.b_scale + n0 + c, n)));
          if (epi.bias != nullptr) y = _mm256_add_ps(y, load8_masked(epi.bias + n0 + c, n));
          store8(out + c, y, n);
        }
      }
    }
  }
};

inline void epilogue_avx2(const int32_t* tile, int rows, int64_t m0, int64_t n0, int nc,
                          const Epilogue& epi) {
  epilogue_dispatch<EpilogueAvx2>(tile, rows, m0, n0, nc, epi);
}

// ---------------------------------------------------------------------------------------------
// AMX-INT8 (csrc/cpu/amx.h: Bk is AmxHw, the instructions, or AmxEmu, their emulation)
// ---------------------------------------------------------------------------------------------

constexpr int kMrAmx = amx::kRows;  // one tile of rows of a

// The int32 sums of column block J start from init (row stride init_stride) or from zero.
template <class Bk, int J>
FRUGAL_TARGET_AMX __attribute__((always_inline)) inline void amx_start(const int32_t* init,
                                                                        int64_t init_stride) {
  if (init != nullptr) {
    Bk::template load<J>(init + 16 * J, 4 * init_stride);
  } else {
    Bk::template zero<J>();
  }
}

// The k4 steps that do not fill a tile (K4 % 16), on a vector tile of 4 rows at a time: the
// AVX-512 one under the instructions (every AMX CPU has AVX-512), the scalar one emulated.
template <class Bk>
TileFn amx_tail_tile(int mr, int nb) {
  if constexpr (std::is_same_v<Bk, amx::AmxHw>) {
    return pick_tile<TileAvx512, kMrAvx512>(mr, nb);
  } else {
    return pick_tile<TileScalar, kMrScalar>(mr, nb);
  }
}

// MR rows (1..16) of a against 16 * NB columns: whole chunks of 16 k4 steps as one a tile
// times NB b tiles (register plan: amx::gemm_config), read straight from the packed weight
// group, whose [K4][W][4] layout is the b operand of tdpbssd; then the k4 steps left over, on
// amx_tail_tile, from those sums. a is packed signed (pack_a_signed), as tdpbssd multiplies it.
template <class Bk, int MR, int NB>
struct TileAmx {
  FRUGAL_TARGET_AMX static void run(const uint8_t* a, int64_t lda, const int8_t* b, int64_t K4,
                                    const int32_t* init, int64_t init_stride, int32_t* out) {
    constexpr int64_t ldb = 4 * 16 * NB;       // bytes per k4 step of the group
    constexpr int64_t ldo = 4 * kGroupCols;    // bytes per row of out
    const int64_t K16 = K4 / 16 * 16;
    if (K16 > 0) {
      static const amx::TileConfig cfg = amx::gemm_config(MR);
      Bk::config(cfg);
      amx_start<Bk, 0>(init, init_stride);
      if constexpr (NB > 1) amx_start<Bk, 1>(init, init_stride);
      if constexpr (NB > 2) amx_start<Bk, 2>(init, init_stride);
      if constexpr (NB > 3) amx_start<Bk, 3>(init, init_stride);
      for (int64_t k = 0; k < K16; k += 16) {
        const int8_t* bk = b + k * ldb;
        Bk::template load<4>(a + 4 * k, lda);
        Bk::template load<5>(bk, ldb);
        Bk::template dpbssd<0, 4, 5>();
        if constexpr (NB > 1) {
          Bk::template load<6>(bk + 64, ldb);
          Bk::template dpbssd<1, 4, 6>();
        }
        if constexpr (NB > 2) {
          Bk::template load<7>(bk + 128, ldb);
          Bk::template dpbssd<2, 4, 7>();
        }
        if constexpr (NB > 3) {
          Bk::template load<5>(bk + 192, ldb);
          Bk::template dpbssd<3, 4, 5>();
        }
      }
      Bk::template store<0>(out, ldo);
      if constexpr (NB > 1) Bk::template store<1>(out + 16, ldo);
      if constexpr (NB > 2) Bk::template store<2>(out + 32, ldo);
      if constexpr (NB > 3) Bk::template store<3>(out + 48, ldo);
    }
    if (K16 == K4 && K16 > 0) return;
    // The tail (or everything, for K4 < 16): from the tile sums, or from init.
    for (int r = 0; r < MR; r += kMrScalar) {
      const int rows = std::min(kMrScalar, MR - r);
      const TileFn fn = amx_tail_tile<Bk>(rows, NB);
      const int32_t* from = K16 > 0 ? out + r * kGroupCols
                            : init != nullptr ? init + r * init_stride
                                              : nullptr;
      fn(a + r * lda + 4 * K16, lda, b + K16 * ldb, K4 - K16, from,
         K16 > 0 ? kGroupCols : init_stride, out + r * kGroupCols);
    }
  }
};

template <class Bk, int NB, int... I>
TileFn amx_pick_mr(int mr, std::integer_sequence<int, I...>) {
  static constexpr TileFn fns[] = {&TileAmx<Bk, I + 1, NB>::run...};
  return fns[mr - 1];
}

template <class Bk>
TileFn tile_amx(int mr, int nb) {
  const auto all = std::make_integer_sequence<int, kMrAmx>{};
  switch (nb) {
    case 1: return amx_pick_mr<Bk, 1>(mr, all);
    case 2: return amx_pick_mr<Bk, 2>(mr, all);
    case 3: return amx_pick_mr<Bk, 3>(mr, all);
    default: return amx_pick_mr<Bk, 4>(mr, all);
  }
}

#endif  // FRUGAL_X86

// The stream tiles' prefetch of the next tile's rows of b (each row is its own short stream,
// often one page, where hardware prefetchers stop): into L2, not L1. Fetching into L1 (T0) held
// the L1 miss buffers that the demand loads need: M = 1, 4096 x 4096, 2 threads (Zen 4, weights
// from memory, interleaved): 0.61 -> 0.45 ms with T2 (the packed path's time), M = 4: 0.69 ->
// 0.47 ms.
inline void prefetch_stream(const void* p) {
#if FRUGAL_X86
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T2);
#else
  (void)p;
#endif
}

// ---------------------------------------------------------------------------------------------
// Weight-only int8: out[m, n] = T(sum_k x[m, k] * b[n, k] * scale[n] + bias[n]) with x fp32,
// for few rows of x: each thread streams its rows of b once, converting them in registers.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kWeightOnlyMaxStreamRows = 16;  // larger M goes to at::mm
constexpr int64_t kWeightOnlyRows = 4;            // rows of b per tile (and per task)

struct WeightOnlyArgs {
  const float* x = nullptr;  // [M, K], row stride ldx
  int64_t ldx = 0, M = 0, K = 0;
  const int8_t* b = nullptr;  // [N, K], row stride ldb
  int64_t ldb = 0;
  const float* scale = nullptr;  // [N]
  const float* bias = nullptr;   // [N] or nullptr
  void* out = nullptr;           // [M, N] of out_type, row stride ldo
  int64_t ldo = 0;
  OutType out_type = OutType::kFloat;
};

using WeightOnlyFn = void (*)(const WeightOnlyArgs&, int64_t n_begin, int64_t n_end);

inline void weight_only_store(const WeightOnlyArgs& p, int64_t m, int64_t n, float sum) {
  float y = sum * p.scale[n];
  if (p.bias != nullptr) y += p.bias[n];
  const int64_t i = m * p.ldo + n;
  switch (p.out_type) {
    case OutType::kHalf: static_cast<c10::Half*>(p.out)[i] = c10::Half(y); break;
    case OutType::kBFloat16: static_cast<c10::BFloat16*>(p.out)[i] = c10::BFloat16(y); break;
    default: static_cast<float*>(p.out)[i] = y; break;
  }
}

inline void weight_only_scalar(const WeightOnlyArgs& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* w = p.b + n * p.ldb;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.ldx;
      float sum = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) sum += x[k] * static_cast<float>(w[k]);
      weight_only_store(p, m, n, sum);
    }
  }
}

// Picks F<MW, NW> for runtime mw in [1, MaxMw], nw in [1, 4] and calls it.
template <template <int, int> class F, int MW, typename... Args>
inline void call_nw(int nw, Args... args) {
  switch (nw) {
    case 1: return F<MW, 1>::run(args...);
    case 2: return F<MW, 2>::run(args...);
    case 3: return F<MW, 3>::run(args...);
    default: return F<MW, 4>::run(args...);
  }
}

template <template <int, int> class F, int MaxMw, typename... Args>
inline void call_mw_nw(int mw, int nw, Args... args) {
  switch (mw) {
    case 1: return call_nw<F, 1>(nw, args...);
    case 2: return call_nw<F, 2>(nw, args...);
    case 3:
      if constexpr (MaxMw >= 3) return call_nw<F, 3>(nw, args...);
      break;
    case 4:
      if constexpr (MaxMw >= 4) return call_nw<F, 4>(nw, args...);
      break;
    case 5:
      if constexpr (MaxMw >= 5) return call_nw<F, 5>(nw, args...);
      break;
    case 6:
      if constexpr (MaxMw >= 6) return call_nw<F, 6>(nw, args...);
      break;
  }
}

// Runs Tile<mw, nw> over every (block of rows of x, block of rows of b) in [n_begin, n_end).
template <template <int, int> class Tile, int MaxMw>
inline void weight_only_blocks(const WeightOnlyArgs& p, int64_t n_begin, int64_t n_end) {
  float sums[MaxMw * kWeightOnlyRows];
  for (int64_t n = n_begin; n < n_end; n += kWeightOnlyRows) {
    const int nw = static_cast<int>(std::min<int64_t>(kWeightOnlyRows, n_end - n));
    for (int64_t m = 0; m < p.M; m += MaxMw) {
      const int mw = static_cast<int>(std::min<int64_t>(MaxMw, p.M - m));
      call_mw_nw<Tile, MaxMw>(mw, nw, p.x + m * p.ldx, p.ldx, p.b + n * p.ldb, p.ldb, p.K,
                              static_cast<float*>(sums));
      for (int r = 0; r < mw; ++r) {
        for (int j = 0; j < nw; ++j) weight_only_store(p, m + r, n + j, sums[r * nw + j]);
      }
    }
  }
}

#if FRUGAL_X86

template <int MW, int NW>
struct WeightOnlyTileAvx512 {
  FRUGAL_TARGET_AVX512 __attribute__((always_inline)) static inline void step(
      __m512 (&acc)[MW][NW], const float* x, int64_t ldx, const int8_t* b, int64_t ldb,
      __mmask16 mask) {
    __m512 w[NW];
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) {
      w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, b + j * ldb)));
    }
#pragma GCC unroll 6
    for (int r = 0; r < MW; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * ldx);
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }

  FRUGAL_TARGET_AVX512 static void run(const float* x, int64_t ldx, const int8_t* b, int64_t ldb,
                                       int64_t K, float* sums) {
    __m512 acc[MW][NW];
#pragma GCC unroll 6
    for (int r = 0; r < MW; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) acc[r][j] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      // Each row of b is its own short stream (often one page, where hardware prefetchers
      // stop): fetch the same line of the next tile's rows now.
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) {
        prefetch_stream(b + (NW + j) * ldb + k);
      }
#pragma GCC unroll 4
      for (int kk = 0; kk < 64; kk += 16) step(acc, x + k + kk, ldx, b + k + kk, ldb, 0xFFFF);
    }
    for (; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      step(acc, x + k, ldx, b + k, ldb, mask);
    }
#pragma GCC unroll 6
    for (int r = 0; r < MW; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) sums[r * NW + j] = _mm512_reduce_add_ps(acc[r][j]);
    }
  }
};

inline void weight_only_avx512(const WeightOnlyArgs& p, int64_t n_begin, int64_t n_end) {
  weight_only_blocks<WeightOnlyTileAvx512, 6>(p, n_begin, n_end);
}

template <int MW, int NW>
struct WeightOnlyTileAvx2 {
  FRUGAL_TARGET_AVX2 __attribute__((always_inline)) static inline void step(
      __m256 (&acc)[MW][NW], const int8_t* const* wp, const float* const* xp) {
    __m256 w[NW];
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) {
      w[j] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wp[j]))));
    }
#pragma GCC unroll 4
    for (int r = 0; r < MW; ++r) {
      const __m256 xv = _mm256_loadu_ps(xp[r]);
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) acc[r][j] = _mm256_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }

  FRUGAL_TARGET_AVX2 static void run(const float* x, int64_t ldx, const int8_t* b, int64_t ldb,
                                     int64_t K, float* sums) {
    __m256 acc[MW][NW];
#pragma GCC unroll 4
    for (int r = 0; r < MW; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) acc[r][j] = _mm256_setzero_ps();
    }
    const int8_t* wp[NW];
    const float* xp[MW];
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      for (int j = 0; j < NW; ++j) wp[j] = b + j * ldb + k;
      for (int r = 0; r < MW; ++r) xp[r] = x + r * ldx + k;
      step(acc, wp, xp);
    }
    if (k < K) {
      // The tail through zero-padded copies, as one more full step.
      int8_t wt[NW][8] = {};
      float xt[MW][8] = {};
      for (int j = 0; j < NW; ++j) {
        std::memcpy(wt[j], b + j * ldb + k, K - k);
        wp[j] = wt[j];
      }
      for (int r = 0; r < MW; ++r) {
        std::memcpy(xt[r], x + r * ldx + k, (K - k) * sizeof(float));
        xp[r] = xt[r];
      }
      step(acc, wp, xp);
    }
#pragma GCC unroll 4
    for (int r = 0; r < MW; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) {
        const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][j]),
                                    _mm256_extractf128_ps(acc[r][j], 1));
        const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        sums[r * NW + j] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
      }
    }
  }
};

inline void weight_only_avx2(const WeightOnlyArgs& p, int64_t n_begin, int64_t n_end) {
  weight_only_blocks<WeightOnlyTileAvx2, 2>(p, n_begin, n_end);
}

#endif  // FRUGAL_X86

// ---------------------------------------------------------------------------------------------
// int8 x int8 for few rows of a over the row-major b [N, K] (no packing): each thread streams
// its rows of b once. sums[r * NW + j] = sum_k a[r][k] b[j][k], exact in int32 (wrapping on
// the way, as the tiles do). a: signed rows at stride lda, readable (zero-padded) up to
// 4 * ceil(K / 4) bytes; b: K bytes per row.
//   VNNI      vpdpbusd with b ^ 0x80 = b + 128 as the unsigned operand and a signed: the raw
//             sums are over (b + 128) a; the caller subtracts 128 * sum_k a[r][k].
//   AVX-512,  32 (16) bytes sign-extended to int16 and multiplied with vpmaddwd.
//   AVX2
// ---------------------------------------------------------------------------------------------

constexpr int64_t kStreamMaxRows = 4;  // M up to this reads b unpacked
constexpr int64_t kStreamCols = 4;     // rows of b per tile

inline void stream_scalar(const int8_t* a, int64_t lda, int mw, const int8_t* b, int64_t ldb,
                          int nw, int64_t K, int32_t* sums) {
  for (int r = 0; r < mw; ++r) {
    for (int j = 0; j < nw; ++j) {
      uint32_t s = 0;  // wraps as the vector paths do; the result fits
      for (int64_t k = 0; k < K; ++k) {
        s += static_cast<uint32_t>(int32_t{a[r * lda + k]} * int32_t{b[j * ldb + k]});
      }
      sums[r * nw + j] = static_cast<int32_t>(s);
    }
  }
}

#if FRUGAL_X86

// The 16 lanes' sum, wrapping mod 2^32 (vector adds; _mm512_reduce_add_epi32 adds as int, and
// the VNNI raw sums may leave int32 on the way).
FRUGAL_TARGET_AVX512 inline int32_t hsum_wrap(__m512i v) {
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i q = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  q = _mm_add_epi32(q, _mm_unpackhi_epi64(q, q));
  return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 1)));
}

// The accumulators of a stream tile: zeroed, then each reduced to one int32 (wrapping).
template <int MW, int NW>
FRUGAL_TARGET_AVX512 __attribute__((always_inline)) inline void zero_tiles(
    __m512i (&acc)[MW][NW]) {
#pragma GCC unroll 4
  for (int r = 0; r < MW; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) acc[r][j] = _mm512_setzero_si512();
  }
}

template <int MW, int NW>
FRUGAL_TARGET_AVX512 __attribute__((always_inline)) inline void store_tile_sums(
    __m512i (&acc)[MW][NW], int32_t* sums) {
#pragma GCC unroll 4
  for (int r = 0; r < MW; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) sums[r * NW + j] = hsum_wrap(acc[r][j]);
  }
}

template <int MW, int NW>
struct StreamTileVnni {
  FRUGAL_TARGET_AVX512_VNNI __attribute__((always_inline)) static inline void step(
      __m512i (&acc)[MW][NW], const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
      __mmask64 mask) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512i w[NW];
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) w[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, b + j * ldb), flip);
#pragma GCC unroll 4
    for (int r = 0; r < MW; ++r) {
      const __m512i av = _mm512_maskz_loadu_epi8(mask, a + r * lda);
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], w[j], av);
    }
  }

  FRUGAL_TARGET_AVX512_VNNI static void run(const int8_t* a, int64_t lda, const int8_t* b,
                                            int64_t ldb, int64_t K, int32_t* sums) {
    __m512i acc[MW][NW];
    zero_tiles(acc);
    int64_t k = 0;
    if constexpr (MW * NW <= 8) {
      // Few accumulators: a second set, so that consecutive vpdpbusd into one register (4-5
      // cycles apart) do not bound the loop.
      __m512i acc2[MW][NW];
      zero_tiles(acc2);
      for (; k + 128 <= K; k += 128) {
#pragma GCC unroll 4
        for (int j = 0; j < NW; ++j) {
          prefetch_stream(b + (NW + j) * ldb + k);
          prefetch_stream(b + (NW + j) * ldb + k + 64);
        }
        step(acc, a + k, lda, b + k, ldb, ~__mmask64{0});
        step(acc2, a + k + 64, lda, b + k + 64, ldb, ~__mmask64{0});
      }
#pragma GCC unroll 4
      for (int r = 0; r < MW; ++r) {
#pragma GCC unroll 4
        for (int j = 0; j < NW; ++j) acc[r][j] = _mm512_add_epi32(acc[r][j], acc2[r][j]);
      }
    }
    for (; k + 64 <= K; k += 64) {
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) {
        prefetch_stream(b + (NW + j) * ldb + k);
      }
      step(acc, a + k, lda, b + k, ldb, ~__mmask64{0});
    }
    if (k < K) step(acc, a + k, lda, b + k, ldb, (__mmask64{1} << (K - k)) - 1);
    store_tile_sums(acc, sums);
  }
};

template <int MW, int NW>
struct StreamTileAvx512 {
  FRUGAL_TARGET_AVX512 __attribute__((always_inline)) static inline void step(
      __m512i (&acc)[MW][NW], const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
      __mmask32 mask) {
    __m512i w[NW];
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) w[j] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, b + j * ldb));
#pragma GCC unroll 4
    for (int r = 0; r < MW; ++r) {
      const __m512i av = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, a + r * lda));
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) {
        acc[r][j] = _mm512_add_epi32(acc[r][j], _mm512_madd_epi16(av, w[j]));
      }
    }
  }

  FRUGAL_TARGET_AVX512 static void run(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
                                       int64_t K, int32_t* sums) {
    __m512i acc[MW][NW];
    zero_tiles(acc);
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) {
        prefetch_stream(b + (NW + j) * ldb + k);
      }
      step(acc, a + k, lda, b + k, ldb, ~__mmask32{0});
      step(acc, a + k + 32, lda, b + k + 32, ldb, ~__mmask32{0});
    }
    for (; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
      step(acc, a + k, lda, b + k, ldb, mask);
    }
    store_tile_sums(acc, sums);
  }
};

template <int MW, int NW>
struct StreamTileAvx2 {
  FRUGAL_TARGET_AVX2 __attribute__((always_inline)) static inline void step(
      __m256i (&acc)[MW][NW], const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb) {
    __m256i w[NW];
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) {
      w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j * ldb)));
    }
#pragma GCC unroll 4
    for (int r = 0; r < MW; ++r) {
      const __m256i av =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + r * lda)));
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) {
        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(av, w[j]));
      }
    }
  }

  FRUGAL_TARGET_AVX2 static void run(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
                                     int64_t K, int32_t* sums) {
    __m256i acc[MW][NW];
#pragma GCC unroll 4
    for (int r = 0; r < MW; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) acc[r][j] = _mm256_setzero_si256();
    }
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) step(acc, a + k, lda, b + k, ldb);
    if (k < K) {
      // The tail through zero-padded copies, as one more full step.
      int8_t bt[NW][16] = {}, at[MW][16] = {};
      for (int j = 0; j < NW; ++j) std::memcpy(bt[j], b + j * ldb + k, K - k);
      for (int r = 0; r < MW; ++r) std::memcpy(at[r], a + r * lda + k, K - k);
      step(acc, &at[0][0], 16, &bt[0][0], 16);
    }
#pragma GCC unroll 4
    for (int r = 0; r < MW; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) {
        const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc[r][j]),
                                        _mm256_extracti128_si256(acc[r][j], 1));
        const __m128i q = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
        sums[r * NW + j] = _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 1)));
      }
    }
  }
};

#endif  // FRUGAL_X86

}  // namespace frugal::cpu::int8_kernels
