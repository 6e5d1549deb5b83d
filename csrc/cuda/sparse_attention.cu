// Block-sparse attention forward (fp16 / bf16) over a SparseLayout (docs/block_mask_format.md),
// FlashAttention-2 style: one CTA per tile of query rows, K and V tiles staged in shared memory
// by cp.async, ldmatrix fragments, mma.sync m16n8k16 with fp32 accumulators, online softmax in
// registers; head dims that are multiples of 8 on instantiations for 32, 64, 96, 128 and 256
// (the next one up, its extra columns zero-filled in shared memory, never read from memory nor
// stored). The walk over the mask is the Triton kernel's (kernels/sparse_attention.py,
// _sparse_fwd_kernel): the q-block's full kv-blocks with no element test (the ragged last
// kv-block with the k < Nk bound only), then its partial kv-blocks with the element rule
// (band with prefix, document ids, bitmask), each kv-block as BK / BN tiles of BN keys. Built by
// nvcc for sm_80 / sm_90a and by g++ through the host emulation (csrc/cuda_emu), where the
// tests run it. The backward stays with the Triton kernels (python/frugal/sparse_attention.py).
//
// CTA and warps. ROWS = min(BQ, 128) query rows for D <= 128 (each warp 32 rows: two m16 tiles
// share every K / V fragment it loads, halving shared-memory reads per mma, as FA2's 128-row
// CTAs of 4 warps do), 64 rows for D = 256 (16 rows a warp: 32 rows would need 256 fp32
// accumulators a thread). So BQ = 64 runs 2 warps at D <= 128, BQ = 128 four. A warp owns its
// rows for the whole walk; warps share only the K / V tiles. BN = 64 keys a tile up to
// D = 64, 32 above: with 64, the S accumulators (64 a thread) on top of O's made ptxas spill at
// D = 96 and 128 (156 and 284 bytes, sm_80); FA2 makes the same cut.
//
// Fragments. S = Q K^T: Q's A fragments by ldmatrix.x4 from the Q tile (reloaded per k-step,
// as FA2 does, rather than held: they would cost D / 2 registers a row tile), K's B fragments
// by ldmatrix.x4 (non-transposed: K rows are keys with D contiguous, i.e. B^T row-major), two
// n8 tiles per load. O += P V: P never leaves registers (the S accumulators of n8 tiles 2c and
// 2c + 1 are, rounded to the input type, the A fragment of k-step c, FA2's trick), V's B
// fragments by ldmatrix.x4.trans (V rows are keys with D contiguous: row-major K x N).
// Shared-memory rows are padded by 16 bytes, so the 8 row addresses of an ldmatrix fall in 8
// different 4-bank groups at every D here (no conflicts; an XOR swizzle would save the 3-6% of
// memory the padding costs, at the price of index arithmetic in every address).
//
// Pipeline (per tile, single K and V buffers, FA2's order): V(t) is issued before S(t) is
// computed and K(t + 1) before P V(t), so each load overlaps the other operand's math; four
// barriers a tile keep a buffer from being overwritten while a warp still reads it.
// Rejected: double-buffering K and V (another 2 BN (D + 8) elements of shared memory, which at
// D = 128 would drop sm_80 from 2 CTAs per SM to 1 and idle the tensor cores in the barriers).
//
// Softmax: scores are scaled by scale * log2(e) (one multiply) and exponentiated with exp2f;
// a row's running max m and sum l live in the 4 lanes of its quad (l partial per lane, summed at
// the end). A row that has seen no allowed key keeps m = -inf and exponentiates against 0, so
// nothing becomes NaN; at the end l = 0 gives out = 0 and lse = -inf. P is rounded to the input
// type for the P V product, as FlashAttention does.
//
// Score modifiers (python/frugal/score_mods.py), in the kMods instantiations only (the others
// are the kernel without them, instruction for instruction): on the base-2 scores x =
// s log2(e), the softcap c is c2 tanh(x / c2) with c2 = c log2(e) (the same function of s,
// scaled), and ALiBi subtracts slope log2(e) |q_pos - k_pos|, before the mask.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/device.h"
#include "cuda/launch.h"

