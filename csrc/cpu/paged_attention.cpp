// paged_attention (decode) and paged_append on the CPU.
//
// Decode attention streams K and V from memory once and does little arithmetic per byte, so the
// kernel is shaped around the memory system. A work item is one sequence, a group of its kv
// heads and a token range. Each kv head is processed with its G = Hq / Hkv query heads
// together, so every K/V row is loaded once and used for all G. Tokens go in tiles of kTile:
// fp32 scores for the tile, one online-softmax step per query head (running max m, running sum
// l, accumulator rescaled by exp(m_old - m_new), exp vectorized), then acc += p * V. Row
// addresses come from the block table token by token, so every block size takes one path.
//
// Before computing a tile the item loads one byte of every cache line of the next tile (all its
// kv heads: with heads adjacent in the cache that is one contiguous span per token). Those loads
// have no dependents, so the core keeps many misses in flight; then it computes the current
// tile from L2. On this Zen 5 that made single-core decode 1.8x faster than software
// prefetches (which measured no better than none), and a group of kv heads per item was 1.5x
// faster than one kv head per item, whose rows are short strided pieces of each token's span.
// The two phases do not overlap: the touch loads retire in order, so each core spends the
// memory time, then the compute time (B=8, 4k context, fp32: about 2/3 and 1/3). Measured
// worse than this (B=8, 4k, fp32, interleaved A/B): software prefetch (T0 or T1/T2, in bulk,
// or a few lines at a time inside the compute loops, one or two tiles ahead, per head or in
// address order): 0.7-0.9x; touch loads spread through the compute loops: 0.5x; no touch with
// compute in address order (token-major over heads, for the hardware prefetcher): 0.65-0.8x;
// touching every 128 B or more: 0.6x; letting one thread touch at a time: 0.85x.
//
// Work split: let B' be the number of sequences with seq_len > 0 and want = threads *
// paged_min_items_per_thread. One item per sequence covers all kv heads and the whole attended range.
// When B' < want, each sequence's range is cut into partitions of paged_partition_tokens;
// when that still gives fewer than `want` items, the kv heads are cut into groups too. A
// partitioned item leaves its unnormalized (m, l, acc) per query head, and a second pass merges
// the partitions: M = max m_i, out = sum_i acc_i e^(m_i - M) / sum_i l_i e^(m_i - M). Items
// run longest first, taken from a shared counter, so a batch of mixed lengths balances.
//
// Score modifiers (frugal/score_mods.py; decode and prefill): the tile functions' kMods
// variants cap each tile's scores (c tanh(s / c)) and subtract the ALiBi bias
// slope |q_pos - k_pos| between the scores and the softmax. A call without modifiers runs the
// plain variants, which hold no trace of them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/isa.h"
#include "cpu/knobs.h"
#include "cpu/vec_load.h"
#include "cpu/vec_math.h"
#include "score_mods.h"

#if FRUGAL_X86
#include <immintrin.h>
#endif

