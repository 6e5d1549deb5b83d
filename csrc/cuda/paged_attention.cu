// Paged KV-cache on the GPU: paged_append, paged_attention (decode, split-KV) and
// paged_prefill_attention (chunked prefill), with the semantics of csrc/cpu/paged_attention.cpp
// and python/frugal/reference.py. No torch headers: the glue is csrc/cuda/paged_attention_op.cpp
// (and, for the host-emulated build the tests run, csrc/cuda_emu/module.cpp).
//
// Attention data flow (decode and prefill alike). A warp owns 8 query rows (decode: 8 query
// heads of one kv head, the GQA group; prefill: 8 (token, head) pairs, token-major) and
// multiplies them with tensor cores, m16n8k16 for S = Q K^T and m16n8k8 for O += P V, rows
// 8..15 of the m16 tile zero. Rows 8..15 are wasted on purpose: decode is memory-bound (16 rows
// of fp16 mma are ~30 flop per cache byte, the tensor cores sustain ~300 per byte of HBM
// bandwidth) and using them would double the fp32 O accumulators (D / 2 registers per lane),
// which spills at D = 256. A tile is 8 positions (the mma's N for S, K for P V).
//
// No ldmatrix and no cross-lane shuffles of K or V: the order of the head dimension inside a
// dot product and of the positions inside P V is free, so each lane loads exactly the 16-byte
// chunks its fragments need. For S, lane (g, t) holds position g of the tile, head-dim
// elements [32 i + 8 t, +8) for chunk i: elements 0..3 are its B registers of k-step 2i, 4..7
// of k-step 2i+1, and the Q fragment is laid out the same way (so the A registers are plain q
// pairs). For P V, lane (g, t) holds positions 2t and 2t+1, elements [64 i + 8 g, +8): element
// j of the two, paired, is the B register of mma (i, j), whose output column 2t + e is head-dim
// element 64 i + 16 t + 8 e + j; the S accumulator (row g, positions 2t, 2t+1) is already P's
// A register (the FlashAttention-2 register reuse). A lane thus ends with 16 consecutive
// outputs per 64 elements of D. Four lanes read 64 contiguous bytes of a K row, eight read
// 128 of a V row: every sector loaded is used.
//
// fp16 / bf16 q: mma in q's type; an int8 cache converts exactly (|x| <= 127) and its per-token
// scales multiply the score column (k) and the probability column (v) in fp32. fp32 q: every
// operand is split into three bf16 terms (x = x0 + x1 + x2, 24 significant bits) and the
// products of order <= 2 are summed (6 mma for fp32 x fp32, 3 over an int8 cache, whose values
// are exact in bf16), which keeps fp32 accuracy (the dropped terms are ~2^-24 relative) on the
// tensor cores. Rejected: tf32 (10-bit mantissa, fails fp32 tolerances) and 3xTF32 (m16n8k8
// tf32 has other fragment layouts, a second data flow to maintain for the same accuracy).
//
// K/V move global -> shared with cp.async (16 bytes; 8 for int8, whose chunks are 8 bytes) and
// a zero fill for masked positions, so an unused slot (a -1 table entry, a NaN-poisoned block)
// is never read. Caches whose strides or base break the 16-byte alignment are loaded element
// by element instead (same layout in shared memory); the choice is one uniform branch.
//
// paged_attention (decode). Grid (B * Hkv * cdiv(G, 8), splits), 4 warps. The warps of a block
// take the partition's 8-position tiles round robin, each streaming its own through a private
// ring of `stages` tiles in shared memory (a lane reads only the chunks it copied itself, so the
// pipeline needs no barrier), and keep their own online softmax (running max m, sum l, O) in
// base 2 (scale * log2(e) folded into one multiply). At the end the 4 states merge through
// shared memory (log-sum-exp) and the block writes the result in q's dtype, or, when split,
// its partition's normalized O and lse = m + log2(l) into the fp32 workspace; the merge kernel
// (grid B * Hq) then combines the partitions a sequence has: out = sum_s 2^(lse_s - M) O_s /
// sum_s 2^(lse_s - M), M = max_s lse_s (vLLM paged_attention v2's max-logit / exp-sum merge).
//
// Split plan (plan_paged_attention, host, no device value read: CUDA graph friendly). units =
// B * Hkv * cdiv(G, 8) blocks; target = resident blocks per SM (occupancy calculator) * SMs:
// one full wave. Nothing is split when units >= target or the longest span fits min_partition
// (512, vLLM v2's partition); else partition = max(min_partition, ceil(span / floor(target /
// units))) rounded up to the tile and splits = cdiv(span, partition), where span is the table
// capacity (width * block_size) or, with a window, window + 7 when smaller. The Triton kernel
// (kernels/paged_attention.py) rounds target / units up instead, which can start a second
// wave that is mostly empty. As there and in FlashInfer's split-KV, partitions start at the
// window start rounded down to the tile; one past a sequence's end exits at once and the merge
// never reads it (it derives the count from seq_len with the same formula).
//
// paged_prefill_attention. A block is 32 rows (4 warps x 8) of one sequence and kv head; all
// warps read the same K/V tiles (2 tiles of 8 positions per stage, 2 stages, copied
// cooperatively, one barrier per stage) from the window start of the block's first token to
// its last token's position, each row masking positions after its own and at or before
// pos - window. The grid needs no host sync either: sequence b's tiles take indices from
// floor(cu[b] * G / 32) + b (a valid packing, since cdiv(n * G, 32) <= floor((x + n G) / 32) -
// floor(x / 32) + 1), so grid.x = floor(N * G / 32) + B; a block finds its sequence by binary
// search over cu_seqlens_q, at most B of them find nothing to do, and a sequence's last tokens
// (the longest spans) run first.
//
// Score modifiers (frugal/score_mods.py): the kMods instantiations of decode and prefill cap
// each base-2 score x as c2 tanh(x / c2) (c2 = softcap * log2(e)) and subtract slope * log2(e)
// * |q_pos - k_pos| before the online softmax; the launchers pick them only when a call has
// a modifier, so the plain kernels are the ones without.
//
// paged_append. One warp per (token, kv head, k or v) row, a lane per 8 elements; int8 caches
// quantize each row as quantize_per_token does (absmax over the warp by shuffles, IEEE
// division by 127, round half to even, zero row -> scale 0, inf / NaN -> scale NaN and zeros).
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/device.h"
#include "cuda/launch.h"

namespace frugal::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 8;             // positions per tile
constexpr int kRows = 8;             // query rows per warp
constexpr int kPrefillSub = 2;       // tiles per prefill stage
constexpr int kPrefillStages = 2;
constexpr int kPrefillRows = kWarps * kRows;
constexpr int kAppendWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