namespace frugal::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxThreads = 128;

// Compile-time shape of the kernel for head dim D (kMods: the score-modifier instantiation,
// which at D = 128 takes one m16 tile a warp: with two, the modifiers' per-element positions
// and constants took the registers past 255 and ptxas spilled, sm_80).
template <int D, bool kMods = false>
struct Shape {
  static constexpr int kMT = D < 128 || (D == 128 && !kMods) ? 2 : 1;  // m16 tiles per warp
  static constexpr int kMaxRows = 4 * 16 * kMT;   // rows per CTA at 4 warps
  static constexpr int kBN = D <= 64 ? 64 : 32;   // keys per tile
  static constexpr int kPitch = D + 8;            // shared-memory row, elements (16-byte pad)
  static constexpr int kChunks = D / 8;           // 16-byte chunks per row
};

// What the walk does at each element of a tile.
enum class Mask { kNone, kBounds, kRule };

// One tile of the walk: its first key, its kv-block, how to mask it, and (bitmask) the row of
// `bits` of its kv-block.
struct Tile {
  int n0, kb;
  Mask mask;
  int bits_row;
};

// The tiles of one (batch, head, q-block): the full list's, then the partial list's, each
// kv-block as BK / BN tiles, minus the tiles of the ragged last kv-block (Nk % BK != 0; always
// a list's last entry, the lists being ascending) that start at or past Nk.
struct Walk {
  const int32_t* full_idx;
  const int32_t* part_idx;
  const int32_t* part_bits;  // nullptr without a bitmask
  int n_full, n_part;        // entries
  int t_full, t_all;         // tiles in the full list, in both
  int full_ragged;           // the full list's last entry is the ragged kv-block
  int sub, bn, bk;

  __device__ Tile at(int t) const {
    if (t < t_full) {
      const int e = t / sub, kb = __ldg(full_idx + e);
      const bool bounds = full_ragged && e == n_full - 1;
      return {kb * bk + t % sub * bn, kb, bounds ? Mask::kBounds : Mask::kNone, 0};
    }
    const int p = t - t_full, e = p / sub, kb = __ldg(part_idx + e);
    return {kb * bk + p % sub * bn, kb, Mask::kRule,
            part_bits != nullptr ? __ldg(part_bits + e) : 0};
  }
};

// Tiles of a list of n ascending kv-blocks whose last is `last`.
__device__ inline int list_tiles(int n, int last, int Nk, int BK, int BN, int sub, int* ragged) {
  *ragged = n > 0 && Nk % BK != 0 && last == (Nk - 1) / BK;
  if (!*ragged) return n * sub;
  return (n - 1) * sub + (Nk - last * BK + BN - 1) / BN;
}

// rows [r0, r0 + rows) x D of a [*, stride] tensor into shared memory (row pitch kPitch), rows
// at or past `limit` and the 16-byte chunks at or past `chunks` (a head dim below the kernel's
// D: the padding columns) zero-filled without a read; all threads of the CTA take part.
template <typename T, int D>
__device__ inline void load_rows(T* smem, const T* g, int64_t stride, int r0, int rows,
                                 int limit, int chunks) {
  using S = Shape<D>;
  for (int c = threadIdx.x; c < rows * S::kChunks; c += blockDim.x) {
    const int r = c / S::kChunks, k = c % S::kChunks;
    const bool in = r0 + r < limit && k < chunks;
    const T* src = in ? g + static_cast<int64_t>(r0 + r) * stride + 8 * k : g;
    dev::cp_async<16>(smem + r * S::kPitch + 8 * k, src, in);
  }
}