namespace frugal::cpu {
namespace {

// The work split's constants are knobs (csrc/cpu/knobs.h), read on the calling thread:
// paged_partition_tokens (default 512), tokens per partition when the context is split
// (split-KV); paged_min_items_per_thread (default 4), split the work when it gives fewer items
// than this many per thread; paged_many_heads and paged_prefill_rows below.
// Tokens per tile: one AVX-512 vector of scores per query head.
constexpr int kTile = 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// Element (block, offset, head, d) of a cache is at base + block*s0 + offset*s1 + head*s2 + d.
template <typename T>
struct CacheView {
  T* base;
  int64_t s0, s1, s2;
  T* row(int64_t block, int64_t offset, int64_t head) const {
    return base + block * s0 + offset * s1 + head * s2;
  }
};

// One tile of tokens of one kv head: row addresses and, for int8 caches, scales (0 past n).
template <typename T>
struct Tile {
  const T* k[kTile];
  const T* v[kTile];
  float k_scale[kTile];
  float v_scale[kTile];
  int n;
  int64_t p0;  // position of the tile's first token
};

// The item's state for one kv head. q is pre-multiplied by the softmax scale; rows of q and acc
// are padded with zeros to Dp (a multiple of 16) floats.
struct State {
  int64_t G, D, Dp;
  float* q;    // [G, Dp]
  float* acc;  // [G, Dp]
  float* m;    // [G]
  float* l;    // [G]
  float* s;    // [G, kTile]: scores, then probabilities (times v_scale for int8)
  // Prefill: per row, the tile positions it may attend to (bit i: position i of the tile);
  // nullptr for decode, where every row sees the tile's n positions.
  const uint16_t* live = nullptr;
  // Score modifiers (frugal/score_mods.py), read by the tile functions' kMods variants only:
  // softcap (0: none); row r's ALiBi slope slope[r % group] (slope nullptr: none) and its
  // query position q_first + r / group (rows are token-major, `group` query heads a token).
  float softcap = 0.0f;
  const float* slope = nullptr;
  int64_t q_first = 0, group = 1;
};

// tanh_exp (vec_math.h): tanh through exp_neg, so that a loop over it vectorizes.

// The ALiBi bias of row r against tile position i: slope * |q_pos - k_pos|.
template <typename T>
inline float alibi_bias(const State& st, const Tile<T>& t, int64_t r, int i) {
  const int64_t dist = st.q_first + r / st.group - (t.p0 + i);
  return st.slope[r % st.group] * static_cast<float>(dist < 0 ? -dist : dist);
}

// Row r's score x against tile position i, modified: softcap, then the ALiBi bias.
template <typename T>
inline float modified(const State& st, const Tile<T>& t, int64_t r, int i, float x) {
  if (st.softcap > 0.0f) x = st.softcap * tanh_exp(x / st.softcap);
  return st.slope != nullptr ? x - alibi_bias(st, t, r, i) : x;
}

// The vector paths' modifier step, between the scores and the softmax: the tile's scores in
// natural scale (int8: times k_scale here, which their softmax then leaves out), modified; one
// loop per step, each simple enough to vectorize.
template <typename T>
void modify_scores(State& st, const Tile<T>& t) {
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  const float c = st.softcap;
  for (int64_t r = 0; r < st.G; ++r) {
    float* s = st.s + r * kTile;
    if constexpr (kInt8) {
      for (int i = 0; i < t.n; ++i) s[i] *= t.k_scale[i];
    }
    if (c > 0.0f) {
      for (int i = 0; i < t.n; ++i) s[i] = c * tanh_exp(s[i] / c);
    }
    if (st.slope != nullptr) {
      for (int i = 0; i < t.n; ++i) s[i] -= alibi_bias(st, t, r, i);
    }
  }
}

template <typename T>
using TileFn = void (*)(State&, const Tile<T>&);

// The vector kernels hold the accumulators of up to `widest` query heads in registers; a kv
// head's G query heads go in groups of the widest power of two that is left.
inline int64_t group_width(int64_t left, int64_t widest) {
  int64_t w = widest;
  while (w > left) w /= 2;
  return w;
}

// ----------------------------------------------------------------------------------------
// Scalar

template <typename T, bool kMods>
void tile_scalar(State& st, const Tile<T>& t) {
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  for (int64_t g = 0; g < st.G; ++g) {
    const float* q = st.q + g * st.Dp;
    float* s = st.s + g * kTile;
    const uint32_t live = st.live != nullptr ? st.live[g] : 0xFFFFu;
    float mx = -kInf;
    for (int i = 0; i < t.n; ++i) {
      if (!((live >> i) & 1u)) {
        s[i] = -kInf;
        continue;
      }
      float dot = 0.0f;
      for (int64_t d = 0; d < st.D; ++d) dot += q[d] * to_float(t.k[i][d]);
      s[i] = kInt8 ? dot * t.k_scale[i] : dot;
      if constexpr (kMods) s[i] = modified(st, t, g, i, s[i]);
      mx = std::max(mx, s[i]);
    }
    const float m_new = std::max(st.m[g], mx);
    // m_new == m_old (no new maximum, or nothing live yet) keeps the accumulator as it is.
    const float alpha = m_new == st.m[g] ? 1.0f : std::exp(st.m[g] - m_new);
    float sum = 0.0f;
    for (int i = 0; i < t.n; ++i) {
      s[i] = (live >> i) & 1u ? std::exp(s[i] - m_new) : 0.0f;
      sum += s[i];
      if (kInt8) s[i] *= t.v_scale[i];
    }
    st.l[g] = st.l[g] * alpha + sum;
    st.m[g] = m_new;
    float* acc = st.acc + g * st.Dp;
    for (int64_t d = 0; d < st.D; ++d) {
      float a = acc[d] * alpha;
      for (int i = 0; i < t.n; ++i) a += s[i] * to_float(t.v[i][d]);
      acc[d] = a;
    }
  }
}

#if FRUGAL_X86

// --- AVX-512 ---

inline __mmask16 lanes16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// GCC 12's intrinsic headers give the unused pass-through operand of these shuffles the value
// of itself (`__m512 __Y = __Y;`), which -Wuninitialized reports once they are inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
// The four sums of a0..a3, as one vector.
FRUGAL_TARGET_AVX512 inline __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 u = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#pragma GCC diagnostic pop

// Scores of query heads [g0, g0 + GN) for tokens [i0, i0 + TN) of the tile: each K chunk and
// each q chunk is loaded once for the TN x GN independent dot products.
// One 16-wide chunk of the scores block at d, its K loads masked to m.
template <int GN, int TN, typename T>
FRUGAL_TARGET_AVX512 inline void scores_chunk_avx512(__m512* a, const T* const* kr, const float* q,
                                                     int64_t Dp, int64_t d, __mmask16 m) {
  __m512 kv[TN];
#pragma GCC unroll 4
  for (int i = 0; i < TN; ++i) kv[i] = load16(kr[i] + d, m);
#pragma GCC unroll 4
  for (int j = 0; j < GN; ++j) {
    const __m512 qv = _mm512_loadu_ps(q + j * Dp + d);
#pragma GCC unroll 4
    for (int i = 0; i < TN; ++i) a[i * GN + j] = _mm512_fmadd_ps(qv, kv[i], a[i * GN + j]);
  }
}

template <int GN, int TN, typename T>
FRUGAL_TARGET_AVX512 inline void scores_block_avx512(State& st, const Tile<T>& t, int64_t g0,
                                                     int i0) {
  const float* q = st.q + g0 * st.Dp;
  const int64_t Dp = st.Dp, full = st.D & ~int64_t{15};
  // Row pointers in locals, full chunks unmasked: the loop body is loads and FMAs only.
  const T* kr[TN];
#pragma GCC unroll 4
  for (int i = 0; i < TN; ++i) kr[i] = t.k[i0 + i];
  __m512 a[TN * GN];
#pragma GCC unroll 16
  for (int x = 0; x < TN * GN; ++x) a[x] = _mm512_setzero_ps();
  for (int64_t d = 0; d < full; d += 16)
    scores_chunk_avx512<GN, TN>(a, kr, q, Dp, d, __mmask16(0xFFFF));
  if (full < st.D) scores_chunk_avx512<GN, TN>(a, kr, q, Dp, full, lanes16(st.D - full));
#pragma GCC unroll 4
  for (int j = 0; j < GN; ++j) {
    float* s = st.s + (g0 + j) * kTile + i0;
    if constexpr (TN == 4) {
      _mm_storeu_ps(s, hsum4(a[j], a[GN + j], a[2 * GN + j], a[3 * GN + j]));
    } else {
      s[0] = _mm512_reduce_add_ps(a[j]);
    }
  }
}

template <int GN, typename T>
FRUGAL_TARGET_AVX512 void scores_avx512(State& st, const Tile<T>& t, int64_t g0) {
  int i = 0;
  for (; i + 4 <= t.n; i += 4) scores_block_avx512<GN, 4>(st, t, g0, i);
  for (; i < t.n; ++i) scores_block_avx512<GN, 1>(st, t, g0, i);
}

// acc[g0 .. g0 + GN, chunks c0 .. c0 + DB) += sum over the tile of p * V: GN x DB independent
// accumulators, each V chunk loaded once.
template <int GN, int DB, typename T>
FRUGAL_TARGET_AVX512 inline void accumulate_block_avx512(State& st, const Tile<T>& t, int64_t g0,
                                                         int64_t c0) {
  float* acc = st.acc + g0 * st.Dp + 16 * c0;
  const float* p = st.s + g0 * kTile;
  __mmask16 m[DB];
  __m512 a[GN * DB];
#pragma GCC unroll 8
  for (int c = 0; c < DB; ++c) m[c] = lanes16(st.D - 16 * (c0 + c));
#pragma GCC unroll 8
  for (int j = 0; j < GN; ++j) {
#pragma GCC unroll 8
    for (int c = 0; c < DB; ++c) a[j * DB + c] = _mm512_loadu_ps(acc + j * st.Dp + 16 * c);
  }
  // Masks only where a chunk runs past D (its tail); full chunks load unmasked.
  const bool full = m[DB - 1] == 0xFFFF;
  const int n = t.n;
  for (int i = 0; i < n; ++i) {
    const T* vr = t.v[i] + 16 * c0;
    __m512 pv[GN];
#pragma GCC unroll 8
    for (int j = 0; j < GN; ++j) pv[j] = _mm512_set1_ps(p[j * kTile + i]);
#pragma GCC unroll 8
    for (int c = 0; c < DB; ++c) {
      const __m512 vv = full ? load16(vr + 16 * c, __mmask16(0xFFFF)) : load16(vr + 16 * c, m[c]);
#pragma GCC unroll 8
      for (int j = 0; j < GN; ++j) a[j * DB + c] = _mm512_fmadd_ps(pv[j], vv, a[j * DB + c]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < GN; ++j) {
#pragma GCC unroll 8
    for (int c = 0; c < DB; ++c) _mm512_storeu_ps(acc + j * st.Dp + 16 * c, a[j * DB + c]);
  }
}

template <int GN, typename T>
FRUGAL_TARGET_AVX512 void accumulate_avx512(State& st, const Tile<T>& t, int64_t g0) {
  constexpr int DB = GN >= 8 ? 2 : GN == 4 ? 4 : 8;
  const int64_t chunks = st.Dp / 16;
  int64_t c = 0;
  for (; c + DB <= chunks; c += DB) accumulate_block_avx512<GN, DB>(st, t, g0, c);
  for (; c < chunks; ++c) accumulate_block_avx512<GN, 1>(st, t, g0, c);
}

template <typename T, bool kMods>
FRUGAL_TARGET_AVX512 void softmax_avx512(State& st, const Tile<T>& t) {
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  const __mmask16 tile_live = lanes16(t.n);
  for (int64_t g = 0; g < st.G; ++g) {
    const __mmask16 live =
        st.live != nullptr ? static_cast<__mmask16>(tile_live & st.live[g]) : tile_live;
    float* s = st.s + g * kTile;
    __m512 x = _mm512_loadu_ps(s);
    if (kInt8 && !kMods) x = _mm512_mul_ps(x, _mm512_loadu_ps(t.k_scale));
    x = _mm512_mask_mov_ps(_mm512_set1_ps(-kInf), live, x);
    const float m_old = st.m[g];
    const float m_new = std::max(m_old, _mm512_reduce_max_ps(x));
    __m512 p = _mm512_maskz_mov_ps(live, exp16_clamped(_mm512_sub_ps(x, _mm512_set1_ps(m_new))));
    const float alpha =
        m_new == m_old ? 1.0f : _mm512_cvtss_f32(exp16_clamped(_mm512_set1_ps(m_old - m_new)));
    st.l[g] = st.l[g] * alpha + _mm512_reduce_add_ps(p);
    st.m[g] = m_new;
    if (kInt8) p = _mm512_maskz_mul_ps(live, p, _mm512_loadu_ps(t.v_scale));
    _mm512_storeu_ps(s, p);
    if (alpha != 1.0f) {
      float* acc = st.acc + g * st.Dp;
      const __m512 va = _mm512_set1_ps(alpha);
      for (int64_t d = 0; d < st.Dp; d += 16)
        _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), va));
    }
  }
}

template <typename T, bool kMods>
FRUGAL_TARGET_AVX512 void tile_avx512(State& st, const Tile<T>& t) {
  for (int64_t g0 = 0, w = 0; g0 < st.G; g0 += w) {
    switch (w = group_width(st.G - g0, 4)) {
      case 4:
        scores_avx512<4>(st, t, g0);
        break;
      case 2:
        scores_avx512<2>(st, t, g0);
        break;
      default:
        scores_avx512<1>(st, t, g0);
    }
  }
  if constexpr (kMods) modify_scores(st, t);
  softmax_avx512<T, kMods>(st, t);
  for (int64_t g0 = 0, w = 0; g0 < st.G; g0 += w) {
    switch (w = group_width(st.G - g0, 8)) {
      case 8:
        accumulate_avx512<8>(st, t, g0);
        break;
      case 4:
        accumulate_avx512<4>(st, t, g0);
        break;
      case 2:
        accumulate_avx512<2>(st, t, g0);
        break;
      default:
        accumulate_avx512<1>(st, t, g0);
    }
  }
}

// --- AVX2 ---

FRUGAL_TARGET_AVX2 inline float hsum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

FRUGAL_TARGET_AVX2 inline float hmax8(__m256 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Scores of query heads [g0, g0 + GN) for TN tokens from i0: GN x TN independent FMA chains
// (8 of the 16 ymm registers), each K chunk and each q chunk loaded once; full 8-float chunks
// unmasked, the tail masked. One token at a time (GN chains, 4 for GQA 4; and accumulate one
// V chunk at a time) left the loops bound by FMA latency. With both changes, FRUGAL_CPU_ISA=avx2
// on Zen 4, 2 threads, GQA 4, D 128, same run against SDPA: B=1 512 tokens 0.329 -> 0.286 ms,
// B=8 4096 tokens 13.6 -> 12.1 ms.
template <int GN, int TN, typename T>
FRUGAL_TARGET_AVX2 inline void scores_block_avx2(State& st, const Tile<T>& t, int64_t g0,
                                                 int i0) {
  const float* q = st.q + g0 * st.Dp;
  const int64_t Dp = st.Dp, full = st.D & ~int64_t{7};
  const T* kr[TN];
#pragma GCC unroll 4
  for (int i = 0; i < TN; ++i) kr[i] = t.k[i0 + i];
  __m256 a[TN * GN];
#pragma GCC unroll 8
  for (int x = 0; x < TN * GN; ++x) a[x] = _mm256_setzero_ps();
  const auto chunk = [&](int64_t d, bool tail) FRUGAL_TARGET_AVX2 {
    __m256 kv[TN];
#pragma GCC unroll 4
    for (int i = 0; i < TN; ++i) kv[i] = tail ? load8(kr[i] + d, st.D - d) : load8(kr[i] + d);
#pragma GCC unroll 8
    for (int j = 0; j < GN; ++j) {
      const __m256 qv = _mm256_loadu_ps(q + j * Dp + d);
#pragma GCC unroll 4
      for (int i = 0; i < TN; ++i) a[i * GN + j] = _mm256_fmadd_ps(qv, kv[i], a[i * GN + j]);
    }
  };
  for (int64_t d = 0; d < full; d += 8) chunk(d, false);
  if (full < st.D) chunk(full, true);
#pragma GCC unroll 8
  for (int j = 0; j < GN; ++j) {
#pragma GCC unroll 4
    for (int i = 0; i < TN; ++i) st.s[(g0 + j) * kTile + i0 + i] = hsum8(a[i * GN + j]);
  }
}

template <int GN, typename T>
FRUGAL_TARGET_AVX2 void scores_avx2(State& st, const Tile<T>& t, int64_t g0) {
  constexpr int TN = GN >= 8 ? 1 : 8 / GN > 4 ? 4 : 8 / GN;  // GN x TN = 8 chains (4 for GN 1)
  int i = 0;
  for (; i + TN <= t.n; i += TN) scores_block_avx2<GN, TN>(st, t, g0, i);
  for (; i < t.n; ++i) scores_block_avx2<GN, 1>(st, t, g0, i);
}

// acc[g0 .. g0 + GN) += sum over the tile of p * V, DB chunks of 8 floats at a time: GN x DB
// independent FMA chains (8 for GN <= 4), each V chunk loaded once.
template <int GN, int DB, typename T>
FRUGAL_TARGET_AVX2 inline void accumulate_block_avx2(State& st, const Tile<T>& t, int64_t g0,
                                                     int64_t d0) {
  float* acc = st.acc + g0 * st.Dp + d0;
  const float* p = st.s + g0 * kTile;
  __m256 a[GN * DB];
#pragma GCC unroll 8
  for (int j = 0; j < GN; ++j) {
#pragma GCC unroll 4
    for (int c = 0; c < DB; ++c) a[j * DB + c] = _mm256_loadu_ps(acc + j * st.Dp + 8 * c);
  }
  for (int i = 0; i < t.n; ++i) {
    __m256 vv[DB];
#pragma GCC unroll 4
    for (int c = 0; c < DB; ++c) vv[c] = load8(t.v[i] + d0 + 8 * c, st.D - d0 - 8 * c);
#pragma GCC unroll 8
    for (int j = 0; j < GN; ++j) {
      const __m256 pv = _mm256_set1_ps(p[j * kTile + i]);
#pragma GCC unroll 4
      for (int c = 0; c < DB; ++c) a[j * DB + c] = _mm256_fmadd_ps(pv, vv[c], a[j * DB + c]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < GN; ++j) {
#pragma GCC unroll 4
    for (int c = 0; c < DB; ++c) _mm256_storeu_ps(acc + j * st.Dp + 8 * c, a[j * DB + c]);
  }
}

template <int GN, typename T>
FRUGAL_TARGET_AVX2 void accumulate_avx2(State& st, const Tile<T>& t, int64_t g0) {
  constexpr int DB = GN >= 8 ? 1 : 8 / GN > 4 ? 4 : 8 / GN;
  const int64_t chunks_end = (st.D + 7) & ~int64_t{7};  // every chunk starts below D
  int64_t d = 0;
  for (; d + 8 * DB <= chunks_end; d += 8 * DB) accumulate_block_avx2<GN, DB>(st, t, g0, d);
  for (; d < chunks_end; d += 8) accumulate_block_avx2<GN, 1>(st, t, g0, d);
}

template <typename T, bool kMods>
FRUGAL_TARGET_AVX2 void softmax_avx2(State& st, const Tile<T>& t) {
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  const __m256 index = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 tile_live[2] = {_mm256_cmp_ps(index, _mm256_set1_ps(t.n), _CMP_LT_OQ),
                               _mm256_cmp_ps(index, _mm256_set1_ps(t.n - 8), _CMP_LT_OQ)};
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 neg_inf = _mm256_set1_ps(-kInf);
  for (int64_t g = 0; g < st.G; ++g) {
    __m256 live[2] = {tile_live[0], tile_live[1]};
    if (st.live != nullptr) {
      for (int h = 0; h < 2; ++h) {
        const __m256i on = _mm256_and_si256(_mm256_set1_epi32(st.live[g] >> (8 * h)), bit);
        live[h] = _mm256_and_ps(
            live[h], _mm256_castsi256_ps(_mm256_cmpeq_epi32(on, bit)));
      }
    }
    float* s = st.s + g * kTile;
    __m256 x[2];
    for (int h = 0; h < 2; ++h) {
      x[h] = _mm256_loadu_ps(s + 8 * h);
      if (kInt8 && !kMods) x[h] = _mm256_mul_ps(x[h], _mm256_loadu_ps(t.k_scale + 8 * h));
      x[h] = _mm256_blendv_ps(neg_inf, x[h], live[h]);
    }
    const float m_old = st.m[g];
    const float m_new = std::max(m_old, hmax8(_mm256_max_ps(x[0], x[1])));
    __m256 p[2];
    for (int h = 0; h < 2; ++h)
      p[h] = _mm256_and_ps(live[h], exp8_clamped(_mm256_sub_ps(x[h], _mm256_set1_ps(m_new))));
    const float alpha =
        m_new == m_old ? 1.0f : _mm256_cvtss_f32(exp8_clamped(_mm256_set1_ps(m_old - m_new)));
    st.l[g] = st.l[g] * alpha + hsum8(_mm256_add_ps(p[0], p[1]));
    st.m[g] = m_new;
    for (int h = 0; h < 2; ++h) {
      if (kInt8)
        p[h] = _mm256_and_ps(live[h], _mm256_mul_ps(p[h], _mm256_loadu_ps(t.v_scale + 8 * h)));
      _mm256_storeu_ps(s + 8 * h, p[h]);
    }
    if (alpha != 1.0f) {
      float* acc = st.acc + g * st.Dp;
      const __m256 va = _mm256_set1_ps(alpha);
      for (int64_t d = 0; d < st.Dp; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), va));
    }
  }
}

template <typename T, bool kMods>
FRUGAL_TARGET_AVX2 void tile_avx2(State& st, const Tile<T>& t) {
  for (int64_t g0 = 0, w = 0; g0 < st.G; g0 += w) {
    switch (w = group_width(st.G - g0, 8)) {
      case 8:
        scores_avx2<8>(st, t, g0);
        break;
      case 4:
        scores_avx2<4>(st, t, g0);
        break;
      case 2:
        scores_avx2<2>(st, t, g0);
        break;
      default:
        scores_avx2<1>(st, t, g0);
    }
  }
  if constexpr (kMods) modify_scores(st, t);
  softmax_avx2<T, kMods>(st, t);
  for (int64_t g0 = 0, w = 0; g0 < st.G; g0 += w) {
    switch (w = group_width(st.G - g0, 8)) {
      case 8:
        accumulate_avx2<8>(st, t, g0);
        break;
      case 4:
        accumulate_avx2<4>(st, t, g0);
        break;
      case 2:
        accumulate_avx2<2>(st, t, g0);
        break;
      default:
        accumulate_avx2<1>(st, t, g0);
    }
  }
}

#endif  // FRUGAL_X86

// The tile function of the current ISA; with `mods`, its variant that applies the score
// modifiers (the plain one pays nothing for them).
template <typename T, bool kMods>
TileFn<T> pick_tile_isa() {
#if FRUGAL_X86
  const Isa isa = current_isa();
  if (isa >= Isa::kAvx512) return &tile_avx512<T, kMods>;
  if (isa >= Isa::kAvx2) return &tile_avx2<T, kMods>;
#endif
  return &tile_scalar<T, kMods>;
}

template <typename T>
TileFn<T> pick_tile(bool mods) {
  return mods ? pick_tile_isa<T, true>() : pick_tile_isa<T, false>();
}

// ----------------------------------------------------------------------------------------
// Driver

struct Item {
  int64_t b, h0, hn, lo, hi;  // kv heads [h0, h0 + hn) of sequence b, tokens [lo, hi)
  int64_t slot;               // partial-result slot of head h0 (the others follow), or -1:
                              // the item covers the whole range and writes the output
};

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// Per-thread scratch: a State per kv head of an item and two tiles (current, next) per head;
// prefill's per-row position masks.
template <typename T>
struct Workspace {
  std::unique_ptr<float, FreeDeleter> buf;
  std::vector<State> states;
  std::vector<Tile<T>> tiles;
  std::vector<uint16_t> live;
};

template <typename QT, typename T>
struct Problem {
  using Cache = T;
  const QT* q;
  int64_t q_s0, q_s1, q_s2;
  QT* out;  // [B, Hq, D], contiguous
  CacheView<const T> k, v;
  CacheView<const float> k_scale, v_scale;  // int8 caches only
  const int32_t* tables;
  int64_t table_s0, table_s1;
  int block_shift;
  int64_t Hq, G, D, Dp;
  float scale;
  float softcap;        // 0: none
  const float* alibi;   // [B, Hq] ALiBi slopes, or nullptr
  const int32_t* lens;  // [B]
  float* partial;  // per slot: m [G], l [G], acc [G, D]
  float* lse;      // [rows, Hq] fp32: log-sum-exp of each row's scaled scores, or nullptr
  TileFn<T> tile;

  int64_t partial_floats() const { return G * (2 + D); }

  // Tokens [p0, p0 + n) of sequence b for kv heads [h0, h0 + hn), one tile per head.
  void fill(Tile<T>* t, int64_t b, int64_t h0, int64_t hn, int64_t p0, int n) const {
    constexpr bool kInt8 = std::is_same_v<T, int8_t>;
    const int32_t* row = tables + b * table_s0;
    const int64_t mask = (int64_t{1} << block_shift) - 1;
    for (int64_t hh = 0; hh < hn; ++hh) {
      t[hh].n = n;
      t[hh].p0 = p0;
    }
    for (int i = 0; i < n; ++i) {
      const int64_t pos = p0 + i;
      const int64_t block = row[(pos >> block_shift) * table_s1];
      const int64_t offset = pos & mask;
      for (int64_t hh = 0; hh < hn; ++hh) {
        t[hh].k[i] = k.row(block, offset, h0 + hh);
        t[hh].v[i] = v.row(block, offset, h0 + hh);
        if (kInt8) {
          t[hh].k_scale[i] = *k_scale.row(block, offset, h0 + hh);
          t[hh].v_scale[i] = *v_scale.row(block, offset, h0 + hh);
        }
      }
    }
    for (int64_t hh = 0; hh < hn; ++hh)
      for (int i = n; i < kTile; ++i) t[hh].k_scale[i] = t[hh].v_scale[i] = 0.0f;
  }

  // Loads a byte of every cache line of the K and V rows of the tiles (see the top comment).
  void touch(const Tile<T>* t, int64_t hn) const {
    const bool adjacent = k.s2 == D && v.s2 == D;
    const int64_t spans = adjacent ? 1 : hn;
    const int64_t bytes = (adjacent ? hn : 1) * D * static_cast<int64_t>(sizeof(T));
    unsigned char sink = 0;
    for (int64_t hh = 0; hh < spans; ++hh) {
      for (int i = 0; i < t[hh].n; ++i) {
        const auto* kr = reinterpret_cast<const unsigned char*>(t[hh].k[i]);
        const auto* vr = reinterpret_cast<const unsigned char*>(t[hh].v[i]);
        for (int64_t o = 0; o < bytes; o += 64) sink |= kr[o] | vr[o];
        sink |= kr[bytes - 1] | vr[bytes - 1];
      }
    }
    asm volatile("" : : "r"(sink));
  }

  // The modifiers of the G query heads of kv head h of sequence b, at query position q_pos.
  void set_mods(State& st, int64_t b, int64_t h, int64_t q_pos) const {
    st.softcap = softcap;
    st.slope = alibi != nullptr ? alibi + b * Hq + h * G : nullptr;
    st.q_first = q_pos;
    st.group = G;
  }

  void run(const Item& it, Workspace<T>& ws) const {
    for (int64_t hh = 0; hh < it.hn; ++hh) {
      State& st = ws.states[hh];
      set_mods(st, it.b, it.h0 + hh, lens[it.b] - 1);
      const QT* qh = q + it.b * q_s0 + (it.h0 + hh) * G * q_s1;
      for (int64_t g = 0; g < G; ++g) {
        float* qr = st.q + g * Dp;
        for (int64_t d = 0; d < D; ++d) qr[d] = to_float(qh[g * q_s1 + d * q_s2]) * scale;
        std::fill(qr + D, qr + Dp, 0.0f);
        st.m[g] = -kInf;
        st.l[g] = 0.0f;
      }
      std::fill(st.acc, st.acc + G * Dp, 0.0f);
    }
    Tile<T>* cur = ws.tiles.data();
    Tile<T>* next = cur + it.hn;
    fill(cur, it.b, it.h0, it.hn, it.lo, static_cast<int>(std::min<int64_t>(kTile, it.hi - it.lo)));
    touch(cur, it.hn);
    for (int64_t p0 = it.lo; p0 < it.hi; p0 += kTile) {
      const int64_t p1 = p0 + kTile;
      fill(next, it.b, it.h0, it.hn, p1,
           static_cast<int>(std::clamp<int64_t>(it.hi - p1, 0, kTile)));
      touch(next, it.hn);
      for (int64_t hh = 0; hh < it.hn; ++hh) tile(ws.states[hh], cur[hh]);
      std::swap(cur, next);
    }

    for (int64_t hh = 0; hh < it.hn; ++hh) {
      const State& st = ws.states[hh];
      if (it.slot >= 0) {
        float* dst = partial + (it.slot + hh) * partial_floats();
        std::copy(st.m, st.m + G, dst);
        std::copy(st.l, st.l + G, dst + G);
        for (int64_t g = 0; g < G; ++g)
          std::copy(st.acc + g * Dp, st.acc + g * Dp + D, dst + 2 * G + g * D);
        continue;
      }
      QT* o = out + (it.b * Hq + (it.h0 + hh) * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.0f / st.l[g];
        for (int64_t d = 0; d < D; ++d) o[g * D + d] = static_cast<QT>(st.acc[g * Dp + d] * inv);
      }
      if (lse != nullptr) {
        float* row = lse + it.b * Hq + (it.h0 + hh) * G;
        for (int64_t g = 0; g < G; ++g) row[g] = st.m[g] + std::log(st.l[g]);
      }
    }
  }

  // Log-sum-exp merge of kv head h's `parts` partial results (slots first + i * Hkv).
  void merge(int64_t b, int64_t h, int64_t first, int64_t parts, int64_t Hkv,
             std::vector<float>& buf) const {
    buf.assign(D + parts, 0.0f);
    float* sum = buf.data();
    float* w = buf.data() + D;
    QT* o = out + (b * Hq + h * G) * D;
    for (int64_t g = 0; g < G; ++g) {
      float M = -kInf;
      for (int64_t i = 0; i < parts; ++i)
        M = std::max(M, partial[(first + i * Hkv) * partial_floats() + g]);
      float L = 0.0f;
      std::fill(sum, sum + D, 0.0f);
      for (int64_t i = 0; i < parts; ++i) {
        const float* p = partial + (first + i * Hkv) * partial_floats();
        w[i] = std::exp(p[g] - M);
        L += p[G + g] * w[i];
        const float* acc = p + 2 * G + g * D;
        for (int64_t d = 0; d < D; ++d) sum[d] += acc[d] * w[i];
      }
      const float inv = 1.0f / L;
      for (int64_t d = 0; d < D; ++d) o[g * D + d] = static_cast<QT>(sum[d] * inv);
      if (lse != nullptr) lse[b * Hq + h * G + g] = M + std::log(L);
    }
  }
};

// Runs the items on every thread, in order, each thread taking the next from a counter. Each
// thread's workspace has `max_heads` States of `rows` query rows (decode: G per kv head).
template <typename P, typename I>
void run_items(const P& pb, const std::vector<I>& items, int64_t max_heads, int64_t rows) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    const int64_t per_head = 2 * rows * pb.Dp + rows * (2 + kTile);
    const size_t bytes = (max_heads * per_head * sizeof(float) + 63) / 64 * 64;
    Workspace<typename P::Cache> ws;
    ws.buf.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(ws.buf != nullptr, "paged_attention: out of memory for ", bytes,
                " bytes of scratch");
    for (int64_t hh = 0; hh < max_heads; ++hh) {
      float* base = ws.buf.get() + hh * per_head;
      float* m = base + 2 * rows * pb.Dp;
      ws.states.push_back(
          {rows, pb.D, pb.Dp, base, base + rows * pb.Dp, m, m + rows, m + 2 * rows});
    }
    ws.tiles.resize(2 * max_heads);
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) pb.run(items[i], ws);
  });
}

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