// Kernel parameters, derived once on the host from PagedAttentionArgs.
struct AttnParams {
  const void* q;
  int64_t q_s0, q_s1;
  void* out;
  const void* k;
  const void* v;
  int64_t k_s0, k_s1, k_s2, v_s0, v_s1, v_s2;
  const float* ks;
  const float* vs;
  int64_t ks_s0, ks_s1, ks_s2, vs_s0, vs_s1, vs_s2;
  const int32_t* table;
  int64_t table_s0;
  const int32_t* lens;
  const int32_t* cu;
  float* lse;  // [rows, Hq], natural log, or nullptr
  float* ws_o;
  float* ws_lse;
  int B, Hq, Hkv, G, D, shift, capacity, window, partition, splits, tiles;
  float scale_log2;
  float softcap_log2;   // softcap * log2(e); 0: none
  const float* alibi;   // [B, Hq] ALiBi slopes, or nullptr
  bool kv_aligned;
};

// ------------------------------------------------------------------ element types

// The tensor-core input type for q of type QT, and how many bf16 terms an fp32 value needs.
template <typename QT>
struct Math {
  using M = QT;
  static constexpr int kParts = 1;
};
template <>
struct Math<float> {
  using M = __nv_bfloat16;
  static constexpr int kParts = 3;
};

template <typename KT, typename M>
constexpr int cache_parts() {
  return std::is_same_v<KT, float> ? 3 : 1;  // int8 and 16-bit caches are exact in M
}

template <typename M>
constexpr bool is_bf16() {
  return std::is_same_v<M, __nv_bfloat16>;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return static_cast<float>(x);
  }
}

// A 16-bit float (__half or __nv_bfloat16) given by its bits.
template <typename T>
__device__ __forceinline__ float bits_to_float(uint16_t u) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = u;
    return __half2float(__half(r));
  } else {
    __nv_bfloat16_raw r;
    r.x = u;
    return __bfloat162float(__nv_bfloat16(r));
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// Term p of the bf16 split x = x0 + x1 + x2 (p < parts; parts == 1 is x itself).
template <int PARTS>
__device__ __forceinline__ void split(float x, float out[PARTS]) {
  if constexpr (PARTS == 1) {
    out[0] = x;
  } else {
#pragma unroll
    for (int p = 0; p < PARTS; ++p) {
      out[p] = __bfloat162float(__float2bfloat16_rn(x));
      x -= out[p];
    }
  }
}

// Eight consecutive cache elements from shared memory as floats.
template <typename KT>
__device__ __forceinline__ void chunk_floats(const unsigned char* c, float f[8]) {
  if constexpr (std::is_same_v<KT, float>) {
    const float4 a = reinterpret_cast<const float4*>(c)[0];
    const float4 b = reinterpret_cast<const float4*>(c)[1];
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
  } else if constexpr (std::is_same_v<KT, int8_t>) {
    const uint2 u = *reinterpret_cast<const uint2*>(c);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      f[e] = static_cast<float>(static_cast<int8_t>((u.x >> (8 * e)) & 0xffu));
      f[4 + e] = static_cast<float>(static_cast<int8_t>((u.y >> (8 * e)) & 0xffu));
    }
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(c);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      f[2 * e] = bits_to_float<KT>(static_cast<uint16_t>(w[e] & 0xffffu));
      f[2 * e + 1] = bits_to_float<KT>(static_cast<uint16_t>(w[e] >> 16));
    }
  }
}

// The S B-registers of a K chunk: w[p][e] pairs elements 2e, 2e+1 (term p).
template <typename KT, typename M, int KP>
__device__ __forceinline__ void k_words(const unsigned char* c, uint32_t w[KP][4]) {
  if constexpr (std::is_same_v<KT, M>) {
    const uint4 u = *reinterpret_cast<const uint4*>(c);
    w[0][0] = u.x, w[0][1] = u.y, w[0][2] = u.z, w[0][3] = u.w;
  } else {
    float f[8];
    chunk_floats<KT>(c, f);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float lo[KP], hi[KP];
      split<KP>(f[2 * e], lo);
      split<KP>(f[2 * e + 1], hi);
#pragma unroll
      for (int p = 0; p < KP; ++p) w[p][e] = dev::pack2<M>(lo[p], hi[p]);
    }
  }
}

// The P V B-registers of two V chunks (positions 2t, 2t+1): w[p][j] = (v0[j], v1[j]).
template <typename KT, typename M, int KP>
__device__ __forceinline__ void v_words(const unsigned char* c0, const unsigned char* c1,
                                        uint32_t w[KP][8]) {
  if constexpr (std::is_same_v<KT, M>) {
    const uint4 a = *reinterpret_cast<const uint4*>(c0);
    const uint4 b = *reinterpret_cast<const uint4*>(c1);
    const uint32_t x[4] = {a.x, a.y, a.z, a.w}, y[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      w[0][2 * e] = __byte_perm(x[e], y[e], 0x5410);      // low halves
      w[0][2 * e + 1] = __byte_perm(x[e], y[e], 0x7632);  // high halves
    }
  } else {
    float f0[8], f1[8];
    chunk_floats<KT>(c0, f0);
    chunk_floats<KT>(c1, f1);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float a[KP], b[KP];
      split<KP>(f0[j], a);
      split<KP>(f1[j], b);
#pragma unroll
      for (int p = 0; p < KP; ++p) w[p][j] = dev::pack2<M>(a[p], b[p]);
    }
  }
}

// ------------------------------------------------------------------ shared-memory layouts

// One warp's view of one 8-position tile: per lane, the K chunks of its position (DB / 32),
// the V chunks of its two positions (DB / 64 each) and, for int8, the four scales (k and v of
// positions 2t, 2t+1). Chunk c of every lane is contiguous ([c][lane]), so a warp's loads of
// it are one conflict-free wavefront set.
template <typename KT, int DB>
struct TileLayout {
  static constexpr int kChunk = 8 * static_cast<int>(sizeof(KT));
  static constexpr int kK = DB / 32;
  static constexpr int kV = DB / 64 * 2;
  static constexpr bool kScales = std::is_same_v<KT, int8_t>;
  static constexpr int kItems = kK + kV + (kScales ? 1 : 0);
  static constexpr int kBytes = 32 * ((kK + kV) * kChunk + (kScales ? 16 : 0));
  __device__ static unsigned char* k(unsigned char* tile, int i, int lane) {
    return tile + (i * 32 + lane) * kChunk;
  }
  __device__ static unsigned char* v(unsigned char* tile, int i, int u, int lane) {
    return tile + ((kK + 2 * i + u) * 32 + lane) * kChunk;
  }
  __device__ static float* scales(unsigned char* tile, int lane) {
    return reinterpret_cast<float*>(tile + (kK + kV) * 32 * kChunk) + 4 * lane;
  }
};

// Q fragments: per term and chunk i, each lane's 8 q elements [32 i + 8 t, +8) of row g as four
// packed pairs (16 bytes), [part][i][lane].
template <typename QT, int DB>
struct QLayout {
  static constexpr int kParts = Math<QT>::kParts;
  static constexpr int kBytes = kParts * (DB / 32) * 32 * 16;
};

template <typename KT, int DB>
constexpr int decode_stages() {
  constexpr int per = kWarps * TileLayout<KT, DB>::kBytes;
  constexpr int s = 48 * 1024 / per;
  return s < 2 ? 2 : (s > 4 ? 4 : s);
}