template <typename T, int D, bool kMods>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_attention_fwd_kernel(SparseAttentionFwdArgs p) {
  using S = Shape<D, kMods>;
  constexpr int MT = S::kMT, BN = S::kBN, P = S::kPitch;
  constexpr bool kBF16 = std::is_same_v<T, __nv_bfloat16>;
  const int warps = blockDim.x / 32, rows = warps * 16 * MT;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t4 = lane % 4;
  const int Nq = static_cast<int>(p.Nq), Nk = static_cast<int>(p.Nk);
  const int BQ = static_cast<int>(p.BQ), BK = static_cast<int>(p.BK);
  // The head dim p.D (a multiple of 8) in 8-element chunks; D is it rounded up to an
  // instantiated size: the columns past p.D are zeros in shared memory (they add nothing to
  // Q K^T and give output columns that are not stored).
  const int dv = static_cast<int>(p.D), chunks = dv / 8;

  // Program id -> (batch, q head, q tile); the q tiles of a head adjacent (they share K / V in
  // L2), one grid axis (y would cap B * Hq at 65535).
  const int64_t tiles = (p.Nq + rows - 1) / rows;
  const int m0 = static_cast<int>(blockIdx.x % tiles) * rows;
  const int64_t bh = blockIdx.x / tiles, b = bh / p.Hq, h = bh % p.Hq;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int qb = m0 / BQ, q0 = qb * BQ;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;

  // This q-block's lists.
  const int64_t lb = b, lh = h;
  const int32_t* full_idx = p.full_idx.p + lb * p.full_idx.sb + lh * p.full_idx.sh +
                            qb * p.full_idx.sr;
  const int32_t* part_idx = p.kv_idx.p + lb * p.kv_idx.sb + lh * p.kv_idx.sh + qb * p.kv_idx.sr;
  Walk walk{};
  walk.full_idx = full_idx;
  walk.part_idx = part_idx;
  walk.part_bits = p.kv_bits.p == nullptr ? nullptr
                                          : p.kv_bits.p + lb * p.kv_bits.sb + lh * p.kv_bits.sh +
                                                qb * p.kv_bits.sr;
  walk.n_full = __ldg(p.full_num.p + lb * p.full_num.sb + lh * p.full_num.sh + qb);
  walk.n_part = __ldg(p.kv_num.p + lb * p.kv_num.sb + lh * p.kv_num.sh + qb);
  walk.sub = BK / BN;
  walk.bn = BN;
  walk.bk = BK;
  {
    int ragged_part = 0;
    const int last_full = walk.n_full > 0 ? __ldg(full_idx + walk.n_full - 1) : 0;
    const int last_part = walk.n_part > 0 ? __ldg(part_idx + walk.n_part - 1) : 0;
    walk.t_full = list_tiles(walk.n_full, last_full, Nk, BK, BN, walk.sub, &walk.full_ragged);
    walk.t_all = walk.t_full + list_tiles(walk.n_part, last_part, Nk, BK, BN, walk.sub,
                                          &ragged_part);
  }

  T* sq = dev::dynamic_smem<T>();
  T* sk = sq + rows * P;
  T* sv = sk + BN * P;

  // Per lane: rows r_lo(mt) = m0 + warp * 16 MT + 16 mt + g and r_lo + 8.
  const int wrow = warp * 16 * MT;
  float o[MT][D / 8][4];
  float m[MT][2], l[MT][2];
  #pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    #pragma unroll
    for (int j = 0; j < D / 8; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.0f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
  }
  const float qk_scale = p.scale * kLog2e;
  // Modifiers in base 2 (kMods): the cap c log2(e) (0: off), the slope times log2(e), and the
  // offset of q_pos - k_pos (query r at position r + Nk - Nq).
  // tanh(x / cap2) = (1 - e) / (1 + e) with e = 2^(-|x| inv2), inv2 = 2 / softcap, sign of x:
  // exp2f and a reciprocal, not tanhf, whose longer sequence made ptxas spill at D = 128.
  [[maybe_unused]] float cap2 = 0.0f, inv2 = 0.0f, slope2 = 0.0f;
  [[maybe_unused]] const int shift = Nk - Nq;
  if constexpr (kMods) {
    cap2 = p.softcap * kLog2e;
    inv2 = p.softcap > 0.0f ? 2.0f / p.softcap : 0.0f;
    if (p.alibi != nullptr) slope2 = __ldg(p.alibi + bh) * kLog2e;
  }

  if (walk.t_all > 0) {
    load_rows<T, D>(sq, q, p.q_stride_n, m0, rows, Nq, chunks);
    dev::cp_async_commit();
    Tile cur = walk.at(0);
    load_rows<T, D>(sk, k, p.k_stride_n, cur.n0, BN, Nk, chunks);
    dev::cp_async_commit();
    // The element rule's per-row values (document ids; bitmask row offsets) for this lane.
    int qdoc[MT][2];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      #pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = m0 + wrow + 16 * mt + g + 8 * hf;
        qdoc[mt][hf] = p.q_doc != nullptr && r < Nq ? __ldg(p.q_doc + b * p.q_doc_sb + r) : 0;
      }
    }

    for (int t = 0; t < walk.t_all; ++t) {
      load_rows<T, D>(sv, v, p.v_stride_n, cur.n0, BN, Nk, chunks);
      dev::cp_async_commit();
      dev::cp_async_wait<1>();  // Q and K(t) have landed
      __syncthreads();

      // S = Q K^T over this warp's rows and the tile's BN keys.
      float s[MT][BN / 8][4];
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        #pragma unroll
        for (int j = 0; j < BN / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0;
      }
      #pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[MT][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          dev::ldmatrix<4, false>(a[mt], sq + (wrow + 16 * mt + lane % 16) * P + 16 * kk +
                                             lane / 16 * 8);
        }
        #pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
          // Matrices: keys 16j + 0..7 at d 16kk + 0..7 / + 8..15, then keys 16j + 8..15.
          uint32_t bk4[4];
          dev::ldmatrix<4, false>(bk4, sk + (16 * j + lane % 8 + lane / 16 * 8) * P + 16 * kk +
                                           lane / 8 % 2 * 8);
          #pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            dev::mma_m16n8k16<kBF16>(s[mt][2 * j], a[mt], bk4, s[mt][2 * j]);
            dev::mma_m16n8k16<kBF16>(s[mt][2 * j + 1], a[mt], bk4 + 2, s[mt][2 * j + 1]);
          }
        }
      }

      // Scale, mask, online softmax.
      const int64_t bits_base = static_cast<int64_t>(cur.bits_row) * p.bits_si;
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float mx[2] = {-INFINITY, -INFINITY};
        #pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          #pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int hf = e / 2;
            const int r = m0 + wrow + 16 * mt + g + 8 * hf, c = cur.n0 + 8 * j + 2 * t4 + e % 2;
            float x = s[mt][j][e] * qk_scale;
            if constexpr (kMods) {
              if (cap2 > 0.0f) {
                const float e = exp2f(-fabsf(x) * inv2);
                x = copysignf(cap2 * (1.0f - e) * __frcp_rn(1.0f + e), x);
              }
              x -= slope2 * fabsf(static_cast<float>(r + shift - c));
            }
            if (cur.mask != Mask::kNone) {
              bool ok = c < Nk;
              if (cur.mask == Mask::kRule) {
                const int delta = c - r;
                ok = ok && ((delta >= p.lo && delta <= p.hi) || c < p.prefix);
                if (ok && p.kv_doc != nullptr) ok = __ldg(p.kv_doc + b * p.kv_doc_sb + c) ==
                                                    qdoc[mt][hf];
                if (ok && p.bits != nullptr) {
                  const int cc = c - cur.kb * BK;
                  const int word = __ldg(p.bits + bits_base + (r - q0) * p.bits_sr + cc / 32);
                  ok = ((word >> (cc & 31)) & 1) != 0;
                }
              }
              if (!ok) x = -INFINITY;
            }
            s[mt][j][e] = x;
            mx[hf] = fmaxf(mx[hf], x);
          }
        }
        #pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
          mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
          const float m_new = fmaxf(m[mt][hf], mx[hf]);
          const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no allowed key yet
          const float alpha = exp2f(m[mt][hf] - m_use);
          m[mt][hf] = m_new;
          mx[hf] = m_use;
          l[mt][hf] *= alpha;
          #pragma unroll
          for (int j = 0; j < D / 8; ++j) {
            o[mt][j][2 * hf] *= alpha;
            o[mt][j][2 * hf + 1] *= alpha;
          }
        }
        #pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          #pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pe = exp2f(s[mt][j][e] - mx[e / 2]);
            s[mt][j][e] = pe;
            l[mt][e / 2] += pe;
          }
        }
      }

      __syncthreads();  // every warp is done with K(t)
      const bool more = t + 1 < walk.t_all;
      if (more) {
        cur = walk.at(t + 1);
        load_rows<T, D>(sk, k, p.k_stride_n, cur.n0, BN, Nk, chunks);
        dev::cp_async_commit();
        dev::cp_async_wait<1>();  // V(t) has landed
      } else {
        dev::cp_async_wait<0>();
      }
      __syncthreads();

      // O += P V: P's A fragment for keys 16c..16c+15 is S tiles 2c, 2c + 1.
      #pragma unroll
      for (int c = 0; c < BN / 16; ++c) {
        uint32_t a[MT][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a[mt][0] = dev::pack2<T>(s[mt][2 * c][0], s[mt][2 * c][1]);
          a[mt][1] = dev::pack2<T>(s[mt][2 * c][2], s[mt][2 * c][3]);
          a[mt][2] = dev::pack2<T>(s[mt][2 * c + 1][0], s[mt][2 * c + 1][1]);
          a[mt][3] = dev::pack2<T>(s[mt][2 * c + 1][2], s[mt][2 * c + 1][3]);
        }
        #pragma unroll
        for (int j = 0; j < D / 16; ++j) {
          // Matrices (transposed): keys 16c + 0..7 / 8..15 at d 16j + 0..7, then d 16j + 8..15.
          uint32_t bv4[4];
          dev::ldmatrix<4, true>(bv4, sv + (16 * c + lane % 8 + lane / 8 % 2 * 8) * P + 16 * j +
                                          lane / 16 * 8);
          #pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            dev::mma_m16n8k16<kBF16>(o[mt][2 * j], a[mt], bv4, o[mt][2 * j]);
            dev::mma_m16n8k16<kBF16>(o[mt][2 * j + 1], a[mt], bv4 + 2, o[mt][2 * j + 1]);
          }
        }
      }
      __syncthreads();  // every warp is done with V(t) before V(t + 1) is issued
    }
  }

  // Normalize and store: out rows of this lane, 2 elements (4 bytes) per n8 tile; lse by the
  // quad's first lane.
  T* out = static_cast<T*>(p.out) + bh * p.Nq * dv;
  float* lse = p.lse + bh * p.Nq;
  #pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float sum = l[mt][hf];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int r = m0 + wrow + 16 * mt + g + 8 * hf;
      if (r >= Nq) continue;
      const bool empty = sum == 0.0f;
      const float inv = empty ? 0.0f : 1.0f / sum;
      T* row = out + static_cast<int64_t>(r) * dv + 2 * t4;
      #pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        if (j < chunks) {  // (not a break: the loop stays unrolled, o in registers)
          const uint32_t two =
              dev::pack2<T>(o[mt][j][2 * hf] * inv, o[mt][j][2 * hf + 1] * inv);
          memcpy(static_cast<void*>(row + 8 * j), &two, 4);
        }
      }
      if (t4 == 0) lse[r] = empty ? -INFINITY : (m[mt][hf] + log2f(sum)) * kLn2;
    }
  }
}