bool is_cache_dtype(at::ScalarType t) { return is_float(t) || t == at::kChar; }

// log2 of a power-of-two block size in [1, 256], checked.
int block_shift(const char* op, int64_t bs) {
  TORCH_CHECK(bs >= 1 && bs <= 256 && (bs & (bs - 1)) == 0, op,
              ": block_size (k_cache.size(1)) must be a power of two from 1 to 256; got ", bs);
  int shift = 0;
  while ((int64_t{1} << shift) < bs) ++shift;
  return shift;
}

void check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& k_scale,
                  const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(k_cache.dim() == 4, op,
              ": k_cache must be 4-d [num_blocks, block_size, num_kv_heads, "
              "head_dim]; got shape ",
              k_cache.sizes());
  TORCH_CHECK(is_cache_dtype(k_cache.scalar_type()), op,
              ": k_cache must be float32, float16, bfloat16 or int8; got ",
              dtype_name(k_cache.scalar_type()));
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
              k_cache.sizes(), "; got ", v_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op,
              ": v_cache must have k_cache's dtype ", dtype_name(k_cache.scalar_type()), "; got ",
              dtype_name(v_cache.scalar_type()));
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu(), op,
              ": k_cache and v_cache must be CPU tensors; got ", k_cache.device(), " and ",
              v_cache.device());
  TORCH_CHECK(k_cache.size(2) >= 1, op, ": num_kv_heads (k_cache.size(2)) must be >= 1; got ",
              k_cache.size(2));
  for (const auto* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->size(3) <= 1 || c->stride(3) == 1, op, ": ",
                c == &k_cache ? "k_cache" : "v_cache",
                " must have unit stride along head_dim; got strides ", c->strides());
  }
  const bool int8 = k_cache.scalar_type() == at::kChar;
  for (const auto& [name, s] :
       {std::pair<const char*, const std::optional<at::Tensor>*>{"k_scale", &k_scale},
        {"v_scale", &v_scale}}) {
    if (!int8) {
      TORCH_CHECK(!s->has_value(), op, ": ", name, " is only for int8 caches; k_cache is ",
                  dtype_name(k_cache.scalar_type()));
      continue;
    }
    TORCH_CHECK(s->has_value(), op, ": int8 caches need ", name,
                " (float32 [num_blocks, block_size, num_kv_heads]); got None");
    const at::Tensor& t = **s;
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32; got ",
                dtype_name(t.scalar_type()));
    TORCH_CHECK(t.dim() == 3 && t.sizes() == k_cache.sizes().slice(0, 3), op, ": ", name,
                " must have shape ", k_cache.sizes().slice(0, 3), " (k_cache.shape[:3]); got ",
                t.sizes());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor; got ", t.device());
  }
}

