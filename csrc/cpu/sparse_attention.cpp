// sparse_attention_fwd and sparse_attention_bwd (block-sparse attention) on the CPU.
//
// The mask format is docs/block_mask_format.md: per (batch, query head, q-block) lists of full
// kv-blocks (no element test) and partial kv-blocks (element rule: band/prefix, document ids,
// packed bits), and the transposed lists for the backward pass. Layout tensors may be stride-0
// expanded views; every access goes through their strides.
//
// Forward, one work item per (b, h, q-block), flash-attention style. The item packs its queries
// once, transposed and pre-scaled, as Q^T [D, BQp] fp32 (BQp = BQ rounded up to 64, padded with
// zero columns). For every listed kv-block it computes the scores transposed,
// S^T [keys, BQp] = K Q^T, so that K is read in place (row-major, any row stride), and each
// query's softmax statistics are a column: the online-softmax max and sum over the keys of the
// block are vertical vector operations, one lane per query, with no horizontal reductions. The
// element rule runs on partial blocks only: the band as two bounds per key row (no per-element
// compare), document ids as a vector compare, the bitmask transposed 32 x 32 bits at a time into
// one bit per query per key row and applied as a branch-free select. Then
// O [BQ, D] = alpha * O + P V, alpha = exp(m_old - m_new) folded into the loads of the
// accumulator tile. Both products are one GEMM micro-kernel,
//   C[i, 0:N] (= | += | = alpha_i * C +) sum_j A[i*ai + j*aj] * B[j, 0:N],
// register-tiled 6 rows x 64 columns (24 zmm accumulators; A broadcast, B rows loaded once per
// j) under AVX-512, 6 x 16 under AVX2. K and V are read as fp32 with unit stride along D:
// fp16/bf16 (or a strided D) are converted once per call, an O(N D) pass against O(N w D) work.
// Items run most expensive first from a shared counter (rows of a causal mask differ in cost).
// Measured on this 2-core Zen 5 (benchmarks/bench_sparse_attention_cpu.py, B=1 H=8 D=64 fp32,
// machine shared with other jobs): causal as a 128 block mask 1.85x faster than SDPA causal at
// N=16k (1.95x at 4k), sliding window w=512 27x faster than SDPA causal at 16k; one thread on
// full blocks runs at about 145-190 GFLOP/s.
//
// Backward (FlashAttention-2): delta = rowsum(dO * O). dq items (b, h, q-block) walk the
// forward lists: S^T and P^T = exp(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta),
// dq += dS K. dk/dv items (b, kv head, kv-block) walk the transposed lists of every query head
// of the group (GQA sums them): dv += P^T dO, dk += dS^T Q. Every product is the same GEMM
// micro-kernel. An empty row (lse = -inf) gives P = 0 and contributes nothing.
//
// Score modifiers (python/frugal/score_mods.py): softcap and ALiBi rewrite S^T right after the
// product, before the element rule, as one pass over the block (tanh through exp, so it
// vectorizes); without them that pass is not called at all. The backward keeps the softcap's
// derivative 1 - tanh^2 of each element and scales dS^T by it.
//
// ISA paths: AVX-512 and AVX2 share the GEMM template (one vector-register type each); the
// softmax and gradient steps are intrinsics under AVX-512, and elsewhere portable code that
// flattening wrappers compile for AVX2 (or the baseline), so the compiler vectorizes it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/memory.h"
#include "cpu/vec_math.h"
#include "score_mods.h"
#include "sparse_layout.h"

#if FRUGAL_X86
#include <immintrin.h>
#endif

#define FRUGAL_FLATTEN __attribute__((flatten))

namespace frugal::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kFlagBand = 1, kFlagPrefix = 2, kFlagDoc = 4, kFlagBits = 8;

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// ----------------------------------------------------------------------------------------
// The mask

// An int32 tensor of up to 4 dims read through its strides (stride-0 broadcast views work).
struct Idx {
  const int32_t* p = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  Idx() = default;
  explicit Idx(const at::Tensor& t) : p(t.data_ptr<int32_t>()) {
    for (int64_t d = 0; d < t.dim(); ++d) s[d] = t.stride(d);
  }
  int32_t operator()(int64_t a, int64_t b = 0, int64_t c = 0, int64_t d = 0) const {
    return p[a * s[0] + b * s[1] + c * s[2] + d * s[3]];
  }
};

// A block list: entries (b, h, i, 0 .. num(b, h, i)).
struct List {
  Idx num, idx, bits;  // bits: the bitmask row of each entry (partial lists with has_bits)
};

// Calls f(index, partial, bits_row) for the full entries of (b, h, i), then the partial ones
// (bits_row -1 unless the partial list carries bitmask rows).
template <typename F>
void for_each_block(const List& full, const List& part, int64_t b, int64_t h, int64_t i, F&& f) {
  for (int64_t e = 0, n = full.num(b, h, i); e < n; ++e) f(full.idx(b, h, i, e), false, -1);
  for (int64_t e = 0, n = part.num(b, h, i); e < n; ++e)
    f(part.idx(b, h, i, e), true, part.bits.p ? part.bits(b, h, i, e) : -1);
}

struct Rule {
  int flags = 0;
  int64_t lo = 0, hi = 0, prefix = 0;
  Idx q_doc, kv_doc;  // [B, Nq], [B, Nk]
  Idx bits;           // [nbits, BQ, BK / 32]
};

// a[i] bit j -> a[j] bit i: a 32 x 32 bit matrix transposed by recursive block swaps.
inline void transpose32(uint32_t* a) {
  uint32_t m = 0x0000FFFFu;
  for (int j = 16; j != 0; j >>= 1, m ^= m << j) {
    for (int k = 0; k < 32; k = ((k | j) + 1) & ~j) {
      const uint32_t t = ((a[k] >> j) ^ a[k | j]) & m;
      a[k] ^= t << j;
      a[k | j] ^= t;
    }
  }
}

// keep ? x : -inf, without a branch (a mask may be random: a branch would mispredict half the
// time) and in a form compilers vectorize.
inline float keep_or_neg_inf(bool keep, float x) {
  uint32_t v;
  std::memcpy(&v, &x, sizeof(v));
  const uint32_t m = 0u - static_cast<uint32_t>(keep);
  v = (v & m) | (0xFF800000u & ~m);
  std::memcpy(&x, &v, sizeof(v));
  return x;
}

// Words of queries per key row of a transposed block bitmask.
inline int64_t bit_words(int64_t rows) { return (rows + 31) / 32; }