template <typename QT, typename KT, int DB>
constexpr int decode_smem() {
  constexpr int ring = kWarps * decode_stages<KT, DB>() * TileLayout<KT, DB>::kBytes;
  constexpr int merge = kWarps * kRows * (DB + 2) * 4;
  return QLayout<QT, DB>::kBytes + (ring > merge ? ring : merge);
}

template <typename QT, typename KT, int DB>
constexpr int prefill_smem() {
  return kWarps * QLayout<QT, DB>::kBytes +
         kPrefillStages * kPrefillSub * TileLayout<KT, DB>::kBytes;
}

// ------------------------------------------------------------------ shared device code

// Writes the Q fragment of one lane and chunk: q_row points at the row's element 32 i + 8 t
// (nullptr: a padding row or past D, zeros).
template <typename QT, int DB>
__device__ __forceinline__ void store_q_chunk(unsigned char* qf, int i, int lane,
                                              const QT* q_row) {
  using M = typename Math<QT>::M;
  constexpr int P = Math<QT>::kParts;
  float x[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = q_row != nullptr ? to_float(q_row[e]) : 0.0f;
  uint32_t w[P][4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float lo[P], hi[P];
    split<P>(x[2 * e], lo);
    split<P>(x[2 * e + 1], hi);
#pragma unroll
    for (int p = 0; p < P; ++p) w[p][e] = dev::pack2<M>(lo[p], hi[p]);
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    reinterpret_cast<uint4*>(qf)[(p * (DB / 32) + i) * 32 + lane] =
        make_uint4(w[p][0], w[p][1], w[p][2], w[p][3]);
  }
}

// Cache row (page, offset, head) of a position, through the block table.
struct Row {
  int64_t page, offset;
};

__device__ __forceinline__ Row locate(const AttnParams& p, const int32_t* table_row, int pos) {
  return {static_cast<int64_t>(table_row[pos >> p.shift]),
          static_cast<int64_t>(pos & ((1 << p.shift) - 1))};
}

// Copies 8 elements (one chunk) of a cache row into shared memory, or zeros when !valid.
template <typename KT>
__device__ __forceinline__ void copy_chunk(unsigned char* dst, const KT* src, bool valid,
                                           bool aligned) {
  constexpr int kBytes = 8 * static_cast<int>(sizeof(KT));
  if (aligned) {
    if constexpr (kBytes == 32) {
      dev::cp_async<16>(dst, src, valid);
      dev::cp_async<16>(dst + 16, src + 4, valid);
    } else {
      dev::cp_async<kBytes>(dst, src, valid);
    }
  } else if (valid) {
#pragma unroll
    for (int e = 0; e < 8; ++e) reinterpret_cast<KT*>(dst)[e] = src[e];
  } else {
#pragma unroll
    for (int e = 0; e < kBytes / 4; ++e) reinterpret_cast<uint32_t*>(dst)[e] = 0u;
  }
}

// Issues item `item` of a tile starting at position n0 for lane role (g, t): a K chunk, a V
// chunk or (int8) the scales. Positions outside [lo, end) are zero-filled, never read.
template <typename KT, int DB>
__device__ __forceinline__ void issue_item(const AttnParams& p, unsigned char* tile, int item,
                                           int lane, int h, const int32_t* table_row, int n0,
                                           int lo, int end) {
  using L = TileLayout<KT, DB>;
  const int g = lane >> 2, t = lane & 3;
  const KT* kc = static_cast<const KT*>(p.k);
  const KT* vc = static_cast<const KT*>(p.v);
  if (item < L::kK) {
    const int i = item, d = 32 * i + 8 * t, pos = n0 + g;
    if (32 * i >= p.D) return;  // never read
    const bool valid = pos >= lo && pos < end && d < p.D;
    const KT* src = kc;
    if (valid) {
      const Row r = locate(p, table_row, pos);
      src = kc + r.page * p.k_s0 + r.offset * p.k_s1 + h * p.k_s2 + d;
    }
    copy_chunk<KT>(L::k(tile, i, lane), src, valid, p.kv_aligned);
  } else if (item < L::kK + L::kV) {
    const int i = (item - L::kK) / 2, u = (item - L::kK) % 2;
    const int d = 64 * i + 8 * g, pos = n0 + 2 * t + u;
    if (64 * i >= p.D) return;
    const bool valid = pos >= lo && pos < end && d < p.D;
    const KT* src = vc;
    if (valid) {
      const Row r = locate(p, table_row, pos);
      src = vc + r.page * p.v_s0 + r.offset * p.v_s1 + h * p.v_s2 + d;
    }
    copy_chunk<KT>(L::v(tile, i, u, lane), src, valid, p.kv_aligned);
  } else if constexpr (L::kScales) {
    float* dst = L::scales(tile, lane);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int pos = n0 + 2 * t + u;
      const bool valid = pos >= lo && pos < end;
      const float* ks = p.ks;
      const float* vs = p.vs;
      if (valid) {
        const Row r = locate(p, table_row, pos);
        ks += r.page * p.ks_s0 + r.offset * p.ks_s1 + h * p.ks_s2;
        vs += r.page * p.vs_s0 + r.offset * p.vs_s1 + h * p.vs_s2;
      }
      dev::cp_async<4>(dst + u, ks, valid);
      dev::cp_async<4>(dst + 2 + u, vs, valid);
    }
  }
}

// A warp's online-softmax state for its 8 rows: lane (g, t) holds row g's running max m (the
// same in its 4 lanes), its share of the sum l (reduced at the end) and O columns 64 i + 16 t +
// 8 e + j as o[i][j][e].
template <int DB>
struct State {
  float m, l;
  float o[DB / 64][8][2];
};

template <int DB>
__device__ __forceinline__ void init_state(State<DB>& st) {
  st.m = -kInf;
  st.l = 0.0f;
#pragma unroll
  for (int i = 0; i < DB / 64; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) st.o[i][j][0] = st.o[i][j][1] = 0.0f;
}

// Score modifiers (frugal/score_mods.py) of row g in the kMods kernels: its ALiBi slope times
// log2(e) (0: none) and its query position.
struct RowMods {
  float slope2;
  int q_pos;
};

// The row's mods: the slope of query head `head` of sequence b, at query position q_pos.
__device__ __forceinline__ RowMods row_mods(const AttnParams& p, int b, int head, bool live,
                                            int q_pos) {
  const float slope = p.alibi != nullptr && live ? p.alibi[b * p.Hq + head] : 0.0f;
  return {slope * kLog2e, q_pos};
}

// Steps 2-3 of frugal/score_mods.py on a base-2 score x = s log2(e): the natural score's cap
// c tanh(s / c) is, in base 2, c2 tanh(x / c2) with c2 = c log2(e); then the ALiBi bias of the
// key at k_pos, slope2 |q_pos - k_pos|.
__device__ __forceinline__ float modified(const AttnParams& p, float x, const RowMods& r,
                                          int k_pos) {
  if (p.softcap_log2 > 0.0f) x = p.softcap_log2 * tanhf(x / p.softcap_log2);
  return x - r.slope2 * fabsf(static_cast<float>(r.q_pos - k_pos));
}