template <typename T>
CacheView<T> view(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// Calls fn(QT{}, T{}) with the C++ types of a float q dtype and a cache dtype (both checked).
template <typename F>
void dispatch_types(at::ScalarType q_dtype, at::ScalarType cache_dtype, const F& fn) {
  const auto with_cache = [&](auto qt) {
    switch (cache_dtype) {
      case at::kFloat:
        return fn(qt, float{});
      case at::kHalf:
        return fn(qt, c10::Half{});
      case at::kBFloat16:
        return fn(qt, c10::BFloat16{});
      default:
        return fn(qt, int8_t{});
    }
  };
  switch (q_dtype) {
    case at::kFloat:
      return with_cache(float{});
    case at::kHalf:
      return with_cache(c10::Half{});
    default:
      return with_cache(c10::BFloat16{});
  }
}

// Sequence b's attended range is [lo[b], hi[b]); hi[b] == 0 for an empty sequence.
struct Plan {
  std::vector<Item> items;
  std::vector<std::array<int64_t, 3>> merges;  // (sequence, first slot, partitions)
  int64_t slots = 0;
  int64_t max_heads = 0;
};

// With many query heads per kv head (G > paged_many_heads, default 16: a cascade's prefix
// pass, its group's queries folded into the heads), an item's work is compute, not memory: when
// one item per sequence and kv head is enough work, the heads are split alone, sparing the
// partition merge.
Plan plan_work(const std::vector<int64_t>& lo, const std::vector<int64_t>& hi, int64_t Hkv,
               int64_t G) {
  const int64_t partition_tokens = knob(Knob::paged_partition_tokens);
  const int64_t many_heads = knob(Knob::paged_many_heads);
  const int64_t want = at::get_num_threads() * knob(Knob::paged_min_items_per_thread);
  int64_t active = 0, partitions = 0;
  for (size_t b = 0; b < hi.size(); ++b) {
    if (hi[b] == 0) continue;
    ++active;
    partitions += (hi[b] - lo[b] + partition_tokens - 1) / partition_tokens;
  }
  const bool split = active < want && !(G > many_heads && active * Hkv >= want);
  const int64_t units = split ? partitions : active;
  const int64_t groups =
      units >= want ? 1 : std::min(Hkv, (want + units - 1) / std::max<int64_t>(units, 1));
  const int64_t hn = (Hkv + groups - 1) / groups;
  Plan plan;
  plan.max_heads = hn;
  for (size_t b = 0; b < hi.size(); ++b) {
    if (hi[b] == 0) continue;
    const int64_t parts = split ? (hi[b] - lo[b] + partition_tokens - 1) / partition_tokens : 1;
    if (parts > 1) plan.merges.push_back({static_cast<int64_t>(b), plan.slots, parts});
    for (int64_t i = 0; i < parts; ++i) {
      const int64_t p0 = lo[b] + i * partition_tokens;
      const int64_t p1 = parts == 1 ? hi[b] : std::min(hi[b], p0 + partition_tokens);
      for (int64_t h = 0; h < Hkv; h += hn) {
        const int64_t n = std::min(hn, Hkv - h);
        plan.items.push_back({static_cast<int64_t>(b), h, n, p0, p1, parts > 1 ? plan.slots : -1});
        if (parts > 1) plan.slots += n;
      }
    }
  }
  std::stable_sort(plan.items.begin(), plan.items.end(), [](const Item& x, const Item& y) {
    return (x.hi - x.lo) * x.hn > (y.hi - y.lo) * y.hn;
  });
  return plan;
}

// The score modifiers of a call, checked (check_mods).
struct Mods {
  double softcap;
  const float* alibi;
};

// The call's score modifiers, checked (alibi_slopes on the CPU).
Mods check_mods(const char* op, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                int64_t B, int64_t Hq) {
  check_score_mods(op, softcap, alibi_slopes, B, Hq);
  if (!alibi_slopes.has_value()) return {softcap, nullptr};
  TORCH_CHECK(alibi_slopes->device().is_cpu(), op, ": alibi_slopes must be a CPU tensor; got ",
              alibi_slopes->device());
  return {softcap, alibi_slopes->data_ptr<float>()};
}

// The fields decode and prefill share: q [rows, Hq, D] (any strides), out [rows, Hq, D]
// (contiguous), the caches, tables, lengths, scale and score modifiers.
template <typename QT, typename T>
void init_problem(Problem<QT, T>& pb, const at::Tensor& q, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& tables, const int32_t* lens,
                  int shift, double scale, const Mods& mods,
                  const std::optional<at::Tensor>& k_scale,
                  const std::optional<at::Tensor>& v_scale, at::Tensor& out) {
  pb.q = static_cast<const QT*>(q.data_ptr());
  pb.q_s0 = q.stride(0);
  pb.q_s1 = q.stride(1);
  pb.q_s2 = q.stride(2);
  pb.out = static_cast<QT*>(out.data_ptr());
  pb.k = view<const T>(k_cache);
  pb.v = view<const T>(v_cache);
  if (k_scale.has_value()) {
    pb.k_scale = view<const float>(*k_scale);
    pb.v_scale = view<const float>(*v_scale);
  } else {
    pb.k_scale = pb.v_scale = {nullptr, 0, 0, 0};
  }
  pb.tables = tables.data_ptr<int32_t>();
  pb.table_s0 = tables.stride(0);
  pb.table_s1 = tables.stride(1);
  pb.block_shift = shift;
  const int64_t Hkv = k_cache.size(2);
  pb.Hq = q.size(1);
  pb.G = pb.Hq / Hkv;
  pb.D = q.size(2);
  pb.Dp = (pb.D + 15) / 16 * 16;
  pb.scale = static_cast<float>(scale);
  pb.softcap = static_cast<float>(mods.softcap);
  pb.alibi = mods.alibi;
  pb.lens = lens;
  pb.tile = pick_tile<T>(pb.softcap > 0.0f || pb.alibi != nullptr);
  pb.partial = nullptr;
  pb.lse = nullptr;
}

template <typename QT, typename T>
void paged_attention_typed(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& tables,
                           const int32_t* lens, int shift, const Plan& plan, double scale,
                           const Mods& mods, const std::optional<at::Tensor>& k_scale,
                           const std::optional<at::Tensor>& v_scale, at::Tensor& out, float* lse) {
  Problem<QT, T> pb;
  init_problem(pb, q, k_cache, v_cache, tables, lens, shift, scale, mods, k_scale, v_scale, out);
  pb.lse = lse;
  const int64_t Hkv = k_cache.size(2);
  std::vector<float> partial(plan.slots * pb.partial_floats());
  pb.partial = partial.data();
  run_items(pb, plan.items, plan.max_heads, pb.G);
  at::parallel_for(0, static_cast<int64_t>(plan.merges.size()) * Hkv, 1,
                   [&](int64_t begin, int64_t end) {
                     std::vector<float> buf;
                     for (int64_t i = begin; i < end; ++i) {
                       const auto& [b, first, parts] = plan.merges[i / Hkv];
                       const int64_t h = i % Hkv;
                       pb.merge(b, h, first + h, parts, Hkv, buf);
                     }
                   });
}

// q float [rows, Hq, D] on the CPU with the caches' head_dim and a multiple of their kv heads;
// block_tables int32 [B, max_blocks] and seq_lens int32 [B] on the CPU.
void check_query_and_tables(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            int64_t B) {
  TORCH_CHECK(is_float(q.scalar_type()), op, ": q must be float32, float16 or bfloat16; got ",
              dtype_name(q.scalar_type()));
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor; got ", q.device());
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(D == k_cache.size(3), op, ": q's head_dim (last dim) must be k_cache's ",
              k_cache.size(3), "; got ", D);
  TORCH_CHECK(Hq % Hkv == 0, op, ": q's head count ", Hq,
              " must be a multiple of k_cache's num_kv_heads ", Hkv);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt, op, ": block_tables must be int32; got ",
              dtype_name(block_tables.scalar_type()));
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B, op, ": block_tables must be [",
              B, ", max_blocks] (one row per sequence); got shape ", block_tables.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, op, ": seq_lens must be int32; got ",
              dtype_name(seq_lens.scalar_type()));
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, op, ": seq_lens must have shape (", B,
              ",); got ", seq_lens.sizes());
  TORCH_CHECK(block_tables.device().is_cpu() && seq_lens.device().is_cpu(), op,
              ": block_tables and seq_lens must be CPU tensors; got ", block_tables.device(),
              " and ", seq_lens.device());
}