// Applies the element rule to scores S^T [kn, ld] of keys k0 .. k0 + kn (k0 a block start) and
// queries q0 .. q0 + qn (a q-block start): a disallowed element becomes -inf. qdoc: the queries'
// document ids (contiguous); bits_row: the block's bitmask row; tb: scratch of
// kn * bit_words(qn) words, where the bitmask is transposed to one bit per query per key row.
inline void apply_rule(const Rule& r, int64_t b, float* st, int64_t ld, int64_t k0, int64_t kn,
                       int64_t q0, int64_t qn, const int32_t* qdoc, int64_t bits_row,
                       uint32_t* tb) {
  const int64_t qw = bit_words(qn);
  if (r.flags & kFlagBits) {
    uint32_t a[32];
    const int32_t* base = r.bits.p + bits_row * r.bits.s[0];
    for (int64_t kw = 0; kw < bit_words(kn); ++kw) {
      for (int64_t w = 0; w < qw; ++w) {
        for (int64_t i = 0; i < 32; ++i) {
          const int64_t q = 32 * w + i;
          a[i] = q < qn ? static_cast<uint32_t>(base[q * r.bits.s[1] + kw * r.bits.s[2]]) : 0u;
        }
        transpose32(a);
        for (int64_t j = 0; j < 32 && 32 * kw + j < kn; ++j) tb[(32 * kw + j) * qw + w] = a[j];
      }
    }
  }
  for (int64_t k = 0; k < kn; ++k) {
    const int64_t kg = k0 + k;
    float* row = st + k * ld;
    if ((r.flags & kFlagBand) && !((r.flags & kFlagPrefix) && kg < r.prefix)) {
      // q + lo <= kg <= q + hi  <=>  kg - hi <= q <= kg - lo
      const int64_t a = std::clamp<int64_t>(kg - r.hi - q0, 0, qn);
      const int64_t e = std::clamp<int64_t>(kg - r.lo - q0 + 1, a, qn);
      for (int64_t q = 0; q < a; ++q) row[q] = -kInf;
      for (int64_t q = e; q < qn; ++q) row[q] = -kInf;
    }
    if (r.flags & kFlagDoc) {
      const int32_t kd = r.kv_doc(b, kg);
      for (int64_t q = 0; q < qn; ++q) row[q] = keep_or_neg_inf(qdoc[q] == kd, row[q]);
    }
    if (r.flags & kFlagBits) {
      const uint32_t* t = tb + k * qw;
      int64_t q = 0;
      for (; q + 32 <= qn; q += 32) {
        const uint32_t w = t[q >> 5];
        for (int i = 0; i < 32; ++i) row[q + i] = keep_or_neg_inf((w >> i) & 1u, row[q + i]);
      }
      for (; q < qn; ++q) row[q] = keep_or_neg_inf((t[q >> 5] >> (q & 31)) & 1u, row[q]);
    }
  }
}

// The score modifiers of one call (python/frugal/score_mods.py).
struct Mods {
  float softcap = 0.0f;          // > 0: s = softcap * tanh(s / softcap)
  const float* alibi = nullptr;  // [B, Hq] slopes, contiguous: s -= slope * |q_pos - k_pos|
  int64_t Hq = 0, shift = 0;     // query i sits at position i + shift (shift = Nk - Nq)
  bool any() const { return softcap > 0.0f || alibi != nullptr; }
};

template <bool kCap, bool kAlibi, bool kGrad>
inline void mods_typed(const Mods& md, float slope, float* st, int64_t ld, int64_t k0, int64_t kn,
                       int64_t q0, float* dcap) {
  const float c = md.softcap;
  for (int64_t k = 0; k < kn; ++k) {
    float* row = st + k * ld;
    float* drow = kGrad ? dcap + k * ld : nullptr;
    const float d0 = static_cast<float>(q0 + md.shift - (k0 + k));  // q_pos - k_pos, column 0
    for (int64_t q = 0; q < ld; ++q) {
      float x = row[q];
      if constexpr (kCap) {
        const float t = tanh_exp(x / c);
        x = c * t;
        if constexpr (kGrad) drow[q] = 1.0f - t * t;
      }
      if constexpr (kAlibi) x -= slope * std::fabs(d0 + static_cast<float>(q));
      row[q] = x;
    }
  }
}

// Applies the modifiers to scores S^T [kn, ld] of keys k0 .. k0 + kn and queries q0 .. q0 + ld
// of (b, h); with dcap (softcap on), also stores the softcap's derivative 1 - tanh^2 there.
inline void apply_mods(const Mods& md, int64_t b, int64_t h, float* st, int64_t ld, int64_t k0,
                       int64_t kn, int64_t q0, float* dcap) {
  const float slope = md.alibi ? md.alibi[b * md.Hq + h] : 0.0f;
  const bool cap = md.softcap > 0.0f, alibi = md.alibi != nullptr, grad = cap && dcap;
  if (cap && alibi) {
    grad ? mods_typed<true, true, true>(md, slope, st, ld, k0, kn, q0, dcap)
         : mods_typed<true, true, false>(md, slope, st, ld, k0, kn, q0, dcap);
  } else if (cap) {
    grad ? mods_typed<true, false, true>(md, slope, st, ld, k0, kn, q0, dcap)
         : mods_typed<true, false, false>(md, slope, st, ld, k0, kn, q0, dcap);
  } else if (alibi) {
    mods_typed<false, true, false>(md, slope, st, ld, k0, kn, q0, dcap);
  }
}

// ----------------------------------------------------------------------------------------
// Kernels: portable versions (vectorized by the compiler where the target allows)

enum class Init { kZero, kAccumulate, kScale };

// C[i, 0:N] (init) + sum_{j < K} A[i*ai + j*aj] * B[j*ldb + 0:N], i < M.
inline void gemm_portable(float* c, int64_t ldc, int64_t M, int64_t N, const float* a, int64_t ai,
                          int64_t aj, int64_t K, const float* b, int64_t ldb, Init init,
                          const float* alpha) {
  for (int64_t i = 0; i < M; ++i) {
    float* cr = c + i * ldc;
    if (init == Init::kZero) {
      for (int64_t n = 0; n < N; ++n) cr[n] = 0.0f;
    } else if (init == Init::kScale) {
      const float s = alpha[i];
      for (int64_t n = 0; n < N; ++n) cr[n] *= s;
    }
    for (int64_t j = 0; j < K; ++j) {
      const float av = a[i * ai + j * aj];
      const float* br = b + j * ldb;
      for (int64_t n = 0; n < N; ++n) cr[n] += av * br[n];
    }
  }
}

// Online softmax over the kn key rows of S^T [kn, ld], ld columns (queries): m, l updated,
// alpha = exp(m_old - m_new), S^T replaced by P^T = exp(S^T - m_new).
inline void softmax_portable(float* st, int64_t ld, int64_t kn, float* m, float* l,
                             float* alpha) {
  constexpr int64_t kChunk = 64;
  for (int64_t c0 = 0; c0 < ld; c0 += kChunk) {
    const int64_t cn = std::min(kChunk, ld - c0);
    float mx[kChunk], mu[kChunk], sum[kChunk];
    for (int64_t c = 0; c < cn; ++c) mx[c] = m[c0 + c];
    for (int64_t k = 0; k < kn; ++k) {
      const float* row = st + k * ld + c0;
      for (int64_t c = 0; c < cn; ++c) mx[c] = std::max(mx[c], row[c]);
    }
    for (int64_t c = 0; c < cn; ++c) {
      mu[c] = mx[c] == -kInf ? 0.0f : mx[c];
      alpha[c0 + c] = exp_neg(m[c0 + c] - mu[c]);
      sum[c] = 0.0f;
    }
    for (int64_t k = 0; k < kn; ++k) {
      float* row = st + k * ld + c0;
      for (int64_t c = 0; c < cn; ++c) {
        row[c] = exp_neg(row[c] - mu[c]);
        sum[c] += row[c];
      }
    }
    for (int64_t c = 0; c < cn; ++c) {
      l[c0 + c] = l[c0 + c] * alpha[c0 + c] + sum[c];
      m[c0 + c] = mx[c];
    }
  }
}

// P^T = exp(S^T - lse) (lse given as +inf for an empty or padded query: P = 0), then, with
// dP^T [kn, ld]: S^T becomes dS^T = P^T (dP^T - delta). P^T is also written to pt.
inline void probs_grad_portable(float* st, const float* dpt, float* pt, int64_t ld, int64_t kn,
                                const float* lse, const float* delta) {
  for (int64_t k = 0; k < kn; ++k) {
    float* s = st + k * ld;
    float* p = pt + k * ld;
    const float* dp = dpt + k * ld;
    for (int64_t c = 0; c < ld; ++c) {
      const float pv = exp_neg(s[c] - lse[c]);
      p[c] = pv;
      s[c] = pv * (dp[c] - delta[c]);
    }
  }
}