// One tile for the warp's 8 rows: S = Q K^T, online softmax, O += P V. keep0 / keep1: whether
// row g may see positions 2t / 2t+1 of the tile, pos0 (position 2t); kMods: modify the scores
// by `mods`.
template <typename QT, typename KT, int DB, bool kMods>
__device__ __forceinline__ void attend_tile(const AttnParams& p, unsigned char* tile,
                                            const unsigned char* qf, int lane, bool keep0,
                                            bool keep1, int pos0, const RowMods& mods,
                                            State<DB>& st) {
  using L = TileLayout<KT, DB>;
  using M = typename Math<QT>::M;
  constexpr int QP = Math<QT>::kParts;
  constexpr int KP = cache_parts<KT, M>();
  constexpr int NP = QP > KP ? QP : KP;  // products of order < NP are kept
  constexpr bool BF = is_bf16<M>();
  const uint4* qw = reinterpret_cast<const uint4*>(qf);

  // The leading term accumulates apart from the split's small ones (fp32 q), whose sum is
  // 2^-8 of it: added into one accumulator, each small term would round at the big sum's ulp,
  // and the 6 terms per k-step made the fp32 error 3.5x the C++ CPU kernel's at D = 256
  // (against float64; now on par).
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, c_lo[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < DB / 32; ++i) {
    if (32 * i >= p.D) break;
    uint32_t kw[KP][4];
    k_words<KT, M, KP>(L::k(tile, i, lane), kw);
#pragma unroll
    for (int qp = 0; qp < QP; ++qp) {
      const uint4 q4 = qw[(qp * (DB / 32) + i) * 32 + lane];
      const uint32_t qa[2][2] = {{q4.x, q4.y}, {q4.z, q4.w}};
#pragma unroll
      for (int kp = 0; kp < KP; ++kp) {
        if (qp + kp >= NP) continue;
        float* acc = qp + kp == 0 ? c : c_lo;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const uint32_t a[4] = {qa[hh][0], 0u, qa[hh][1], 0u};
          const uint32_t b[2] = {kw[kp][2 * hh], kw[kp][2 * hh + 1]};
          dev::mma_m16n8k16<BF>(acc, a, b, acc);
        }
      }
    }
  }
  if constexpr (NP > 1) {
    c[0] += c_lo[0];
    c[1] += c_lo[1];
  }

  float sc0 = p.scale_log2, sc1 = p.scale_log2, vs0 = 1.0f, vs1 = 1.0f;
  if constexpr (L::kScales) {
    const float4 sc = *reinterpret_cast<const float4*>(L::scales(tile, lane));
    sc0 *= sc.x;
    sc1 *= sc.y;
    vs0 = sc.z;
    vs1 = sc.w;
  }
  float x0 = c[0] * sc0, x1 = c[1] * sc1;
  if constexpr (kMods) {
    x0 = modified(p, x0, mods, pos0);
    x1 = modified(p, x1, mods, pos0 + 1);
  }
  const float s0 = keep0 ? x0 : -kInf;
  const float s1 = keep1 ? x1 : -kInf;
  float mt = fmaxf(s0, s1);
  mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
  mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
  const float m_new = fmaxf(st.m, mt);
  const float base = m_new == -kInf ? 0.0f : m_new;  // a row that has seen nothing stays empty
  const float alpha = exp2f(st.m - base);
  const float p0 = exp2f(s0 - base), p1 = exp2f(s1 - base);
  st.l = st.l * alpha + p0 + p1;
  st.m = m_new;

  float pa[QP], pb[QP];
  split<QP>(p0 * vs0, pa);
  split<QP>(p1 * vs1, pb);
  uint32_t pw[QP];
#pragma unroll
  for (int pp = 0; pp < QP; ++pp) pw[pp] = dev::pack2<M>(pa[pp], pb[pp]);

#pragma unroll
  for (int i = 0; i < DB / 64; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      st.o[i][j][0] *= alpha;
      st.o[i][j][1] *= alpha;
    }
    if (64 * i >= p.D) continue;
    uint32_t vw[KP][8];
    v_words<KT, M, KP>(L::v(tile, i, 0, lane), L::v(tile, i, 1, lane), vw);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float acc[4] = {st.o[i][j][0], st.o[i][j][1], 0.0f, 0.0f};