// a * b for a, b >= 0, or INT64_MAX when that overflows (a stride-0 view can have any size).
int64_t saturating_mul(int64_t a, int64_t b) {
  int64_t out = 0;
  return c10::mul_overflows(a, b, &out) ? std::numeric_limits<int64_t>::max() : out;
}

// seq_lens[b] = len fits in its table row.
void check_seq_len(const char* op, const at::Tensor& block_tables, const at::Tensor& k_cache,
                   int64_t b, int64_t len) {
  const int64_t width = block_tables.size(1), bs = k_cache.size(1);
  const int64_t capacity = saturating_mul(width, bs);
  TORCH_CHECK(len >= 0 && len <= capacity, op, ": seq_lens[", b, "] must be in [0, ", capacity,
              "] (block_tables rows hold ", width, " blocks of ", bs, " tokens); got ", len);
}

// Every table entry of sequence b covering positions [lo, len) (len >= 1) names a block.
void check_entries(const char* op, const at::Tensor& block_tables, const at::Tensor& k_cache,
                   int shift, int64_t b, int64_t lo, int64_t len, int64_t window) {
  const int32_t* table = block_tables.data_ptr<int32_t>();
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1);
  for (int64_t j = lo >> shift; j <= (len - 1) >> shift; ++j) {
    const int64_t e = table[b * block_tables.stride(0) + j * block_tables.stride(1)];
    TORCH_CHECK(e >= 0 && e < num_blocks, op, ": block_tables[", b, ", ", j, "] must be in [0, ",
                num_blocks, ") (num_blocks): sequence ", b, " reads positions ", j * bs, "..",
                j * bs + bs - 1, " (seq_len ", len, ", window ", window, "); got ", e);
  }
}