struct Kernels {
  void (*gemm)(float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
               const float*, int64_t, Init, const float*);
  void (*softmax)(float*, int64_t, int64_t, float*, float*, float*);
  void (*probs_grad)(float*, const float*, float*, int64_t, int64_t, const float*, const float*);
  void (*rule)(const Rule&, int64_t, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
               const int32_t*, int64_t, uint32_t*);
  void (*mods)(const Mods&, int64_t, int64_t, float*, int64_t, int64_t, int64_t, int64_t, float*);
};

void gemm_base(float* c, int64_t ldc, int64_t M, int64_t N, const float* a, int64_t ai,
               int64_t aj, int64_t K, const float* b, int64_t ldb, Init init, const float* alpha) {
  gemm_portable(c, ldc, M, N, a, ai, aj, K, b, ldb, init, alpha);
}
void softmax_base(float* st, int64_t ld, int64_t kn, float* m, float* l, float* alpha) {
  softmax_portable(st, ld, kn, m, l, alpha);
}
void rule_base(const Rule& r, int64_t b, float* st, int64_t ld, int64_t k0, int64_t kn,
               int64_t q0, int64_t qn, const int32_t* qdoc, int64_t bits_row, uint32_t* tb) {
  apply_rule(r, b, st, ld, k0, kn, q0, qn, qdoc, bits_row, tb);
}
void mods_base(const Mods& md, int64_t b, int64_t h, float* st, int64_t ld, int64_t k0,
               int64_t kn, int64_t q0, float* dcap) {
  apply_mods(md, b, h, st, ld, k0, kn, q0, dcap);
}
void probs_grad_base(float* st, const float* dpt, float* pt, int64_t ld, int64_t kn,
                     const float* lse, const float* delta) {
  probs_grad_portable(st, dpt, pt, ld, kn, lse, delta);
}

#if FRUGAL_X86

// --- Register-tiled GEMM, one template for AVX-512 and AVX2 ---
//
// The template has no target attribute: it is only ever inlined (FRUGAL_FLATTEN) into an entry
// point compiled for its ISA, with V one vector register of that ISA.

struct V512 {
  using T = __m512;
  static constexpr int W = 16;
  FRUGAL_TARGET_AVX512 static T zero() { return _mm512_setzero_ps(); }
  FRUGAL_TARGET_AVX512 static T set1(float x) { return _mm512_set1_ps(x); }
  FRUGAL_TARGET_AVX512 static T load(const float* p) { return _mm512_loadu_ps(p); }
  FRUGAL_TARGET_AVX512 static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  FRUGAL_TARGET_AVX512 static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  FRUGAL_TARGET_AVX512 static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};

struct V256 {
  using T = __m256;
  static constexpr int W = 8;
  FRUGAL_TARGET_AVX2 static T zero() { return _mm256_setzero_ps(); }
  FRUGAL_TARGET_AVX2 static T set1(float x) { return _mm256_set1_ps(x); }
  FRUGAL_TARGET_AVX2 static T load(const float* p) { return _mm256_loadu_ps(p); }
  FRUGAL_TARGET_AVX2 static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  FRUGAL_TARGET_AVX2 static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  FRUGAL_TARGET_AVX2 static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
};