#pragma unroll
      for (int pp = 0; pp < QP; ++pp) {
#pragma unroll
        for (int vp = 0; vp < KP; ++vp) {
          if (pp + vp >= NP) continue;
          const uint32_t a[2] = {pw[pp], 0u};
          dev::mma_m16n8k8<BF>(acc, a, vw[vp][j], acc);
        }
      }
      st.o[i][j][0] = acc[0];
      st.o[i][j][1] = acc[1];
    }
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float v[8]) {
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = dev::pack2<T>(v[2 * e], v[2 * e + 1]);
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// ------------------------------------------------------------------ decode

template <typename QT, typename KT, int DB, bool kMods>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const AttnParams p) {
  using L = TileLayout<KT, DB>;
  constexpr int S = decode_stages<KT, DB>();
  unsigned char* smem = dev::dynamic_smem<unsigned char>();
  unsigned char* qf = smem;
  unsigned char* area = smem + QLayout<QT, DB>::kBytes;

  const int chunks = (p.G + kRows - 1) / kRows;
  const int c = blockIdx.x % chunks;
  const int h = (blockIdx.x / chunks) % p.Hkv;
  const int b = blockIdx.x / chunks / p.Hkv;
  const int split_idx = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int seq_len = min(max(p.lens[b], 0), p.capacity);
  const int lo = p.window > 0 ? max(seq_len - p.window, 0) : 0;
  const int start = lo / kTile * kTile + split_idx * p.partition;
  const int end = min(seq_len, start + p.partition);
  if (p.splits > 1 && start >= end) return;  // past this sequence's end: the merge skips it

  const QT* q = static_cast<const QT*>(p.q) + b * p.q_s0;
  for (int it = threadIdx.x; it < DB / 32 * 32; it += kThreads) {
    const int i = it / 32, l = it % 32;
    const int row = c * kRows + (l >> 2), d = 32 * i + 8 * (l & 3);
    const bool live = row < p.G && d < p.D;
    store_q_chunk<QT, DB>(qf, i, l, live ? q + (h * p.G + row) * p.q_s1 + d : nullptr);
  }
  __syncthreads();

  const int32_t* table_row = p.table + b * p.table_s0;
  const int ntiles = end > start ? (end - start + kTile - 1) / kTile : 0;
  const int mine = ntiles > warp ? (ntiles - warp + kWarps - 1) / kWarps : 0;
  unsigned char* ring = area + warp * S * L::kBytes;
  const auto issue = [&](int j) {  // this warp's j-th tile into slot j % S
    unsigned char* tile = ring + (j % S) * L::kBytes;
    const int n0 = start + (warp + j * kWarps) * kTile;
#pragma unroll
    for (int item = 0; item < L::kItems; ++item) {
      issue_item<KT, DB>(p, tile, item, lane, h, table_row, n0, lo, end);
    }
  };

  State<DB> st;
  init_state(st);
  const int row_g = c * kRows + (lane >> 2);
  const RowMods mods =
      kMods ? row_mods(p, b, h * p.G + row_g, row_g < p.G, seq_len - 1) : RowMods{0.0f, 0};
#pragma unroll
  for (int j = 0; j < S - 1; ++j) {
    if (j < mine) issue(j);
    dev::cp_async_commit();
  }
  for (int j = 0; j < mine; ++j) {
    if (j + S - 1 < mine) issue(j + S - 1);
    dev::cp_async_commit();
    dev::cp_async_wait<S - 1>();
    const int n0 = start + (warp + j * kWarps) * kTile;
    const int t = lane & 3;
    const int pos0 = n0 + 2 * t, pos1 = pos0 + 1;
    attend_tile<QT, KT, DB, kMods>(p, ring + (j % S) * L::kBytes, qf, lane,
                                   pos0 >= lo && pos0 < end, pos1 >= lo && pos1 < end, pos0,
                                   mods, st);
  }
  st.l += __shfl_xor_sync(0xffffffffu, st.l, 1);
  st.l += __shfl_xor_sync(0xffffffffu, st.l, 2);

  // Merge the warps: [warp][row] m and l, then [warp][row][DB] O (unnormalized).
  __syncthreads();  // every warp is done with its ring, which the merge area overlays
  float* mm = reinterpret_cast<float*>(area);
  float* ml = mm + kWarps * kRows;
  float* mo = ml + kWarps * kRows;
  const int g = lane >> 2, t = lane & 3;
  if (t == 0) {
    mm[warp * kRows + g] = st.m;
    ml[warp * kRows + g] = st.l;
  }
#pragma unroll
  for (int i = 0; i < DB / 64; ++i) {
    if (64 * i >= p.D) continue;
    float* orow = mo + (warp * kRows + g) * DB + 64 * i + 16 * t;
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int j = 0; j < 8; ++j) orow[8 * e + j] = st.o[i][j][e];
  }
  __syncthreads();

  for (int it = threadIdx.x; it < kRows * (DB / 8); it += kThreads) {
    const int r = it / (DB / 8), d0 = (it % (DB / 8)) * 8;
    const int row = c * kRows + r;
    if (row >= p.G || d0 >= p.D) continue;
    float mx = -kInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, mm[w * kRows + r]);
    const float base = mx == -kInf ? 0.0f : mx;
    float l = 0.0f, acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(mm[w * kRows + r] - base);
      l += ml[w * kRows + r] * f;
      const float* orow = mo + (w * kRows + r) * DB + d0;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += orow[e] * f;
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // seq_len 0: zeros
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= inv;
    const int64_t out_row = static_cast<int64_t>(b) * p.Hq + h * p.G + row;
    if (p.splits > 1) {
      const int64_t ws_row = out_row * p.splits + split_idx;
      store8(p.ws_o + ws_row * p.D + d0, acc);
      if (d0 == 0) p.ws_lse[ws_row] = base + log2f(l);
    } else {
      store8(static_cast<QT*>(p.out) + out_row * p.D + d0, acc);
      if (p.lse != nullptr && d0 == 0) p.lse[out_row] = (base + log2f(l)) * kLn2;
    }
  }
}

// Stage 2 of a split launch: one (sequence, query head) row per block.
template <typename QT>
__global__ void __launch_bounds__(64) paged_merge_kernel(const AttnParams p) {
  const int64_t row = blockIdx.x;  // b * Hq + head
  const int b = static_cast<int>(row / p.Hq);
  const int seq_len = min(max(p.lens[b], 0), p.capacity);
  const int lo = p.window > 0 ? max(seq_len - p.window, 0) : 0;
  const int parts =
      seq_len > 0 ? (seq_len - lo / kTile * kTile + p.partition - 1) / p.partition : 0;
  const float* lse = p.ws_lse + row * p.splits;
  const float* o = p.ws_o + row * p.splits * p.D;
  float mx = -kInf;
  for (int s = 0; s < parts; ++s) mx = fmaxf(mx, lse[s]);
  const float base = mx == -kInf ? 0.0f : mx;
  float den = 0.0f;
  for (int s = 0; s < parts; ++s) den += exp2f(lse[s] - base);
  const float inv = den > 0.0f ? 1.0f / den : 0.0f;  // seq_len 0: zeros
  QT* out = static_cast<QT*>(p.out) + row * p.D;
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < parts; ++s) acc += exp2f(lse[s] - base) * o[s * p.D + d];
    out[d] = from_float<QT>(acc * inv);
  }
  if (p.lse != nullptr && threadIdx.x == 0) p.lse[row] = (base + log2f(den)) * kLn2;
}

// ------------------------------------------------------------------ prefill