// Decode, with the log-sum-exp of every (sequence, query head) row when `with_lse` (natural
// log of the sum of exp of the scaled scores; -inf for a sequence of length 0).
std::tuple<at::Tensor, at::Tensor> paged_attention_impl(
    const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, bool with_lse) {
  check_caches(op, k_cache, v_cache, k_scale, v_scale);
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-d [batch, num_heads, head_dim]; got shape ",
              q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  check_query_and_tables(op, q, k_cache, block_tables, seq_lens, B);
  const Mods mods = check_mods(op, softcap, alibi_slopes, B, Hq);
  const int shift = block_shift(op, k_cache.size(1));

  at::Tensor out = at::empty({B, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse;
  if (with_lse) lse = at::empty({B, Hq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    if (with_lse) lse.fill_(-kInf);
    return {out, lse};
  }
  const at::Tensor lens_t = seq_lens.contiguous();
  const int32_t* lens = lens_t.data_ptr<int32_t>();

  // Every length and every table entry the attended positions need, before anything runs.
  std::vector<int64_t> lo(B), hi(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b];
    check_seq_len(op, block_tables, k_cache, b, len);
    hi[b] = len;
    lo[b] = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    if (len == 0) {
      out.select(0, b).zero_();
      if (with_lse) lse.select(0, b).fill_(-kInf);
      continue;
    }
    check_entries(op, block_tables, k_cache, shift, b, lo[b], len, window);
  }

  const Plan plan = plan_work(lo, hi, Hkv, Hq / Hkv);
  dispatch_types(q.scalar_type(), k_cache.scalar_type(), [&](auto qt, auto ct) {
    paged_attention_typed<decltype(qt), decltype(ct)>(q, k_cache, v_cache, block_tables, lens,
                                                      shift, plan, scale, mods, k_scale, v_scale,
                                                      out,
                                                      with_lse ? lse.data_ptr<float>() : nullptr);
  });
  return {out, lse};
}

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_tables,
                               const at::Tensor& seq_lens, double scale, int64_t window,
                               const std::optional<at::Tensor>& k_scale,
                               const std::optional<at::Tensor>& v_scale, double softcap,
                               const std::optional<at::Tensor>& alibi_slopes) {
  return std::get<0>(paged_attention_impl("paged_attention", q, k_cache, v_cache, block_tables,
                                          seq_lens, scale, window, k_scale, v_scale, softcap,
                                          alibi_slopes, false));
}

std::tuple<at::Tensor, at::Tensor> paged_attention_lse_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  return paged_attention_impl("paged_attention_lse", q, k_cache, v_cache, block_tables, seq_lens,
                              scale, window, k_scale, v_scale, softcap, alibi_slopes, true);
}