// One R x (W NV) tile of C, R x NV accumulators in registers; see gemm_portable.
template <typename V, int R, int NV>
inline void gemm_tile(float* c, int64_t ldc, const float* a, int64_t ai, int64_t aj, int64_t K,
                      const float* b, int64_t ldb, Init init, const float* alpha) {
  constexpr int W = V::W;
  typename V::T acc[R][NV];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    const typename V::T s = init == Init::kScale ? V::set1(alpha[r]) : V::set1(1.0f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = init == Init::kZero ? V::zero() : V::mul(V::load(c + r * ldc + W * v), s);
  }
  // The two A layouts the callers use: rows of A contiguous (aj == 1) or columns (ai == 1).
  if (aj == 1) {
    for (int64_t j = 0; j < K; ++j) {
      typename V::T bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = V::load(b + j * ldb + W * v);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        const typename V::T av = V::set1(a[r * ai + j]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
      }
    }
  } else {
    for (int64_t j = 0; j < K; ++j) {
      typename V::T bv[NV];
      const float* aa = a + j * aj;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = V::load(b + j * ldb + W * v);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        const typename V::T av = V::set1(aa[r * ai]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::store(c + r * ldc + W * v, acc[r][v]);
  }
}

// Rows [0, M) of a column panel of NV vectors, in tiles of R rows and a tail.
template <typename V, int R, int NV>
inline void gemm_panel(float* c, int64_t ldc, int64_t M, const float* a, int64_t ai, int64_t aj,
                       int64_t K, const float* b, int64_t ldb, Init init, const float* alpha) {
  int64_t i = 0;
  const auto tile = [&](auto rows) {
    constexpr int RR = decltype(rows)::value;
    gemm_tile<V, RR, NV>(c + i * ldc, ldc, a + i * ai, ai, aj, K, b, ldb, init,
                         alpha ? alpha + i : nullptr);
    i += RR;
  };
  while (i + R <= M) tile(std::integral_constant<int, R>{});
  while (i + 2 <= M) tile(std::integral_constant<int, 2>{});
  if (i < M) tile(std::integral_constant<int, 1>{});
}

// Panels of NV0 vectors (R0-row tiles), then of NV1 and of 1 vector (R1-row tiles).
// N must be a multiple of V::W (every caller's N is a multiple of 16).
template <typename V, int R0, int NV0, int R1, int NV1>
inline void gemm_tiled(float* c, int64_t ldc, int64_t M, int64_t N, const float* a, int64_t ai,
                       int64_t aj, int64_t K, const float* b, int64_t ldb, Init init,
                       const float* alpha) {
  int64_t n = 0;
  for (; n + V::W * NV0 <= N; n += V::W * NV0)
    gemm_panel<V, R0, NV0>(c + n, ldc, M, a, ai, aj, K, b + n, ldb, init, alpha);
  for (; n + V::W * NV1 <= N; n += V::W * NV1)
    gemm_panel<V, R1, NV1>(c + n, ldc, M, a, ai, aj, K, b + n, ldb, init, alpha);
  for (; n < N; n += V::W)
    gemm_panel<V, R1, 1>(c + n, ldc, M, a, ai, aj, K, b + n, ldb, init, alpha);
}

// AVX-512: 6 x 64 tiles (24 zmm accumulators), 12 x 32 and 12 x 16 for the tails.
FRUGAL_TARGET_AVX512 FRUGAL_FLATTEN void gemm_avx512(float* c, int64_t ldc, int64_t M, int64_t N,
                                                     const float* a, int64_t ai, int64_t aj,
                                                     int64_t K, const float* b, int64_t ldb,
                                                     Init init, const float* alpha) {
  gemm_tiled<V512, 6, 4, 12, 2>(c, ldc, M, N, a, ai, aj, K, b, ldb, init, alpha);
}

// AVX2: 6 x 16 tiles (12 ymm accumulators of 16 registers), 12 x 8 for the tail.
FRUGAL_TARGET_AVX2 FRUGAL_FLATTEN void gemm_avx2(float* c, int64_t ldc, int64_t M, int64_t N,
                                                 const float* a, int64_t ai, int64_t aj,
                                                 int64_t K, const float* b, int64_t ldb,
                                                 Init init, const float* alpha) {
  gemm_tiled<V256, 6, 2, 12, 1>(c, ldc, M, N, a, ai, aj, K, b, ldb, init, alpha);
}

// --- AVX2 softmax, gradient step and element rule: the portable code, compiled for AVX2 ---

FRUGAL_TARGET_AVX2 FRUGAL_FLATTEN void rule_avx2(const Rule& r, int64_t b, float* st, int64_t ld,
                                                 int64_t k0, int64_t kn, int64_t q0, int64_t qn,
                                                 const int32_t* qdoc, int64_t bits_row,
                                                 uint32_t* tb) {
  apply_rule(r, b, st, ld, k0, kn, q0, qn, qdoc, bits_row, tb);
}

FRUGAL_TARGET_AVX2 FRUGAL_FLATTEN void mods_avx2(const Mods& md, int64_t b, int64_t h, float* st,
                                                 int64_t ld, int64_t k0, int64_t kn, int64_t q0,
                                                 float* dcap) {
  apply_mods(md, b, h, st, ld, k0, kn, q0, dcap);
}

FRUGAL_TARGET_AVX2 FRUGAL_FLATTEN void softmax_avx2(float* st, int64_t ld, int64_t kn, float* m,
                                                    float* l, float* alpha) {
  softmax_portable(st, ld, kn, m, l, alpha);
}
FRUGAL_TARGET_AVX2 FRUGAL_FLATTEN void probs_grad_avx2(float* st, const float* dpt, float* pt,
                                                       int64_t ld, int64_t kn, const float* lse,
                                                       const float* delta) {
  probs_grad_portable(st, dpt, pt, ld, kn, lse, delta);
}

// --- AVX-512 ---

FRUGAL_TARGET_AVX512 FRUGAL_FLATTEN void rule_avx512(const Rule& r, int64_t b, float* st,
                                                     int64_t ld, int64_t k0, int64_t kn,
                                                     int64_t q0, int64_t qn, const int32_t* qdoc,
                                                     int64_t bits_row, uint32_t* tb) {
  apply_rule(r, b, st, ld, k0, kn, q0, qn, qdoc, bits_row, tb);
}

FRUGAL_TARGET_AVX512 FRUGAL_FLATTEN void mods_avx512(const Mods& md, int64_t b, int64_t h,
                                                     float* st, int64_t ld, int64_t k0,
                                                     int64_t kn, int64_t q0, float* dcap) {
  apply_mods(md, b, h, st, ld, k0, kn, q0, dcap);
}

FRUGAL_TARGET_AVX512 void softmax_avx512(float* st, int64_t ld, int64_t kn, float* m, float* l,
                                         float* alpha) {
  const __m512 neg_inf = _mm512_set1_ps(-kInf);
  for (int64_t c = 0; c < ld; c += 16) {
    const __m512 m_old = _mm512_loadu_ps(m + c);
    __m512 mx0 = m_old, mx1 = neg_inf;
    int64_t k = 0;
    for (; k + 2 <= kn; k += 2) {
      mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(st + k * ld + c));
      mx1 = _mm512_max_ps(mx1, _mm512_loadu_ps(st + (k + 1) * ld + c));
    }
    if (k < kn) mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(st + k * ld + c));
    const __m512 mx = _mm512_max_ps(mx0, mx1);
    const __m512 mu =
        _mm512_mask_mov_ps(mx, _mm512_cmp_ps_mask(mx, neg_inf, _CMP_EQ_OQ), _mm512_setzero_ps());
    const __m512 al = exp16_flush(_mm512_sub_ps(m_old, mu));
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (k = 0; k + 2 <= kn; k += 2) {
      float* r0 = st + k * ld + c;
      float* r1 = r0 + ld;
      const __m512 p0 = exp16_flush(_mm512_sub_ps(_mm512_loadu_ps(r0), mu));
      const __m512 p1 = exp16_flush(_mm512_sub_ps(_mm512_loadu_ps(r1), mu));
      _mm512_storeu_ps(r0, p0);
      _mm512_storeu_ps(r1, p1);
      s0 = _mm512_add_ps(s0, p0);
      s1 = _mm512_add_ps(s1, p1);
    }
    if (k < kn) {
      float* r0 = st + k * ld + c;
      const __m512 p0 = exp16_flush(_mm512_sub_ps(_mm512_loadu_ps(r0), mu));
      _mm512_storeu_ps(r0, p0);
      s0 = _mm512_add_ps(s0, p0);
    }
    _mm512_storeu_ps(alpha + c, al);
    _mm512_storeu_ps(l + c, _mm512_fmadd_ps(_mm512_loadu_ps(l + c), al, _mm512_add_ps(s0, s1)));
    _mm512_storeu_ps(m + c, mx);
  }
}

FRUGAL_TARGET_AVX512 void probs_grad_avx512(float* st, const float* dpt, float* pt, int64_t ld,
                                            int64_t kn, const float* lse, const float* delta) {
  for (int64_t k = 0; k < kn; ++k) {
    for (int64_t c = 0; c < ld; c += 16) {
      const int64_t o = k * ld + c;
      const __m512 p =
          exp16_flush(_mm512_sub_ps(_mm512_loadu_ps(st + o), _mm512_loadu_ps(lse + c)));
      _mm512_storeu_ps(pt + o, p);
      const __m512 dp = _mm512_sub_ps(_mm512_loadu_ps(dpt + o), _mm512_loadu_ps(delta + c));
      _mm512_storeu_ps(st + o, _mm512_mul_ps(p, dp));
    }
  }
}

#endif  // FRUGAL_X86

Kernels pick_kernels() {
#if FRUGAL_X86
  const Isa isa = current_isa();
  if (isa >= Isa::kAvx512)
    return {&gemm_avx512, &softmax_avx512, &probs_grad_avx512, &rule_avx512, &mods_avx512};
  if (isa >= Isa::kAvx2)
    return {&gemm_avx2, &softmax_avx2, &probs_grad_avx2, &rule_avx2, &mods_avx2};
#endif
  return {&gemm_base, &softmax_base, &probs_grad_base, &rule_base, &mods_base};
}

// ----------------------------------------------------------------------------------------
// Shared driver pieces

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// 64-byte aligned fp32 scratch, one per thread per call.
struct Scratch {
  std::unique_ptr<float, FreeDeleter> buf;
  int64_t used = 0, size = 0;
  explicit Scratch(int64_t floats) {
    size = (floats + 15) / 16 * 16 + 16 * 32;
    buf.reset(static_cast<float*>(std::aligned_alloc(64, size * sizeof(float))));
    TORCH_CHECK(buf != nullptr, "sparse_attention: out of memory for ", size * 4,
                " bytes of scratch");
  }
  float* take(int64_t n) {
    float* p = buf.get() + used;
    used += (n + 15) / 16 * 16;
    TORCH_INTERNAL_ASSERT(used <= size, "sparse_attention: scratch overrun");
    return p;
  }
};

// Runs f(item, thread_index) for items in `order`, each thread taking the next from a counter.
template <typename F>
void run_dynamic(const std::vector<int64_t>& order, F&& f) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1,
                   [&](int64_t begin, int64_t) { f(next, n, begin); });
}

// Items sorted by descending cost (stable: ties keep their order).
std::vector<int64_t> by_cost(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// fp32 with unit stride along the last dim: x itself when it already is, else a converted copy.
at::Tensor as_f32_rows(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat && x.stride(-1) == 1) return x;
  return x.to(at::kFloat).contiguous();
}

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