// minBlocks 1: without it ptxas 13 caps the sm_90a build at 168 registers and spills 16 bytes
// at D = 256 (it takes 176 when allowed; sm_80 took 174 either way).
template <typename QT, typename KT, int DB, bool kMods>
__global__ void __launch_bounds__(kThreads, 1) paged_prefill_kernel(const AttnParams p) {
  using L = TileLayout<KT, DB>;
  constexpr int kStageBytes = kPrefillSub * L::kBytes;
  unsigned char* smem = dev::dynamic_smem<unsigned char>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* qf = smem + warp * QLayout<QT, DB>::kBytes;
  unsigned char* stages = smem + kWarps * QLayout<QT, DB>::kBytes;

  // The sequence whose tiles start at or before this block's index (see the file comment).
  const int t_idx = blockIdx.x;
  const int h = blockIdx.y;
  int b = 0;
  for (int hi = p.B - 1; b < hi;) {
    const int mid = (b + hi + 1) / 2;
    const int64_t first = static_cast<int64_t>(p.cu[mid]) * p.G / kPrefillRows + mid;
    if (first <= t_idx) {
      b = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int q_start = p.cu[b];
  const int n_q = p.cu[b + 1] - q_start;
  const int64_t rows = static_cast<int64_t>(n_q) * p.G;
  const int64_t count = (rows + kPrefillRows - 1) / kPrefillRows;
  const int64_t local = t_idx - (static_cast<int64_t>(q_start) * p.G / kPrefillRows + b);
  if (local >= count) return;
  const int64_t row0 = (count - 1 - local) * kPrefillRows;  // last tiles first

  const int seq_len = min(max(p.lens[b], 0), p.capacity);
  const int first_pos = seq_len - n_q + static_cast<int>(row0 / p.G);
  const int64_t last_row = min(row0 + kPrefillRows, rows) - 1;
  const int hi = seq_len - n_q + static_cast<int>(last_row / p.G) + 1;
  const int lo = p.window > 0 ? max(first_pos - p.window + 1, 0) : 0;

  const QT* q = static_cast<const QT*>(p.q);
  for (int it = lane; it < DB / 32 * 32; it += 32) {
    const int i = it / 32, l = it % 32;
    const int64_t r = row0 + warp * kRows + (l >> 2);
    const int d = 32 * i + 8 * (l & 3);
    const bool live = r < rows && d < p.D;
    const QT* src = nullptr;
    if (live) {
      src = q + (q_start + r / p.G) * p.q_s0 + (h * p.G + r % p.G) * p.q_s1 + d;
    }
    store_q_chunk<QT, DB>(qf, i, l, src);
  }

  const int32_t* table_row = p.table + b * p.table_s0;
  const int nstages = hi > lo ? (hi - lo + kPrefillSub * kTile - 1) / (kPrefillSub * kTile) : 0;
  const auto issue = [&](int s) {  // stage s into slot s % kPrefillStages, split over the warps
    unsigned char* dst = stages + (s % kPrefillStages) * kStageBytes;
    for (int k = warp; k < kPrefillSub * L::kItems; k += kWarps) {
      const int u = k / L::kItems, item = k % L::kItems;
      issue_item<KT, DB>(p, dst + u * L::kBytes, item, lane, h, table_row,
                         lo + (s * kPrefillSub + u) * kTile, lo, hi);
    }
  };

  const int g = lane >> 2, t = lane & 3;
  const int64_t my_row = row0 + warp * kRows + g;
  const int my_pos = seq_len - n_q + static_cast<int>(my_row / p.G);  // past rows: masked below
  const bool row_live = my_row < rows;
  const RowMods mods = kMods ? row_mods(p, b, h * p.G + static_cast<int>(my_row % p.G), row_live,
                                        my_pos)
                             : RowMods{0.0f, 0};
  State<DB> st;
  init_state(st);
#pragma unroll
  for (int s = 0; s < kPrefillStages - 1; ++s) {
    if (s < nstages) issue(s);
    dev::cp_async_commit();
  }
  for (int s = 0; s < nstages; ++s) {
    dev::cp_async_wait<kPrefillStages - 2>();
    __syncthreads();  // stage s landed for every warp; stage s - 1 is free again
    if (s + kPrefillStages - 1 < nstages) issue(s + kPrefillStages - 1);
    dev::cp_async_commit();
    unsigned char* stage = stages + (s % kPrefillStages) * kStageBytes;
#pragma unroll
    for (int u = 0; u < kPrefillSub; ++u) {
      const int pos0 = lo + (s * kPrefillSub + u) * kTile + 2 * t, pos1 = pos0 + 1;
      const bool k0 = row_live && pos0 >= lo && pos0 <= my_pos &&
                      (p.window <= 0 || pos0 > my_pos - p.window);
      const bool k1 = row_live && pos1 >= lo && pos1 <= my_pos &&
                      (p.window <= 0 || pos1 > my_pos - p.window);
      attend_tile<QT, KT, DB, kMods>(p, stage + u * L::kBytes, qf, lane, k0, k1, pos0, mods,
                                     st);
    }
  }
  st.l += __shfl_xor_sync(0xffffffffu, st.l, 1);
  st.l += __shfl_xor_sync(0xffffffffu, st.l, 2);
  if (!row_live) return;
  const float inv = 1.0f / st.l;  // every query sees at least its own position
  const int64_t out_row = (q_start + my_row / p.G) * p.Hq + h * p.G + my_row % p.G;
  if (p.lse != nullptr && t == 0) p.lse[out_row] = (st.m + log2f(st.l)) * kLn2;
  QT* out = static_cast<QT*>(p.out) + out_row * p.D;
#pragma unroll
  for (int i = 0; i < DB / 64; ++i) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int d0 = 64 * i + 16 * t + 8 * e;
      if (d0 >= p.D) continue;
      float v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = st.o[i][j][e] * inv;
      store8(out + d0, v);
    }
  }
}

// ------------------------------------------------------------------ append

struct AppendParams {
  const void* x[2];  // k, v
  int64_t x_s0[2], x_s1[2];
  void* cache[2];
  int64_t c_s0[2], c_s1[2], c_s2[2];
  float* scale[2];
  int64_t sc_s0[2], sc_s1[2], sc_s2[2];
  const void* slots;
  bool slots_int64, x_aligned, cache_aligned;
  int N, Hkv, D, shift;
  int64_t num_slots;
};

template <typename T>
__device__ __forceinline__ void load8(const T* src, bool aligned, float v[8]) {
  if (aligned) {
    chunk_floats<T>(reinterpret_cast<const unsigned char*>(src), v);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = to_float(src[e]);
  }
}

template <typename XT, typename KT>
__global__ void __launch_bounds__(kAppendWarps * 32) paged_append_kernel(const AppendParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kAppendWarps + threadIdx.x / 32;
  if (item >= static_cast<int64_t>(p.N) * p.Hkv * 2) return;  // whole warps
  const int which = static_cast<int>(item % 2);
  const int h = static_cast<int>((item / 2) % p.Hkv);
  const int64_t i = item / 2 / p.Hkv;
  const int64_t slot = p.slots_int64 ? static_cast<const int64_t*>(p.slots)[i]
                                     : static_cast<const int32_t*>(p.slots)[i];
  if (slot < 0 || slot >= p.num_slots) return;  // padding (range is the caller's to check)
  const int64_t page = slot >> p.shift, offset = slot & ((int64_t{1} << p.shift) - 1);
  const int d0 = 8 * lane;
  const bool live = d0 < p.D;
  float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (live) {
    const XT* src = static_cast<const XT*>(p.x[which]) + i * p.x_s0[which] + h * p.x_s1[which] + d0;
    load8(src, p.x_aligned, v);
  }
  KT* dst = static_cast<KT*>(p.cache[which]) + page * p.c_s0[which] + offset * p.c_s1[which] +
            h * p.c_s2[which] + d0;
  if constexpr (std::is_same_v<KT, int8_t>) {
    float amax = 0.0f;
    int bad = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float a = fabsf(v[e]);
      bad |= !(a <= FLT_MAX);  // inf or NaN
      amax = fmaxf(amax, a);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    }
    bad = __any_sync(0xffffffffu, bad);
    const float s = bad ? __int_as_float(0x7fc00000) : __fdiv_rn(amax, 127.0f);
    const bool zero = bad || s == 0.0f;
    const float divisor = zero ? 1.0f : s;
    if (lane == 0) {
      p.scale[which][page * p.sc_s0[which] + offset * p.sc_s1[which] + h * p.sc_s2[which]] = s;
    }
    if (!live) return;
    uint32_t w[2] = {0u, 0u};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float r = fminf(fmaxf(__fdiv_rn(v[e], divisor), -127.0f), 127.0f);
      const int qv = zero ? 0 : __float2int_rn(r);
      w[e / 4] |= (static_cast<uint32_t>(qv) & 0xffu) << (8 * (e % 4));
    }
    if (p.cache_aligned) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = static_cast<int8_t>((w[e / 4] >> (8 * (e % 4))) & 0xffu);
    }
  } else {
    if (!live) return;
    if (p.cache_aligned) {
      store8(dst, v);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = from_float<KT>(v[e]);
    }
  }
}

// ------------------------------------------------------------------ host side

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, __half>) return "__half";
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return "__nv_bfloat16";
  if constexpr (std::is_same_v<T, int8_t>) return "signed char";
  return "?";
}