// ----------------------------------------------------------------------------------------
// paged_prefill_attention
//
// The queries of a chunk (sequence b owns q rows [cu[b], cu[b + 1]), n_b of them, at positions
// [seq_len - n_b, seq_len)) attend to their cached prefix and causally within the chunk; the
// chunk's own keys and values are already in the cache. Prefill does ~T times the arithmetic of
// decode per K/V byte, so the kernel is shaped around reuse: a work item is one sequence, one kv
// head and a q tile of TQ consecutive chunk tokens, whose TQ x G query rows (token-major, the G
// query heads of the kv head together) share every K/V tile load. The item walks the positions
// its rows read, from the window start of its first token to its last token, in tiles of kTile
// through the decode kernel's tile step (scores, online softmax, acc += P V, the same vector
// code per ISA); each row carries a 16-bit mask of the tile positions it sees (causal limit and
// window), so the positions past a row's own are skipped by the softmax (weight 0) and a row
// with nothing live in a tile keeps its state. TQ = paged_prefill_rows / G rows fit the scratch
// in L2; when that gives fewer than threads * paged_min_items_per_thread items, TQ is halved (down to 1 token)
// so that short chunks still fill every core. There is no split-KV: an item covers its whole
// span, so one long sequence with a one-token chunk and one kv head runs on one thread.

// Query rows per prefill item: TQ = paged_prefill_rows (a knob, default 64) / G tokens, at
// least one.

struct PrefillItem {
  int64_t b, h, t0, tn;  // chunk tokens [t0, t0 + tn) of sequence b, kv head h
  int64_t work;          // tokens x attended span: items run largest first
};

template <typename QT, typename T>
struct PrefillProblem : Problem<QT, T> {
  const int32_t* cu;  // [B + 1]: sequence b owns q rows [cu[b], cu[b + 1])
  int64_t window;     // <= 0: none

  void run(const PrefillItem& it, Workspace<T>& ws) const {
    const int64_t G = this->G, D = this->D, Dp = this->Dp;
    const int64_t rows = it.tn * G;
    State& st = ws.states[0];
    st.G = rows;
    if (static_cast<int64_t>(ws.live.size()) < rows) ws.live.resize(rows);
    uint16_t* live = ws.live.data();
    st.live = live;
    const int64_t row0 = cu[it.b] + it.t0;  // q row of the item's first token
    const int64_t first = this->lens[it.b] - (cu[it.b + 1] - cu[it.b]) + it.t0;  // its position
    this->set_mods(st, it.b, it.h, first);
    for (int64_t t = 0; t < it.tn; ++t) {
      const QT* qt = this->q + (row0 + t) * this->q_s0 + it.h * G * this->q_s1;
      for (int64_t g = 0; g < G; ++g) {
        float* qr = st.q + (t * G + g) * Dp;
        for (int64_t d = 0; d < D; ++d)
          qr[d] = to_float(qt[g * this->q_s1 + d * this->q_s2]) * this->scale;
        std::fill(qr + D, qr + Dp, 0.0f);
        st.m[t * G + g] = -kInf;
        st.l[t * G + g] = 0.0f;
      }
    }
    std::fill(st.acc, st.acc + rows * Dp, 0.0f);

    const int64_t lo = window > 0 ? std::max<int64_t>(0, first - window + 1) : 0;
    const int64_t hi = first + it.tn;
    Tile<T>* cur = ws.tiles.data();
    Tile<T>* next = cur + 1;
    this->fill(cur, it.b, it.h, 1, lo, static_cast<int>(std::min<int64_t>(kTile, hi - lo)));
    this->touch(cur, 1);
    for (int64_t p0 = lo; p0 < hi; p0 += kTile) {
      const int64_t p1 = p0 + kTile;
      this->fill(next, it.b, it.h, 1, p1, static_cast<int>(std::clamp<int64_t>(hi - p1, 0, kTile)));
      this->touch(next, 1);
      // Row (t, g) sees tile positions [a, e): from its window start to itself.
      for (int64_t t = 0; t < it.tn; ++t) {
        const int64_t pos = first + t;
        const int64_t a = window > 0 ? std::max(p0, pos - window + 1) : p0;
        const int64_t e = std::min(p0 + cur->n, pos + 1);
        const uint32_t bits = e > a ? ((1u << (e - p0)) - 1u) & ~((1u << (a - p0)) - 1u) : 0u;
        std::fill(live + t * G, live + (t + 1) * G, static_cast<uint16_t>(bits));
      }
      this->tile(st, *cur);
      std::swap(cur, next);
    }

    for (int64_t t = 0; t < it.tn; ++t) {
      QT* o = this->out + ((row0 + t) * this->Hq + it.h * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = t * G + g;
        const float inv = 1.0f / st.l[r];  // l > 0: every query sees at least itself
        for (int64_t d = 0; d < D; ++d) o[g * D + d] = static_cast<QT>(st.acc[r * Dp + d] * inv);
      }
      if (this->lse != nullptr) {
        float* row = this->lse + (row0 + t) * this->Hq + it.h * G;
        for (int64_t g = 0; g < G; ++g) row[g] = st.m[t * G + g] + std::log(st.l[t * G + g]);
      }
    }
  }
};

// Items for chunk lengths n[b] and kv heads Hkv: q tiles of `tq` tokens (see above), the rows
// per item returned in `rows`.
std::vector<PrefillItem> plan_prefill(const std::vector<int64_t>& n, const std::vector<int64_t>& lo,
                                      const std::vector<int64_t>& hi, int64_t Hkv, int64_t G,
                                      int64_t* rows) {
  const int64_t want = at::get_num_threads() * knob(Knob::paged_min_items_per_thread);
  const auto count = [&](int64_t tq) {
    int64_t items = 0;
    for (int64_t nb : n) items += Hkv * ((nb + tq - 1) / tq);
    return items;
  };
  int64_t tq = std::max<int64_t>(1, knob(Knob::paged_prefill_rows) / G);
  while (tq > 1 && count(tq) < want) tq = (tq + 1) / 2;
  *rows = tq * G;
  std::vector<PrefillItem> items;
  for (size_t b = 0; b < n.size(); ++b) {
    for (int64_t t0 = 0; t0 < n[b]; t0 += tq) {
      const int64_t tn = std::min(tq, n[b] - t0);
      // Span of the tile: the last token's position + 1 minus the first token's window start.
      const int64_t span = hi[b] - n[b] + t0 + tn - lo[b];
      for (int64_t h = 0; h < Hkv; ++h)
        items.push_back({static_cast<int64_t>(b), h, t0, tn, tn * std::max<int64_t>(span, 1)});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const PrefillItem& x, const PrefillItem& y) { return x.work > y.work; });
  return items;
}

