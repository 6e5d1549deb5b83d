// Kernels that test the emulator itself (tests/test_paged_attention_cuda.py,
// tests/test_sparse_attention_cuda.py): lane semantics of the warp collectives, barriers,
// tensor-core fragments, ldmatrix, cp.async, shared-memory poison, error reporting, and
// deliberately wrong kernels (a missing barrier, a shuffle in the wrong direction, a read
// before cp.async lands, a B fragment loaded without .trans) that must give wrong answers, so
// that a test of a real kernel can fail. CUDA source like csrc/cuda/*.cu, built only for the
// emulator.
#include <cstring>
#include <string>

#include "cuda/device.h"

namespace frugal::emu {
namespace {

using cuda::dev::cp_async;
using cuda::dev::cp_async_commit;
using cuda::dev::cp_async_wait;
using cuda::dev::dynamic_smem;
using cuda::dev::ldmatrix;

// ldmatrix: x holds NUM 8 x 8 matrices of small integers (exact in f16), matrix i row r at
// x[64 i + 8 r]. They go to shared memory as f16 rows 48 bytes apart (aligned, not contiguous)
// in reverse matrix order; lane 8i + r addresses row r of matrix i, the lanes past 8 NUM a
// misaligned address (unused: must not fail). out[2 (NUM lane + i) + h] = half h (0 low) of
// the lane's register i.
template <int NUM, bool TRANS>
__global__ void ldmatrix_kernel(const float* x, float* out) {
  constexpr int kPitch = 24;  // halves
  __half* s = dynamic_smem<__half>();
  const int lane = threadIdx.x;
  for (int e = lane; e < NUM * 64; e += 32) {
    const int i = e / 64, row = e / 8 % 8, col = e % 8;
    s[((NUM - 1 - i) * 8 + row) * kPitch + col] = __float2half_rn(x[e]);
  }
  __syncwarp();
  const __half* mine = lane < 8 * NUM ? s + ((NUM - 1 - lane / 8) * 8 + lane % 8) * kPitch : s + 1;
  uint32_t r[NUM];
  ldmatrix<NUM, TRANS>(r, mine);
  for (int i = 0; i < NUM; ++i) {
    __half_raw lo, hi;
    lo.x = static_cast<uint16_t>(r[i] & 0xffffu);
    hi.x = static_cast<uint16_t>(r[i] >> 16);
    out[2 * (NUM * lane + i)] = __half2float(__half(lo));
    out[2 * (NUM * lane + i) + 1] = __half2float(__half(hi));
  }
}

// One warp: A (16 x 16) and B (16 x 8, row-major K x N) from x into shared memory as f16, the A
// fragment by ldmatrix.x4, B's by ldmatrix.x2.trans (WRONG: without .trans, which loads B^T),
// then mma m16n8k16; D row-major to out (16 x 8).
template <bool WRONG>
__global__ void ldmatrix_mma_kernel(const float* x, float* out) {
  constexpr int kPitchA = 24, kPitchB = 16;  // halves
  __half* sa = dynamic_smem<__half>();
  __half* sb = sa + 16 * kPitchA;
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int e = lane; e < 256; e += 32) sa[e / 16 * kPitchA + e % 16] = __float2half_rn(x[e]);
  for (int e = lane; e < 128; e += 32) sb[e / 8 * kPitchB + e % 8] = __float2half_rn(x[256 + e]);
  __syncwarp();
  uint32_t a[4], b[2];
  ldmatrix<4, false>(a, sa + (lane % 16) * kPitchA + (lane / 16) * 8);
  if (WRONG) {
    ldmatrix<2, false>(b, sb + (lane % 16) * kPitchB);
  } else {
    ldmatrix<2, true>(b, sb + (lane % 16) * kPitchB);
  }
  const float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float d[4];
  cuda::dev::mma_m16n8k16<false>(d, a, b, c);
  out[g * 8 + 2 * t] = d[0];
  out[g * 8 + 2 * t + 1] = d[1];
  out[(g + 8) * 8 + 2 * t] = d[2];
  out[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// ldmatrix misused: from global memory (kind 0), from a misaligned shared address (1), or with
// lanes disagreeing on the shape (2: lane 5 loads x2, the others x4).
__global__ void ldmatrix_error_kernel(const float* x, float* out, int kind) {
  __half* s = dynamic_smem<__half>();
  const int lane = threadIdx.x;
  uint32_t r[4] = {0u, 0u, 0u, 0u};
  if (kind == 0) {
    ldmatrix<4, false>(r, x + 4 * lane);
  } else if (kind == 1) {
    ldmatrix<4, false>(r, s + 8 * lane + (lane == 3 ? 1 : 0));
  } else if (lane == 5) {
    uint32_t r2[2];
    ldmatrix<2, false>(r2, s + 8 * lane);
    r[0] = r2[0];
  } else {
    ldmatrix<4, false>(r, s + 8 * lane);
  }
  out[lane] = static_cast<float>(r[0]);
}

// out[r * 32 + lane] for r = idx (src 31 - lane), up 3, down 5, xor 6, idx with src lane + 1
// under a mask of the even lanes only (odd lanes write -1): all with the given width.
__global__ void shuffle_kernel(const float* x, float* out, int width) {
  const int lane = threadIdx.x;
  const int v = static_cast<int>(x[lane]);
  out[0 * 32 + lane] = static_cast<float>(__shfl_sync(0xffffffffu, v, 31 - lane, width));
  out[1 * 32 + lane] = static_cast<float>(__shfl_up_sync(0xffffffffu, v, 3, width));
  out[2 * 32 + lane] = static_cast<float>(__shfl_down_sync(0xffffffffu, v, 5, width));
  out[3 * 32 + lane] = static_cast<float>(__shfl_xor_sync(0xffffffffu, v, 6, width));
  if (lane % 2 == 0) {
    out[4 * 32 + lane] = static_cast<float>(__shfl_sync(0x55555555u, v, lane + 2, width));
  } else {
    out[4 * 32 + lane] = -1.0f;
  }
}

// out[0] = ballot (low 16 bits), out[1] = high 16 bits, out[2] = any, out[3] = all over the
// full warp; out[4..5]: ballot over the lanes of `mask` (the others skip it).
__global__ void ballot_kernel(const float* x, float* out, unsigned mask) {
  const int lane = threadIdx.x;
  const int p = x[lane] != 0.0f;
  const unsigned b = __ballot_sync(0xffffffffu, p);
  const int any = __any_sync(0xffffffffu, p), all = __all_sync(0xffffffffu, p);
  if (lane == 0) {
    out[0] = static_cast<float>(b & 0xffffu);
    out[1] = static_cast<float>(b >> 16);
    out[2] = static_cast<float>(any);
    out[3] = static_cast<float>(all);
  }
  if (mask >> lane & 1u) {
    const unsigned m = __ballot_sync(mask, p);
    if (lane == __ffs(static_cast<int>(mask)) - 1) {
      out[4] = static_cast<float>(m & 0xffffu);
      out[5] = static_cast<float>(m >> 16);
    }
  }
}

// Block sum of x[0, 128) through a shared-memory tree; RACY drops the barriers.
template <bool RACY>
__global__ void block_sum_kernel(const float* x, float* out) {
  float* s = dynamic_smem<float>();
  const int tid = threadIdx.x;
  s[tid] = x[tid];
  if (!RACY) __syncthreads();
  for (int half = 64; half > 0; half /= 2) {
    if (tid < half) s[tid] += s[tid + half];
    if (!RACY) __syncthreads();
  }
  if (tid == 0) out[0] = s[0];
  // __syncthreads_count / _or / _and of tid % 3 == 0 over the block.
  const int c = __syncthreads_count(tid % 3 == 0);
  const int o = __syncthreads_or(tid == 77);
  const int a = __syncthreads_and(tid < 200);
  if (tid == 0) {
    out[1] = static_cast<float>(c);
    out[2] = static_cast<float>(o);
    out[3] = static_cast<float>(a);
  }
}

// Warp sum by shuffles: down (correct) or up (wrong direction: lane 0 keeps its own value).
template <bool WRONG>
__global__ void warp_sum_kernel(const float* x, float* out) {
  const int lane = threadIdx.x;
  float v = x[lane];
  for (int off = 16; off > 0; off >>= 1) {
    v += WRONG ? __shfl_up_sync(0xffffffffu, v, off) : __shfl_down_sync(0xffffffffu, v, off);
  }
  if (lane == 0) out[0] = v;
}

// One warp: A (16 x K), B (K x 8), C (16 x 8) row-major in x, rounded to f16 / bf16 (A, B);
// loads them into fragments by the documented layout, runs the mma, stores D row-major.
template <int K, bool BF16>
__global__ void mma_kernel(const float* x, float* out) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  const float* A = x;
  const float* B = x + 16 * K;
  const float* C = B + K * 8;
  const auto pack = [](float lo, float hi) {
    uint32_t u;
    if (BF16) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      std::memcpy(&u, &h, 4);
    } else {
      const __half2 h = __floats2half2_rn(lo, hi);
      std::memcpy(&u, &h, 4);
    }
    return u;
  };
  uint32_t a[4] = {pack(A[g * K + 2 * t], A[g * K + 2 * t + 1]),
                   pack(A[(g + 8) * K + 2 * t], A[(g + 8) * K + 2 * t + 1]), 0u, 0u};
  uint32_t b[2] = {pack(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]), 0u};
  if (K == 16) {
    a[2] = pack(A[g * K + 2 * t + 8], A[g * K + 2 * t + 9]);
    a[3] = pack(A[(g + 8) * K + 2 * t + 8], A[(g + 8) * K + 2 * t + 9]);
    b[1] = pack(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
  }
  const float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                      C[(g + 8) * 8 + 2 * t + 1]};
  float d[4];
  if (K == 16) {
    cuda::dev::mma_m16n8k16<BF16>(d, a, b, c);
  } else {
    cuda::dev::mma_m16n8k8<BF16>(d, a, b[0], c);
  }
  out[g * 8 + 2 * t] = d[0];
  out[g * 8 + 2 * t + 1] = d[1];
  out[(g + 8) * 8 + 2 * t] = d[2];
  out[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Each of 32 lanes copies 4 floats of x into shared memory with cp.async and reads them back,
// after the wait (WAIT) or before it.
template <bool WAIT>
__global__ void cp_async_kernel(const float* x, float* out) {
  float* s = dynamic_smem<float>();
  const int lane = threadIdx.x;
  cp_async<16>(s + 4 * lane, x + 4 * lane, true);
  cp_async<16>(s + 128 + 4 * lane, x + 4 * lane, false);  // zero fill
  cp_async_commit();
  if (WAIT) cp_async_wait<0>();
  for (int e = 0; e < 4; ++e) {
    out[4 * lane + e] = s[4 * lane + e];
    out[128 + 4 * lane + e] = s[128 + 4 * lane + e];
  }
  if (!WAIT) cp_async_wait<0>();
}

// Reads shared memory nobody wrote.
__global__ void smem_poison_kernel(float* out) {
  out[threadIdx.x] = dynamic_smem<float>()[threadIdx.x];
}

// Lane 0 returns; the others shuffle with a full mask (lane 0 can never arrive).
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Lanes 0..15 wait at a full-warp __syncwarp that lanes 16..31 skip for __syncthreads, which
// in turn waits for lanes 0..15: nobody can proceed.
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x < 16) __syncwarp();
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Every thread of 8 blocks of 64 adds 1 to out[0] atomically, and block b records its
// blockIdx / gridDim / blockDim in out[1 + 4 b ..].
__global__ void atomic_kernel(float* out) {
  atomicAdd(out, 1.0f);
  if (threadIdx.x == 0) {
    out[1 + 4 * blockIdx.x] = static_cast<float>(blockIdx.x);
    out[2 + 4 * blockIdx.x] = static_cast<float>(gridDim.x);
    out[3 + 4 * blockIdx.x] = static_cast<float>(blockDim.x);
    out[4 + 4 * blockIdx.x] = static_cast<float>(threadIdx.x);
  }
}

}  // namespace