struct Geometry {
  int64_t B, Hq, Hkv, G, Nq, Nk, D, BQ, BK, BQp, nQB, nKB;
  float scale;
};

// An int32 CPU tensor of the given shape (-1: any size >= 1).
void check_idx(const char* op, const char* name, const at::Tensor& t, std::vector<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32; got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor; got ", t.device());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d)
    ok = shape[d] < 0 ? t.size(d) >= 1 : t.size(d) == shape[d];
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", c10::IntArrayRef(shape),
              " (-1: any size >= 1); got ", t.sizes());
}

// Checks a list's counts and entries (block index in [0, limit), bits row in [0, nbits)) and
// returns the number of entries of each (b, h, i).
// transposed: a list of q-blocks per kv-block (else kv-blocks per q-block).
std::vector<int64_t> check_list(const char* op, const Geometry& g, bool transposed,
                                const char* name, const char* idx_name, const char* bits_name,
                                const at::Tensor& num, const at::Tensor& idx,
                                const at::Tensor* bits_rows, int64_t nbits) {
  const int64_t B = g.B, H = g.Hq, n = transposed ? g.nKB : g.nQB;
  const int64_t limit = transposed ? g.nQB : g.nKB;
  check_idx(op, name, num, {B, H, n});
  check_idx(op, idx_name, idx, {B, H, n, -1});
  if (bits_rows) check_idx(op, bits_name, *bits_rows, {B, H, n, idx.size(3)});
  const Idx N(num), I(idx);
  Idx R;
  if (bits_rows) R = Idx(*bits_rows);
  const int64_t width = idx.size(3);
  std::vector<int64_t> counts(B * H * n);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = N(b, h, i);
        TORCH_CHECK(c >= 0 && c <= width, op, ": ", name, "[", b, ", ", h, ", ", i,
                    "] must be in [0, ", width, "]; got ", c);
        for (int64_t j = 0; j < c; ++j) {
          const int64_t e = I(b, h, i, j);
          TORCH_CHECK(e >= 0 && e < limit, op, ": ", idx_name, "[", b, ", ", h, ", ", i, ", ", j,
                      "] must be a block index in [0, ", limit, "); got ", e);
          if (bits_rows) {
            const int64_t r = R(b, h, i, j);
            TORCH_CHECK(r >= 0 && r < nbits, op, ": ", bits_name, "[", b, ", ", h, ", ", i, ", ", j,
                        "] must be a row of bits, in [0, ", nbits, "); got ", r);
          }
        }
        counts[(b * H + h) * n + i] = c;
      }
  return counts;
}

Geometry check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, int64_t BQ, int64_t BK, int64_t flags, double scale,
                      const at::Tensor& q_doc, const at::Tensor& kv_doc, const at::Tensor& bits,
                      Rule& rule, int64_t lo, int64_t hi, int64_t prefix) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k and v must be 4-d [B, H, N, D]; got shapes ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16; got ", dtype_name(t));
  TORCH_CHECK(k.scalar_type() == t && v.scalar_type() == t, op,
              ": k and v must have q's dtype ", dtype_name(t), "; got ",
              dtype_name(k.scalar_type()), " and ", dtype_name(v.scalar_type()));
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": q, k and v must be CPU tensors; got ", q.device(), ", ", k.device(), ", ",
              v.device());
  Geometry g;
  g.B = q.size(0);
  g.Hq = q.size(1);
  g.Nq = q.size(2);
  g.D = q.size(3);
  g.Hkv = k.size(1);
  g.Nk = k.size(2);
  TORCH_CHECK(k.size(0) == g.B && v.sizes() == k.sizes() && k.size(3) == g.D, op,
              ": k and v must be [", g.B, ", Hkv, Nk, ", g.D, "] (the same shape); got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(g.Hkv >= 1 && g.Hq % g.Hkv == 0, op, ": q's head count ", g.Hq,
              " must be a multiple of k's ", g.Hkv);
  // The kernels take 16 columns at a time; the ops pad other multiples of 8 (padded_dim).
  TORCH_CHECK(g.D % 16 == 0 && g.D >= 16 && g.D <= 256, op,
              ": head dim must be a multiple of 8 in [8, 256]; got ", g.D);
  TORCH_CHECK(BQ >= 16 && BQ <= 256 && BQ % 16 == 0, op,
              ": BQ must be a multiple of 16 in [16, 256]; got ", BQ);
  TORCH_CHECK(BK >= 16 && BK <= 256 && BK % 16 == 0, op,
              ": BK must be a multiple of 16 in [16, 256]; got ", BK);
  TORCH_CHECK(flags >= 0 && flags <= 15, op, ": flags must be in [0, 15]; got ", flags);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite; got ", scale);
  g.G = g.Hq / g.Hkv;
  g.BQ = BQ;
  g.BK = BK;
  g.BQp = (BQ + 63) / 64 * 64;
  g.nQB = g.Nq / BQ + (g.Nq % BQ != 0);
  g.nKB = g.Nk / BK + (g.Nk % BK != 0);
  // Block lists hold int32 block indices.
  TORCH_CHECK(g.nQB <= std::numeric_limits<int32_t>::max() &&
                  g.nKB <= std::numeric_limits<int32_t>::max(),
              op, ": q and k must have at most 2^31 - 1 blocks of ", BQ, " and ", BK,
              " tokens; got Nq = ", g.Nq, ", Nk = ", g.Nk);
  g.scale = static_cast<float>(scale);
  rule.flags = static_cast<int>(flags);
  // The rule is only evaluated at q in [0, Nq) and k in [0, Nk), where lo and hi beyond
  // +-max(Nq, Nk) and prefix beyond [0, Nk] mean the same as those bounds: clamped there, every
  // int64 gives the same mask, and the band arithmetic (k - hi - q) cannot overflow.
  const int64_t span = std::max(g.Nq, g.Nk);
  rule.lo = std::clamp(lo, -span, span);
  rule.hi = std::clamp(hi, -span, span);
  rule.prefix = std::clamp<int64_t>(prefix, 0, g.Nk);
  if (flags & kFlagDoc) {
    check_idx(op, "q_doc", q_doc, {g.B, g.Nq});
    check_idx(op, "kv_doc", kv_doc, {g.B, g.Nk});
    rule.q_doc = Idx(q_doc);
    rule.kv_doc = Idx(kv_doc);
  }
  if (flags & kFlagBits) {
    TORCH_CHECK(BK % 32 == 0, op, ": a bitmask needs BK a multiple of 32; got ", BK);
    check_idx(op, "bits", bits, {-1, BQ, BK / 32});
    rule.bits = Idx(bits);
  }
  return g;
}

// The call's score modifiers: softcap finite and >= 0 (0: off), alibi_slopes fp32 [B, Hq]
// contiguous on the CPU (frugal.score_mods.check_alibi_slopes makes it so).
Mods check_mods(const char* op, const Geometry& g, double softcap,
                const std::optional<at::Tensor>& alibi_slopes) {
  check_score_mods(op, softcap, alibi_slopes, g.B, g.Hq);
  Mods md;
  md.softcap = static_cast<float>(softcap);
  md.Hq = g.Hq;
  md.shift = g.Nk - g.Nq;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.device().is_cpu(), op, ": alibi_slopes must be a CPU tensor; got ", a.device());
    md.alibi = a.data_ptr<float>();
  }
  return md;
}