std::tuple<at::Tensor, at::Tensor> paged_prefill_attention_impl(
    const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
    double scale, int64_t window, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, bool with_lse) {
  check_caches(op, k_cache, v_cache, k_scale, v_scale);
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-d [num_tokens, num_heads, head_dim]; got shape ",
              q.sizes());
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt, op, ": cu_seqlens_q must be int32; got ",
              dtype_name(cu_seqlens_q.scalar_type()));
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, op,
              ": cu_seqlens_q must be 1-d [batch + 1]; got shape ", cu_seqlens_q.sizes());
  TORCH_CHECK(cu_seqlens_q.device().is_cpu(), op, ": cu_seqlens_q must be a CPU tensor; got ",
              cu_seqlens_q.device());
  const int64_t B = cu_seqlens_q.size(0) - 1;
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  check_query_and_tables(op, q, k_cache, block_tables, seq_lens, B);
  const Mods mods = check_mods(op, softcap, alibi_slopes, B, Hq);
  const int shift = block_shift(op, k_cache.size(1));

  at::Tensor out = at::empty({N, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse;
  if (with_lse) lse = at::empty({N, Hq}, q.options().dtype(at::kFloat));
  const at::Tensor cu_t = cu_seqlens_q.contiguous();
  const at::Tensor lens_t = seq_lens.contiguous();
  const int32_t* cu = cu_t.data_ptr<int32_t>();
  const int32_t* lens = lens_t.data_ptr<int32_t>();

  // Every offset, length and table entry the queries read, before anything runs.
  TORCH_CHECK(cu[0] == 0, op, ": cu_seqlens_q[0] must be 0; got ", cu[0]);
  TORCH_CHECK(cu[B] == N, op, ": cu_seqlens_q[", B, "] must be q's ", N, " rows; got ", cu[B]);
  std::vector<int64_t> n(B), lo(B), hi(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b];
    check_seq_len(op, block_tables, k_cache, b, len);
    n[b] = static_cast<int64_t>(cu[b + 1]) - cu[b];
    TORCH_CHECK(n[b] >= 0 && n[b] <= len, op, ": cu_seqlens_q[", b + 1, "] - cu_seqlens_q[", b,
                "] (sequence ", b, "'s queries) must be in [0, seq_lens[", b, "]] = [0, ", len,
                "]; got ", n[b]);
    hi[b] = len;
    lo[b] = window > 0 ? std::max<int64_t>(0, len - n[b] - window + 1) : 0;
    if (n[b] > 0) check_entries(op, block_tables, k_cache, shift, b, lo[b], len, window);
  }
  if (out.numel() == 0) return {out, lse};

  int64_t rows = 0;
  const std::vector<PrefillItem> items = plan_prefill(n, lo, hi, Hkv, Hq / Hkv, &rows);
  dispatch_types(q.scalar_type(), k_cache.scalar_type(), [&](auto qt, auto ct) {
    using QT = decltype(qt);
    using T = decltype(ct);
    PrefillProblem<QT, T> pb;
    init_problem<QT, T>(pb, q, k_cache, v_cache, block_tables, lens, shift, scale, mods, k_scale,
                        v_scale, out);
    pb.cu = cu;
    pb.window = window;
    pb.lse = with_lse ? lse.data_ptr<float>() : nullptr;
    run_items(pb, items, 1, rows);
  });
  return {out, lse};
}

at::Tensor paged_prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& block_tables,
                                       const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                                       double scale, int64_t window,
                                       const std::optional<at::Tensor>& k_scale,
                                       const std::optional<at::Tensor>& v_scale, double softcap,
                                       const std::optional<at::Tensor>& alibi_slopes) {
  return std::get<0>(paged_prefill_attention_impl("paged_prefill_attention", q, k_cache, v_cache,
                                                  block_tables, seq_lens, cu_seqlens_q, scale,
                                                  window, k_scale, v_scale, softcap, alibi_slopes,
                                                  false));
}

std::tuple<at::Tensor, at::Tensor> paged_prefill_attention_lse_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
    double scale, int64_t window, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return paged_prefill_attention_impl("paged_prefill_attention_lse", q, k_cache, v_cache,
                                      block_tables, seq_lens, cu_seqlens_q, scale, window,
                                      k_scale, v_scale, softcap, alibi_slopes, true);
}

// ----------------------------------------------------------------------------------------
// paged_append

template <typename S>
void check_slots(const S* slots, int64_t n, int64_t num_slots) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slots[i] < num_slots, "paged_append: slot_mapping[", i, "] must be < ", num_slots,
                " (num_blocks * block_size), or negative for padding; got ",
                static_cast<int64_t>(slots[i]));
  }
}

// Rows x[i, h, :] (any strides) into slot slots[i] of the cache, converted to the cache dtype.
template <typename X, typename T, typename S>
void scatter_rows(const at::Tensor& x, const at::Tensor& cache, const S* slots, int shift) {
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2);
  const X* src = static_cast<const X*>(x.data_ptr());
  const CacheView<T> dst = view<T>(cache);
  const int64_t mask = (int64_t{1} << shift) - 1;
  at::parallel_for(0, N * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const int64_t i = r / H, h = r % H;
                       const int64_t s = slots[i];
                       if (s < 0) continue;
                       const X* xr = src + i * x.stride(0) + h * x.stride(1);
                       T* out = dst.row(s >> shift, s & mask, h);
                       if (std::is_same_v<X, T> && x.stride(2) == 1) {
                         std::memcpy(out, xr, D * sizeof(T));
                       } else {
                         for (int64_t d = 0; d < D; ++d)
                           out[d] = static_cast<T>(to_float(xr[d * x.stride(2)]));
                       }
                     }
                   });
}

// Quantized rows q [N, H, D] and their scales [N, H] into their slots.
template <typename S>
void scatter_quantized(const at::Tensor& q, const at::Tensor& qs, const at::Tensor& cache,
                       const at::Tensor& scale, const S* slots, int shift) {
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int8_t* src = q.data_ptr<int8_t>();
  const float* src_scale = qs.data_ptr<float>();
  const CacheView<int8_t> dst = view<int8_t>(cache);
  const CacheView<float> dst_scale = view<float>(scale);
  const int64_t mask = (int64_t{1} << shift) - 1;
  at::parallel_for(0, N * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const int64_t s = slots[r / H];
                       if (s < 0) continue;
                       const int64_t h = r % H;
                       std::memcpy(dst.row(s >> shift, s & mask, h), src + r * D, D);
                       *dst_scale.row(s >> shift, s & mask, h) = src_scale[r];
                     }
                   });
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("frugal::quantize_per_token", "")
                                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return handle.call(x);
}

void paged_append_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                      const std::optional<at::Tensor>& k_scale,
                      const std::optional<at::Tensor>& v_scale) {
  constexpr const char* op = "paged_append";
  check_caches(op, k_cache, v_cache, k_scale, v_scale);
  const int shift = block_shift(op, k_cache.size(1));
  TORCH_CHECK(is_float(k.scalar_type()), op, ": k must be float32, float16 or bfloat16; got ",
              dtype_name(k.scalar_type()));
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), op, ": v must have k's dtype ",
              dtype_name(k.scalar_type()), "; got ", dtype_name(v.scalar_type()));
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), "; got ",
              v.sizes());
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), op,
              ": k must be [num_tokens, ", k_cache.size(2), ", ", k_cache.size(3),
              "] ([num_tokens, num_kv_heads, head_dim] of k_cache); got ", k.sizes());
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), op, ": k and v must be CPU tensors; got ",
              k.device(), " and ", v.device());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong, op,
              ": slot_mapping must be int32 or int64; got ",
              dtype_name(slot_mapping.scalar_type()));
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0), op,
              ": slot_mapping must have shape (", k.size(0), ",) (one slot per token); got ",
              slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.device().is_cpu(), op, ": slot_mapping must be a CPU tensor; got ",
              slot_mapping.device());
  if (k.numel() == 0) return;
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);

  const auto with_slots = [&](auto s) {
    using S = decltype(s);
    const S* sp = slots.data_ptr<S>();
    check_slots(sp, slots.numel(), num_slots);
    if (k_cache.scalar_type() == at::kChar) {
      for (const auto& [x, cache, scale] :
           {std::tuple{&k, &k_cache, &*k_scale}, std::tuple{&v, &v_cache, &*v_scale}}) {
        const auto [xq, xs] = quantize_per_token(*x);
        scatter_quantized(xq.contiguous(), xs.contiguous(), *cache, *scale, sp, shift);
      }
      return;
    }
    const auto typed = [&](auto xt, auto ct) {
      using X = decltype(xt);
      using T = decltype(ct);
      scatter_rows<X, T>(k, k_cache, sp, shift);
      scatter_rows<X, T>(v, v_cache, sp, shift);
    };
    const auto with_cache = [&](auto xt) {
      switch (k_cache.scalar_type()) {
        case at::kFloat:
          return typed(xt, float{});
        case at::kHalf:
          return typed(xt, c10::Half{});
        default:
          return typed(xt, c10::BFloat16{});
      }
    };
    switch (k.scalar_type()) {
      case at::kFloat:
        return with_cache(float{});
      case at::kHalf:
        return with_cache(c10::Half{});
      default:
        return with_cache(c10::BFloat16{});
    }
  };
  if (slots.scalar_type() == at::kInt) {
    with_slots(int32_t{});
  } else {
    with_slots(int64_t{});
  }
}

}  // namespace
}  // namespace frugal::cpu

TORCH_LIBRARY_IMPL(frugal, CPU, m) {
  m.impl("paged_attention", &frugal::cpu::paged_attention_cpu);
  m.impl("paged_append", &frugal::cpu::paged_append_cpu);
  m.impl("paged_prefill_attention", &frugal::cpu::paged_prefill_attention_cpu);
  m.impl("paged_attention_lse", &frugal::cpu::paged_attention_lse_cpu);
  m.impl("paged_prefill_attention_lse", &frugal::cpu::paged_prefill_attention_lse_cpu);
}