int head_bucket(int64_t D) { return D <= 64 ? 64 : (D <= 128 ? 128 : 256); }

int log2_exact(int64_t x) {
  int s = 0;
  while ((int64_t{1} << s) < x) ++s;
  return s;
}

bool aligned_bytes(const void* ptr, int64_t elem, std::initializer_list<int64_t> strides,
                   int64_t align) {
  if (reinterpret_cast<uintptr_t>(ptr) % align != 0) return false;
  for (int64_t s : strides) {
    if ((s * elem) % align != 0) return false;
  }
  return true;
}

int64_t elem_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kInt8: return 1;
  }
  return 1;
}

AttnParams make_params(const PagedAttentionArgs& a) {
  AttnParams p{};
  p.q = a.q;
  p.q_s0 = a.q_stride_row;
  p.q_s1 = a.q_stride_head;
  p.out = a.out;
  p.k = a.k.data;
  p.v = a.v.data;
  p.k_s0 = a.k.stride_block, p.k_s1 = a.k.stride_offset, p.k_s2 = a.k.stride_head;
  p.v_s0 = a.v.stride_block, p.v_s1 = a.v.stride_offset, p.v_s2 = a.v.stride_head;
  p.ks = a.k.scale;
  p.vs = a.v.scale;
  p.ks_s0 = a.k.scale_stride_block, p.ks_s1 = a.k.scale_stride_offset;
  p.ks_s2 = a.k.scale_stride_head;
  p.vs_s0 = a.v.scale_stride_block, p.vs_s1 = a.v.scale_stride_offset;
  p.vs_s2 = a.v.scale_stride_head;
  p.table = a.block_tables;
  p.table_s0 = a.table_stride;
  p.lens = a.seq_lens;
  p.cu = a.cu_seqlens_q;
  p.lse = a.lse;
  p.B = static_cast<int>(a.batch);
  p.Hq = static_cast<int>(a.num_q_heads);
  p.Hkv = static_cast<int>(a.num_kv_heads);
  p.G = static_cast<int>(a.num_q_heads / a.num_kv_heads);
  p.D = static_cast<int>(a.head_dim);
  p.shift = log2_exact(a.block_size);
  p.capacity = static_cast<int>(std::min<int64_t>(a.table_width * a.block_size, INT32_MAX));
  p.window = a.window > 0 && a.window < p.capacity ? static_cast<int>(a.window) : 0;
  p.scale_log2 = a.scale * kLog2e;
  p.softcap_log2 = a.softcap > 0.0f ? a.softcap * kLog2e : 0.0f;
  p.alibi = a.alibi_slopes;
  const int64_t es = elem_size(a.cache_dtype);
  const int64_t align = std::min<int64_t>(16, 8 * es);  // cp.async of one chunk
  p.kv_aligned = aligned_bytes(a.k.data, es, {a.k.stride_block, a.k.stride_offset, a.k.stride_head},
                               align) &&
                 aligned_bytes(a.v.data, es, {a.v.stride_block, a.v.stride_offset, a.v.stride_head},
                               align);
  return p;
}