// Packs rows [q0, q0 + qn) of x[b, h] (any strides) transposed, times s, into xt [D, ld]
// (columns past qn zero).
template <typename T>
void pack_transposed(const at::Tensor& x, int64_t b, int64_t h, int64_t q0, int64_t qn,
                     int64_t D, float s, float* xt, int64_t ld) {
  const T* base = static_cast<const T*>(x.data_ptr()) + b * x.stride(0) + h * x.stride(1) +
                  q0 * x.stride(2);
  const int64_t s2 = x.stride(2), s3 = x.stride(3);
  for (int64_t d = 0; d < D; ++d) std::fill(xt + d * ld + qn, xt + (d + 1) * ld, 0.0f);
  for (int64_t q = 0; q < qn; ++q) {
    const T* row = base + q * s2;
    for (int64_t d = 0; d < D; ++d) xt[d * ld + q] = to_float(row[d * s3]) * s;
  }
}

void load_qdoc(const Rule& r, int64_t b, int64_t q0, int64_t qn, int32_t* out) {
  for (int64_t q = 0; q < qn; ++q) out[q] = r.q_doc(b, q0 + q);
}

// ----------------------------------------------------------------------------------------
// Forward

template <typename T>
void forward_typed(const at::Tensor& q, const at::Tensor& kf, const at::Tensor& vf,
                   const Geometry& g, const Rule& rule, const Mods& md, const List& full,
                   const List& part, const std::vector<int64_t>& cost, at::Tensor& out,
                   at::Tensor& lse) {
  const Kernels kern = pick_kernels();
  const int64_t BQp = g.BQp, D = g.D;
  const float* kp = kf.data_ptr<float>();
  const float* vp = vf.data_ptr<float>();
  T* op = static_cast<T*>(out.data_ptr());
  float* lp = lse.data_ptr<float>();
  const std::vector<int64_t> order = by_cost(cost);
  const bool mods = md.any();
  const int64_t tb_words = g.BK * bit_words(g.BQ);
  const int64_t scratch = D * BQp + g.BK * BQp + g.BQ * D + 4 * BQp + tb_words;
  run_dynamic(order, [&](std::atomic<int64_t>& next, int64_t n, int64_t) {
    Scratch ws(scratch);
    float* qt = ws.take(D * BQp);
    float* st = ws.take(g.BK * BQp);
    float* o = ws.take(g.BQ * D);
    float* m = ws.take(BQp);
    float* l = ws.take(BQp);
    float* alpha = ws.take(BQp);
    int32_t* qdoc = reinterpret_cast<int32_t*>(ws.take(BQp));
    uint32_t* tb = reinterpret_cast<uint32_t*>(ws.take(tb_words));
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) {
      const int64_t item = order[t];
      const int64_t qb = item % g.nQB, bh = item / g.nQB, h = bh % g.Hq, b = bh / g.Hq;
      const int64_t kvh = h / g.G;
      const int64_t q0 = qb * g.BQ, qn = std::min(g.BQ, g.Nq - q0);
      pack_transposed<T>(q, b, h, q0, qn, D, g.scale, qt, BQp);
      if (rule.flags & kFlagDoc) load_qdoc(rule, b, q0, qn, qdoc);
      std::fill(o, o + g.BQ * D, 0.0f);
      std::fill(m, m + BQp, -kInf);
      std::fill(l, l + BQp, 0.0f);
      const float* kh = kp + b * kf.stride(0) + kvh * kf.stride(1);
      const float* vh = vp + b * vf.stride(0) + kvh * vf.stride(1);
      const int64_t ks = kf.stride(2), vs = vf.stride(2);
      for_each_block(full, part, b, h, qb, [&](int64_t kb, bool partial, int64_t bits_row) {
        const int64_t k0 = kb * g.BK, kn = std::min(g.BK, g.Nk - k0);
        kern.gemm(st, BQp, kn, BQp, kh + k0 * ks, ks, 1, D, qt, BQp, Init::kZero, nullptr);
        if (mods) kern.mods(md, b, h, st, BQp, k0, kn, q0, nullptr);
        if (partial) kern.rule(rule, b, st, BQp, k0, kn, q0, qn, qdoc, bits_row, tb);
        kern.softmax(st, BQp, kn, m, l, alpha);
        kern.gemm(o, D, qn, D, st, 1, BQp, kn, vh + k0 * vs, vs, Init::kScale, alpha);
      });
      T* orow = op + ((b * g.Hq + h) * g.Nq + q0) * D;
      float* lrow = lp + (b * g.Hq + h) * g.Nq + q0;
      // l == 0: no allowed key (out 0, lse -inf). A NaN l (a NaN or +inf score, or NaN in a
      // product) is not empty: out and lse become NaN, as in the reference.
      for (int64_t i = 0; i < qn; ++i) {
        const float inv = l[i] == 0.0f ? 0.0f : 1.0f / l[i];
        for (int64_t d = 0; d < D; ++d) orow[i * D + d] = static_cast<T>(o[i * D + d] * inv);
        lrow[i] = l[i] == 0.0f ? -kInf : m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      return f(c10::BFloat16{});
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_kernel(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::TensorList layout,
    at::IntArrayRef layout_ints, double scale, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* op = "sparse_attention_fwd";
  const SparseLayoutArgs L = SparseLayoutArgs::from(op, layout, layout_ints);
  const at::Tensor &kv_num = L.kv_num, &kv_idx = L.kv_idx, &kv_bits = L.kv_bits;
  const at::Tensor &full_num = L.full_num, &full_idx = L.full_idx;
  const at::Tensor &q_doc = L.q_doc, &kv_doc = L.kv_doc, &bits = L.bits;
  const int64_t BQ = L.BQ, BK = L.BK, flags = L.flags, lo = L.lo, hi = L.hi, prefix = L.prefix;
  Rule rule;
  const Geometry g =
      check_inputs(op, q, k, v, BQ, BK, flags, scale, q_doc, kv_doc, bits, rule, lo, hi, prefix);
  const Mods md = check_mods(op, g, softcap, alibi_slopes);
  const bool has_bits = flags & kFlagBits;
  const int64_t nbits = has_bits ? bits.size(0) : 0;
  const auto nf = check_list(op, g, false, "full_num", "full_idx", nullptr, full_num, full_idx,
                             nullptr, 0);
  const auto np = check_list(op, g, false, "kv_num", "kv_idx", "kv_bits", kv_num, kv_idx,
                             has_bits ? &kv_bits : nullptr, nbits);
  at::Tensor out = empty_hinted({g.B, g.Hq, g.Nq, g.D}, q.options());
  at::Tensor lse = empty_hinted({g.B, g.Hq, g.Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    lse.fill_(-kInf);
    return {out, lse};
  }
  std::vector<int64_t> cost(nf.size());
  for (size_t i = 0; i < cost.size(); ++i) cost[i] = nf[i] + np[i];
  const at::Tensor kf = as_f32_rows(k), vf = as_f32_rows(v);
  const List full{Idx(full_num), Idx(full_idx), Idx()};
  const List part{Idx(kv_num), Idx(kv_idx), has_bits ? Idx(kv_bits) : Idx()};
  dispatch_float(q.scalar_type(), [&](auto t) {
    forward_typed<decltype(t)>(q, kf, vf, g, rule, md, full, part, cost, out, lse);
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------------------
// Backward

struct BwdData {
  const Geometry* g;
  const Rule* rule;
  const Mods* mods;
  Kernels kern;
  const float *qf, *kf, *vf, *dof, *lse, *delta;  // fp32, contiguous
};

// The per-q-block operands of a backward step: Q^T (scaled) and dO^T [D, BQp], lse (with +inf
// for an empty or padded row) and delta [BQp], document ids [BQp].
struct QSide {
  float *qt, *dot, *lse, *delta;
  int32_t* qdoc;
  uint32_t* tb;  // transposed block bitmask, BK * bit_words(BQ) words
};

void load_qside(const BwdData& p, int64_t b, int64_t h, int64_t q0, int64_t qn, QSide& s) {
  const Geometry& g = *p.g;
  const int64_t bh = b * g.Hq + h, BQp = g.BQp, D = g.D;
  const float* qr = p.qf + (bh * g.Nq + q0) * D;
  const float* dr = p.dof + (bh * g.Nq + q0) * D;
  for (int64_t d = 0; d < D; ++d) {
    std::fill(s.qt + d * BQp + qn, s.qt + (d + 1) * BQp, 0.0f);
    std::fill(s.dot + d * BQp + qn, s.dot + (d + 1) * BQp, 0.0f);
  }
  for (int64_t i = 0; i < qn; ++i)
    for (int64_t d = 0; d < D; ++d) {
      s.qt[d * BQp + i] = qr[i * D + d] * g.scale;
      s.dot[d * BQp + i] = dr[i * D + d];
    }
  for (int64_t i = 0; i < BQp; ++i) {
    const float x = i < qn ? p.lse[bh * g.Nq + q0 + i] : -kInf;
    s.lse[i] = x == -kInf ? kInf : x;
    s.delta[i] = i < qn ? p.delta[bh * g.Nq + q0 + i] : 0.0f;
  }
  if (p.rule->flags & kFlagDoc) load_qdoc(*p.rule, b, q0, qn, s.qdoc);
}

// dS^T (in st; of the unmodified scores) and P^T (in pt) of keys [k0, k0 + kn) against the
// q-block in s of query head h. dcap: scratch like st for the softcap's derivative.
void block_grads(const BwdData& p, int64_t b, int64_t h, const QSide& s, const float* kh,
                 const float* vh, int64_t k0, int64_t kn, int64_t q0, int64_t qn, bool partial,
                 int64_t bits_row, float* st, float* dpt, float* pt, float* dcap) {
  const Geometry& g = *p.g;
  const int64_t BQp = g.BQp, D = g.D;
  p.kern.gemm(st, BQp, kn, BQp, kh + k0 * D, D, 1, D, s.qt, BQp, Init::kZero, nullptr);
  if (p.mods->any()) p.kern.mods(*p.mods, b, h, st, BQp, k0, kn, q0, dcap);
  if (partial) p.kern.rule(*p.rule, b, st, BQp, k0, kn, q0, qn, s.qdoc, bits_row, s.tb);
  p.kern.gemm(dpt, BQp, kn, BQp, vh + k0 * D, D, 1, D, s.dot, BQp, Init::kZero, nullptr);
  p.kern.probs_grad(st, dpt, pt, BQp, kn, s.lse, s.delta);
  if (p.mods->softcap > 0.0f) {
    for (int64_t x = 0; x < kn * BQp; ++x) st[x] *= dcap[x];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_kernel(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, at::TensorList layout,
    at::IntArrayRef layout_ints, double scale, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* op = "sparse_attention_bwd";
  const SparseLayoutArgs L = SparseLayoutArgs::from(op, layout, layout_ints);
  const at::Tensor &kv_num = L.kv_num, &kv_idx = L.kv_idx, &kv_bits = L.kv_bits;
  const at::Tensor &full_num = L.full_num, &full_idx = L.full_idx;
  const at::Tensor &q_num = L.q_num, &q_idx = L.q_idx, &q_bits = L.q_bits;
  const at::Tensor &full_q_num = L.full_q_num, &full_q_idx = L.full_q_idx;
  const at::Tensor &q_doc = L.q_doc, &kv_doc = L.kv_doc, &bits = L.bits;
  const int64_t BQ = L.BQ, BK = L.BK, flags = L.flags, lo = L.lo, hi = L.hi, prefix = L.prefix;
  Rule rule;
  const Geometry g =
      check_inputs(op, q, k, v, BQ, BK, flags, scale, q_doc, kv_doc, bits, rule, lo, hi, prefix);
  const Mods md = check_mods(op, g, softcap, alibi_slopes);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": dout and out must have q's shape ", q.sizes(), "; got ", dout.sizes(), " and ",
              out.sizes());
  TORCH_CHECK(dout.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(), op,
              ": dout, out and lse must be CPU tensors");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == g.B && lse.size(1) == g.Hq && lse.size(2) == g.Nq,
              op, ": lse must be [", g.B, ", ", g.Hq, ", ", g.Nq, "]; got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32; got ",
              dtype_name(lse.scalar_type()));
  const bool has_bits = flags & kFlagBits;
  const int64_t nbits = has_bits ? bits.size(0) : 0;
  const auto nf = check_list(op, g, false, "full_num", "full_idx", nullptr, full_num, full_idx,
                             nullptr, 0);
  const auto np = check_list(op, g, false, "kv_num", "kv_idx", "kv_bits", kv_num, kv_idx,
                             has_bits ? &kv_bits : nullptr, nbits);
  const auto nfq = check_list(op, g, true, "full_q_num", "full_q_idx", nullptr, full_q_num,
                              full_q_idx, nullptr, 0);
  const auto npq = check_list(op, g, true, "q_num", "q_idx", "q_bits", q_num, q_idx,
                              has_bits ? &q_bits : nullptr, nbits);

  const auto contiguous_like = [](const at::Tensor& t) {
    return empty_hinted(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  };
  at::Tensor dq = contiguous_like(q);
  at::Tensor dk = contiguous_like(k);
  at::Tensor dv = contiguous_like(v);
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor kf = k.to(at::kFloat).contiguous();
  const at::Tensor vf = v.to(at::kFloat).contiguous();
  const at::Tensor dof = dout.to(at::kFloat).contiguous();
  const at::Tensor lsef = lse.contiguous();
  const at::Tensor delta = at::sum(at::mul(dof, out.to(at::kFloat)), {-1}).contiguous();
  const BwdData p{&g,
                  &rule,
                  &md,
                  pick_kernels(),
                  qf.data_ptr<float>(),
                  kf.data_ptr<float>(),
                  vf.data_ptr<float>(),
                  dof.data_ptr<float>(),
                  lsef.data_ptr<float>(),
                  delta.data_ptr<float>()};
  const List full{Idx(full_num), Idx(full_idx), Idx()};
  const List part{Idx(kv_num), Idx(kv_idx), has_bits ? Idx(kv_bits) : Idx()};
  const List full_q{Idx(full_q_num), Idx(full_q_idx), Idx()};
  const List part_q{Idx(q_num), Idx(q_idx), has_bits ? Idx(q_bits) : Idx()};
  const int64_t BQp = g.BQp, D = g.D;
  const int64_t tb_words = BK * bit_words(g.BQ);
  const int64_t qside = 2 * D * BQp + 3 * BQp + tb_words;
  // S^T, dP^T, P^T and, with a softcap, its derivative (the scratch is as before without one).
  const bool cap = md.softcap > 0.0f;
  const int64_t blocks = (cap ? 4 : 3) * BK * BQp;

  dispatch_float(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    // dq: items (b, h, q-block) over the forward lists.
    std::vector<int64_t> cost(nf.size());
    for (size_t i = 0; i < cost.size(); ++i) cost[i] = nf[i] + np[i];
    const std::vector<int64_t> order = by_cost(cost);
    T* dqp = static_cast<T*>(dq.data_ptr());
    run_dynamic(order, [&](std::atomic<int64_t>& next, int64_t n, int64_t) {
      Scratch ws(qside + blocks + g.BQ * D + BQp);
      QSide s{ws.take(D * BQp), ws.take(D * BQp), ws.take(BQp), ws.take(BQp),
              reinterpret_cast<int32_t*>(ws.take(BQp)),
              reinterpret_cast<uint32_t*>(ws.take(tb_words))};
      float* st = ws.take(BK * BQp);
      float* dpt = ws.take(BK * BQp);
      float* pt = ws.take(BK * BQp);
      float* dcap = cap ? ws.take(BK * BQp) : nullptr;
      float* acc = ws.take(g.BQ * D);
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        const int64_t item = order[i];
        const int64_t qb = item % g.nQB, bh = item / g.nQB, h = bh % g.Hq, b = bh / g.Hq;
        const int64_t q0 = qb * g.BQ, qn = std::min(g.BQ, g.Nq - q0);
        const int64_t kvh = h / g.G;
        const float* kh = p.kf + (b * g.Hkv + kvh) * g.Nk * D;
        const float* vh = p.vf + (b * g.Hkv + kvh) * g.Nk * D;
        load_qside(p, b, h, q0, qn, s);
        std::fill(acc, acc + g.BQ * D, 0.0f);
        for_each_block(full, part, b, h, qb, [&](int64_t kb, bool partial, int64_t bits_row) {
          const int64_t k0 = kb * BK, kn = std::min(BK, g.Nk - k0);
          block_grads(p, b, h, s, kh, vh, k0, kn, q0, qn, partial, bits_row, st, dpt, pt, dcap);
          // dq += dS K (the scale is applied once at the end).
          p.kern.gemm(acc, D, qn, D, st, 1, BQp, kn, kh + k0 * D, D, Init::kAccumulate, nullptr);
        });
        T* dst = dqp + (bh * g.Nq + q0) * D;
        for (int64_t x = 0; x < qn * D; ++x) dst[x] = static_cast<T>(acc[x] * g.scale);
      }
    });

    // dk, dv: items (b, kv head, kv-block) over the transposed lists of the group's q heads.
    std::vector<int64_t> kcost(g.B * g.Hkv * g.nKB, 0);
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.Hq; ++h)
        for (int64_t kb = 0; kb < g.nKB; ++kb) {
          const int64_t src = (b * g.Hq + h) * g.nKB + kb;
          kcost[(b * g.Hkv + h / g.G) * g.nKB + kb] += nfq[src] + npq[src];
        }
    const std::vector<int64_t> korder = by_cost(kcost);
    T* dkp = static_cast<T*>(dk.data_ptr());
    T* dvp = static_cast<T*>(dv.data_ptr());
    run_dynamic(korder, [&](std::atomic<int64_t>& next, int64_t n, int64_t) {
      Scratch ws(qside + blocks + 2 * BK * D);
      QSide s{ws.take(D * BQp), ws.take(D * BQp), ws.take(BQp), ws.take(BQp),
              reinterpret_cast<int32_t*>(ws.take(BQp)),
              reinterpret_cast<uint32_t*>(ws.take(tb_words))};
      float* st = ws.take(BK * BQp);
      float* dpt = ws.take(BK * BQp);
      float* pt = ws.take(BK * BQp);
      float* dcap = cap ? ws.take(BK * BQp) : nullptr;
      float* dka = ws.take(BK * D);
      float* dva = ws.take(BK * D);
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        const int64_t item = korder[i];
        const int64_t kb = item % g.nKB, bk = item / g.nKB, kvh = bk % g.Hkv, b = bk / g.Hkv;
        const int64_t k0 = kb * BK, kn = std::min(BK, g.Nk - k0);
        const float* kh = p.kf + bk * g.Nk * D;
        const float* vh = p.vf + bk * g.Nk * D;
        std::fill(dka, dka + BK * D, 0.0f);
        std::fill(dva, dva + BK * D, 0.0f);
        for (int64_t h = kvh * g.G; h < (kvh + 1) * g.G; ++h) {
          const int64_t bh = b * g.Hq + h;
          for_each_block(full_q, part_q, b, h, kb,
                         [&](int64_t qb, bool partial, int64_t bits_row) {
            const int64_t q0 = qb * g.BQ, qn = std::min(g.BQ, g.Nq - q0);
            load_qside(p, b, h, q0, qn, s);
            block_grads(p, b, h, s, kh, vh, k0, kn, q0, qn, partial, bits_row, st, dpt, pt,
                        dcap);
            // dv += P^T dO, dk += dS^T Q (scale applied at the end).
            p.kern.gemm(dva, D, kn, D, pt, BQp, 1, qn, p.dof + (bh * g.Nq + q0) * D, D,
                        Init::kAccumulate, nullptr);
            p.kern.gemm(dka, D, kn, D, st, BQp, 1, qn, p.qf + (bh * g.Nq + q0) * D, D,
                        Init::kAccumulate, nullptr);
          });
        }
        T* dkd = dkp + (bk * g.Nk + k0) * D;
        T* dvd = dvp + (bk * g.Nk + k0) * D;
        for (int64_t x = 0; x < kn * D; ++x) {
          dkd[x] = static_cast<T>(dka[x] * g.scale);
          dvd[x] = static_cast<T>(dva[x]);
        }
      }
    });
  });
  return {dq, dk, dv};
}

// Head dims that are a multiple of 8 but not of 16: the register tiles take 16 columns at a
// time, so q, k, v (and dout, out) get zero columns up to the next multiple of 16 (they add
// nothing to q.k), and the extra output columns are dropped: O(N D) copies against the
// O(N w D) work. Anything else goes to the kernels as it is, and their checks.
bool needs_padding(std::initializer_list<const at::Tensor*> ts) {
  const at::Tensor& q = **ts.begin();
  if (q.dim() != 4 || q.size(3) % 8 != 0 || q.size(3) % 16 == 0 || q.size(3) > 256) return false;
  for (const at::Tensor* t : ts) {
    if (t->dim() != 4 || t->size(3) != q.size(3)) return false;
  }
  return true;
}

at::Tensor pad_d(const at::Tensor& x) { return at::constant_pad_nd(x, {0, 8}, 0); }

at::Tensor unpad_d(const at::Tensor& x) { return x.narrow(3, 0, x.size(3) - 8).contiguous(); }

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::TensorList layout,
    at::IntArrayRef layout_ints, double scale, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  if (!needs_padding({&q, &k, &v})) {
    return fwd_kernel(q, k, v, layout, layout_ints, scale, softcap, alibi_slopes);
  }
  auto [out, lse] = fwd_kernel(pad_d(q), pad_d(k), pad_d(v), layout, layout_ints, scale, softcap,
                               alibi_slopes);
  return {unpad_d(out), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, at::TensorList layout,
    at::IntArrayRef layout_ints, double scale, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  if (!needs_padding({&q, &k, &v, &dout, &out})) {
    return bwd_kernel(dout, q, k, v, out, lse, layout, layout_ints, scale, softcap, alibi_slopes);
  }
  auto [dq, dk, dv] = bwd_kernel(pad_d(dout), pad_d(q), pad_d(k), pad_d(v), pad_d(out), lse,
                                 layout, layout_ints, scale, softcap, alibi_slopes);
  return {unpad_d(dq), unpad_d(dk), unpad_d(dv)};
}

}  // namespace
}  // namespace frugal::cpu

TORCH_LIBRARY_IMPL(frugal, CPU, m) {
  m.impl("sparse_attention_fwd", &frugal::cpu::sparse_attention_fwd_cpu);
  m.impl("sparse_attention_bwd", &frugal::cpu::sparse_attention_bwd_cpu);
}