template <typename T, int D, bool kMods>
struct Launch {
  using S = Shape<D, kMods>;
  static int rows(int64_t BQ) {
    return static_cast<int>(BQ < S::kMaxRows ? BQ : S::kMaxRows);
  }
  static int threads(int rows) { return rows / (16 * S::kMT) * 32; }
  static size_t smem(int rows) {
    return static_cast<size_t>(rows + 2 * S::kBN) * S::kPitch * sizeof(T);
  }
  static cudaError_t run(const SparseAttentionFwdArgs& a, cudaStream_t stream) {
    const int r = rows(a.BQ);
    const int64_t grid = (a.Nq + r - 1) / r * a.B * a.Hq;
    if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
    return dev::launch(sparse_attention_fwd_kernel<T, D, kMods>,
                       dim3(static_cast<unsigned>(grid)), dim3(threads(r)), smem(r), stream, a);
  }
};

// The kernel with the score modifiers where a call has one, else the one without.
template <typename T, int D>
cudaError_t launch_d(const SparseAttentionFwdArgs& a, cudaStream_t stream) {
  if (a.softcap > 0.0f || a.alibi != nullptr) return Launch<T, D, true>::run(a, stream);
  return Launch<T, D, false>::run(a, stream);
}

template <typename T>
cudaError_t launch_typed(const SparseAttentionFwdArgs& a, cudaStream_t stream) {
  // Every multiple of 8 up to 256 on five instantiations: the next of 32, 64, 96, 128, 256
  // (up to 47% of the MMA work wasted on padding at D = 136; a size per multiple of 16 would
  // triple the kernels to build).
  if (a.D < 8 || a.D > 256 || a.D % 8 != 0) return cudaErrorInvalidValue;
  if (a.D <= 32) return launch_d<T, 32>(a, stream);
  if (a.D <= 64) return launch_d<T, 64>(a, stream);
  if (a.D <= 96) return launch_d<T, 96>(a, stream);
  if (a.D <= 128) return launch_d<T, 128>(a, stream);
  return launch_d<T, 256>(a, stream);
}

}  // namespace