// Calls fn(QT{}, KT{}, bucket, kMods) for the dtypes, head-dim bucket and score modifiers
// (any: the kMods kernels; none: the plain ones, which pay nothing for them) of args.
template <typename F>
cudaError_t dispatch(DType q, DType cache, int64_t D, bool mods, F&& fn) {
  const auto with_mods = [&](auto qt, auto kt, auto db) -> cudaError_t {
    if (mods) return fn(qt, kt, db, std::true_type{});
    return fn(qt, kt, db, std::false_type{});
  };
  const auto with_bucket = [&](auto qt, auto kt) -> cudaError_t {
    switch (head_bucket(D)) {
      case 64: return with_mods(qt, kt, std::integral_constant<int, 64>{});
      case 128: return with_mods(qt, kt, std::integral_constant<int, 128>{});
      default: return with_mods(qt, kt, std::integral_constant<int, 256>{});
    }
  };
  const auto with_q = [&](auto qt) -> cudaError_t {
    using QT = decltype(qt);
    if (cache == DType::kInt8) return with_bucket(qt, int8_t{});
    return with_bucket(qt, QT{});
  };
  switch (q) {
    case DType::kFloat32: return with_q(float{});
    case DType::kFloat16: return with_q(__half{});
    case DType::kBFloat16: return with_q(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool has_mods(const AttnParams& p) { return p.softcap_log2 > 0.0f || p.alibi != nullptr; }

}  // namespace

PagedAttentionPlan plan_paged_attention(const PagedAttentionArgs& args, const PlanKnobs& knobs) {
  PagedAttentionPlan plan{};
  const AttnParams p = make_params(args);
  const int64_t G = p.G;
  plan.units = args.batch * args.num_kv_heads * cdiv(G, kRows);
  int per_sm = 1;
  dispatch(args.q_dtype, args.cache_dtype, args.head_dim, has_mods(p),
           [&](auto qt, auto kt, auto db, auto mods) {
    using QT = decltype(qt);
    using KT = decltype(kt);
    constexpr int DB = decltype(db)::value;
    per_sm = dev::blocks_per_sm(paged_decode_kernel<QT, KT, DB, decltype(mods)::value>, kThreads,
                                decode_smem<QT, KT, DB>());
    return cudaSuccess;
  });
  plan.blocks_per_sm = per_sm;
  const int64_t span = p.window > 0 ? std::min<int64_t>(p.capacity, p.window + kTile - 1)
                                    : p.capacity;
  const int64_t whole = cdiv(std::max<int64_t>(span, 1), kTile) * kTile;
  const int64_t min_part = cdiv(std::max<int64_t>(knobs.min_partition, 1), kTile) * kTile;
  const int64_t target = static_cast<int64_t>(per_sm) * std::max(knobs.num_sms, 1);
  plan.splits = 1;
  plan.partition = whole;
  if (plan.units > 0 && plan.units < target && span > min_part) {
    // Rounded down: blocks do equal work, so a second, partial wave would double the time of
    // the tail (576 blocks on 528 slots run as long as 1056), while one wave of at least half
    // the slots still has every SM stream from >= half its resident warps, each with a tile or
    // two in flight: more than the bytes in flight HBM latency asks for (docs/cuda_kernels.md).
    const int64_t want = std::max<int64_t>(1, target / plan.units);
    const int64_t part = std::max(min_part, cdiv(cdiv(span, want), kTile) * kTile);
    const int64_t splits = cdiv(span, part);
    if (splits > 1) {
      plan.splits = splits;
      plan.partition = part;
    }
  }
  if (plan.splits > 1) {
    plan.ws_o_floats = args.batch * args.num_q_heads * plan.splits * args.head_dim;
    plan.ws_lse_floats = args.batch * args.num_q_heads * plan.splits;
  }
  return plan;
}

cudaError_t launch_paged_attention(const PagedAttentionArgs& args, const PagedAttentionPlan& plan,
                                   float* ws_o, float* ws_lse, cudaStream_t stream) {
  AttnParams p = make_params(args);
  p.partition = static_cast<int>(plan.partition);
  p.splits = static_cast<int>(plan.splits);
  p.ws_o = ws_o;
  p.ws_lse = ws_lse;
  if (plan.units == 0) return cudaSuccess;
  return dispatch(args.q_dtype, args.cache_dtype, args.head_dim, has_mods(p),
                  [&](auto qt, auto kt, auto db, auto mods) {
    using QT = decltype(qt);
    using KT = decltype(kt);
    constexpr int DB = decltype(db)::value;
    const dim3 grid(static_cast<unsigned>(plan.units), static_cast<unsigned>(plan.splits));
    cudaError_t e = dev::launch(paged_decode_kernel<QT, KT, DB, decltype(mods)::value>, grid,
                                dim3(kThreads),
                                decode_smem<QT, KT, DB>(), stream, p);
    if (e != cudaSuccess || plan.splits == 1) return e;
    const dim3 rows(static_cast<unsigned>(args.batch * args.num_q_heads));
    return dev::launch(paged_merge_kernel<QT>, rows, dim3(64), 0, stream, p);
  });
}

cudaError_t launch_paged_prefill_attention(const PagedAttentionArgs& args, cudaStream_t stream) {
  const AttnParams p = make_params(args);
  const int64_t tiles = args.rows * p.G / kPrefillRows + args.batch;
  if (args.rows == 0 || args.batch == 0 || args.num_kv_heads == 0) return cudaSuccess;
  return dispatch(args.q_dtype, args.cache_dtype, args.head_dim, has_mods(p),
                  [&](auto qt, auto kt, auto db, auto mods) {
    using QT = decltype(qt);
    using KT = decltype(kt);
    constexpr int DB = decltype(db)::value;
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(args.num_kv_heads));
    return dev::launch(paged_prefill_kernel<QT, KT, DB, decltype(mods)::value>, grid,
                       dim3(kThreads),
                       prefill_smem<QT, KT, DB>(), stream, p);
  });
}

cudaError_t launch_paged_append(const PagedAppendArgs& a, cudaStream_t stream) {
  AppendParams p{};
  const PagedCache* caches[2] = {&a.k_cache, &a.v_cache};
  const int64_t xs0[2] = {a.k_stride_token, a.v_stride_token};
  const int64_t xs1[2] = {a.k_stride_head, a.v_stride_head};
  p.x[0] = a.k;
  p.x[1] = a.v;
  const int64_t xe = elem_size(a.x_dtype), ce = elem_size(a.cache_dtype);
  p.x_aligned = true;
  p.cache_aligned = true;
  for (int w = 0; w < 2; ++w) {
    p.x_s0[w] = xs0[w];
    p.x_s1[w] = xs1[w];
    p.cache[w] = caches[w]->data;
    p.c_s0[w] = caches[w]->stride_block;
    p.c_s1[w] = caches[w]->stride_offset;
    p.c_s2[w] = caches[w]->stride_head;
    p.scale[w] = caches[w]->scale;
    p.sc_s0[w] = caches[w]->scale_stride_block;
    p.sc_s1[w] = caches[w]->scale_stride_offset;
    p.sc_s2[w] = caches[w]->scale_stride_head;
    p.x_aligned = p.x_aligned &&
                  aligned_bytes(p.x[w], xe, {xs0[w], xs1[w]}, std::min<int64_t>(16, 8 * xe));
    p.cache_aligned = p.cache_aligned &&
                      aligned_bytes(p.cache[w], ce, {p.c_s0[w], p.c_s1[w], p.c_s2[w]},
                                    std::min<int64_t>(16, 8 * ce));
  }
  p.slots = a.slots;
  p.slots_int64 = a.slots_int64;
  p.N = static_cast<int>(a.num_tokens);
  p.Hkv = static_cast<int>(a.num_kv_heads);
  p.D = static_cast<int>(a.head_dim);
  p.shift = log2_exact(a.block_size);
  p.num_slots = a.num_slots;
  const int64_t items = a.num_tokens * a.num_kv_heads * 2;
  if (items == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(cdiv(items, kAppendWarps)));
  const dim3 block(kAppendWarps * 32);
  const auto with_cache = [&](auto xt) -> cudaError_t {
    using XT = decltype(xt);
    switch (a.cache_dtype) {
      case DType::kFloat32:
        return dev::launch(paged_append_kernel<XT, float>, grid, block, 0, stream, p);
      case DType::kFloat16:
        return dev::launch(paged_append_kernel<XT, __half>, grid, block, 0, stream, p);
      case DType::kBFloat16:
        return dev::launch(paged_append_kernel<XT, __nv_bfloat16>, grid, block, 0, stream, p);
      case DType::kInt8:
        return dev::launch(paged_append_kernel<XT, int8_t>, grid, block, 0, stream, p);
    }
    return cudaErrorInvalidValue;
  };
  switch (a.x_dtype) {
    case DType::kFloat32: return with_cache(float{});
    case DType::kFloat16: return with_cache(__half{});
    case DType::kBFloat16: return with_cache(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

const KernelLaunchConfig* paged_attention_kernel_configs() {
  static const std::vector<KernelLaunchConfig> table = [] {
    static std::vector<std::string> names;  // owns the strings the rows point at
    std::vector<std::pair<std::string, std::pair<int, int>>> rows;
    for (DType q : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      for (bool int8 : {false, true}) {
        for (int64_t D : {64, 128, 256}) {
          for (bool mods : {false, true}) {
            dispatch(q, int8 ? DType::kInt8 : q, D, mods, [&](auto qt, auto kt, auto db, auto m) {
              using QT = decltype(qt);
              using KT = decltype(kt);
              constexpr int DB = decltype(db)::value;
              const std::string args = std::string(type_name<QT>()) + ", " + type_name<KT>() +
                                       ", " + std::to_string(DB) +
                                       (decltype(m)::value ? ", true" : ", false");
              rows.push_back({"paged_decode_kernel<" + args + ">",
                              {kThreads, decode_smem<QT, KT, DB>()}});
              rows.push_back({"paged_prefill_kernel<" + args + ">",
                              {kThreads, prefill_smem<QT, KT, DB>()}});
              return cudaSuccess;
            });
          }
        }
      }
      const char* qn = q == DType::kFloat32   ? "float"
                       : q == DType::kFloat16 ? "__half"
                                              : "__nv_bfloat16";
      rows.push_back({std::string("paged_merge_kernel<") + qn + ">", {64, 0}});
      for (const char* kn : {"float", "__half", "__nv_bfloat16", "signed char"}) {
        rows.push_back({std::string("paged_append_kernel<") + qn + ", " + kn + ">",
                        {kAppendWarps * 32, 0}});
      }
    }
    names.reserve(rows.size());
    std::vector<KernelLaunchConfig> out;
    for (auto& r : rows) {
      names.push_back(r.first);
      out.push_back({nullptr, r.second.first, r.second.second});
    }
    for (size_t i = 0; i < out.size(); ++i) out[i].kernel = names[i].c_str();
    out.push_back({nullptr, 0, 0});
    return out;
  }();
  return table.data();
}

}  // namespace frugal::cuda