int run_selftest(const char* name, const float* x, int64_t n, int64_t arg, float* out,
                 int64_t out_capacity, int64_t* out_n) {
  const std::string s(name);
  const auto need = [&](int64_t in, int64_t outs) {
    *out_n = outs;
    return n >= in && out_capacity >= outs;
  };
  cudaError_t e = cudaErrorInvalidValue;
  using cuda::dev::launch;
  if (s == "shuffle") {
    if (need(32, 5 * 32)) {
      e = launch(shuffle_kernel, 1, 32, 0, nullptr, x, out, static_cast<int>(arg));
    }
  } else if (s == "ballot") {
    if (need(32, 6)) {
      e = launch(ballot_kernel, 1, 32, 0, nullptr, x, out, static_cast<unsigned>(arg));
    }
  } else if (s == "block_sum" || s == "block_sum_racy") {
    if (need(128, 4)) {
      e = s == "block_sum" ? launch(block_sum_kernel<false>, 1, 128, 128 * 4, nullptr, x, out)
                           : launch(block_sum_kernel<true>, 1, 128, 128 * 4, nullptr, x, out);
    }
  } else if (s == "warp_sum" || s == "warp_sum_wrong") {
    if (need(32, 1)) {
      e = s == "warp_sum" ? launch(warp_sum_kernel<false>, 1, 32, 0, nullptr, x, out)
                          : launch(warp_sum_kernel<true>, 1, 32, 0, nullptr, x, out);
    }
  } else if (s == "mma16" || s == "mma8") {
    const int K = s == "mma16" ? 16 : 8;
    if (need(16 * K + K * 8 + 16 * 8, 16 * 8)) {
      if (K == 16) {
        e = arg ? launch(mma_kernel<16, true>, 1, 32, 0, nullptr, x, out)
                : launch(mma_kernel<16, false>, 1, 32, 0, nullptr, x, out);
      } else {
        e = arg ? launch(mma_kernel<8, true>, 1, 32, 0, nullptr, x, out)
                : launch(mma_kernel<8, false>, 1, 32, 0, nullptr, x, out);
      }
    }
  } else if (s == "ldmatrix" || s == "ldmatrix_trans") {
    // arg: the number of matrices (1, 2 or 4).
    const bool tr = s == "ldmatrix_trans";
    if ((arg == 1 || arg == 2 || arg == 4) && need(arg * 64, 64 * arg)) {
      const size_t smem = 32 * 24 * 2;
      if (arg == 1) {
        e = tr ? launch(ldmatrix_kernel<1, true>, 1, 32, smem, nullptr, x, out)
               : launch(ldmatrix_kernel<1, false>, 1, 32, smem, nullptr, x, out);
      } else if (arg == 2) {
        e = tr ? launch(ldmatrix_kernel<2, true>, 1, 32, smem, nullptr, x, out)
               : launch(ldmatrix_kernel<2, false>, 1, 32, smem, nullptr, x, out);
      } else {
        e = tr ? launch(ldmatrix_kernel<4, true>, 1, 32, smem, nullptr, x, out)
               : launch(ldmatrix_kernel<4, false>, 1, 32, smem, nullptr, x, out);
      }
    }
  } else if (s == "ldmatrix_mma" || s == "ldmatrix_mma_wrong") {
    if (need(256 + 128, 128)) {
      const size_t smem = (16 * 24 + 16 * 16) * 2;
      e = s == "ldmatrix_mma" ? launch(ldmatrix_mma_kernel<false>, 1, 32, smem, nullptr, x, out)
                              : launch(ldmatrix_mma_kernel<true>, 1, 32, smem, nullptr, x, out);
    }
  } else if (s == "ldmatrix_error") {
    if (need(128, 32)) {
      e = launch(ldmatrix_error_kernel, 1, 32, 32 * 16, nullptr, x, out, static_cast<int>(arg));
    }
  } else if (s == "cp_async" || s == "cp_async_nowait") {
    if (need(128, 256)) {
      e = s == "cp_async" ? launch(cp_async_kernel<true>, 1, 32, 256 * 4, nullptr, x, out)
                          : launch(cp_async_kernel<false>, 1, 32, 256 * 4, nullptr, x, out);
    }
  } else if (s == "smem_poison") {
    if (need(0, 32)) e = launch(smem_poison_kernel, 1, 32, 32 * 4, nullptr, out);
  } else if (s == "exited_lane") {
    if (need(0, 32)) e = launch(exited_lane_kernel, 1, 32, 0, nullptr, out);
  } else if (s == "deadlock") {
    if (need(0, 64)) e = launch(deadlock_kernel, 1, 64, 0, nullptr, out);
  } else if (s == "atomic") {
    if (need(0, 1 + 4 * 8)) {
      std::memset(out, 0, (1 + 4 * 8) * sizeof(float));
      e = launch(atomic_kernel, 8, 64, 0, nullptr, out);
    }
  } else {
    *out_n = 0;
    return -1;
  }
  return static_cast<int>(e);
}

}  // namespace frugal::emu