cudaError_t launch_sparse_attention_fwd(const SparseAttentionFwdArgs& args, cudaStream_t stream) {
  if (args.BQ % 64 != 0 || args.BQ > 128 || args.BK % 64 != 0 || args.BK > 128) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case DType::kFloat16: return launch_typed<__half>(args, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

const KernelLaunchConfig* sparse_attention_kernel_configs() {
  // Threads and shared memory at BQ = 128 (the most of either).
#define FRUGAL_ROW(T, NAME, D, MODS)                                                 \
  {"sparse_attention_fwd_kernel<" NAME ", " #D ", " #MODS ">",                      \
   Launch<T, D, MODS>::threads(Launch<T, D, MODS>::rows(128)),                       \
   static_cast<int>(Launch<T, D, MODS>::smem(Launch<T, D, MODS>::rows(128)))}
#define FRUGAL_ROWS(T, NAME, D) FRUGAL_ROW(T, NAME, D, false), FRUGAL_ROW(T, NAME, D, true)
  static const KernelLaunchConfig rows[] = {
      FRUGAL_ROWS(__half, "__half", 32),         FRUGAL_ROWS(__half, "__half", 64),
      FRUGAL_ROWS(__half, "__half", 96),         FRUGAL_ROWS(__half, "__half", 128),
      FRUGAL_ROWS(__half, "__half", 256),        FRUGAL_ROWS(__nv_bfloat16, "__nv_bfloat16", 32),
      FRUGAL_ROWS(__nv_bfloat16, "__nv_bfloat16", 64),
      FRUGAL_ROWS(__nv_bfloat16, "__nv_bfloat16", 96),
      FRUGAL_ROWS(__nv_bfloat16, "__nv_bfloat16", 128),
      FRUGAL_ROWS(__nv_bfloat16, "__nv_bfloat16", 256),
      {nullptr, 0, 0}};
#undef FRUGAL_ROWS
#undef FRUGAL_ROW
  return rows;
}

}  // namespace frugal::cuda
