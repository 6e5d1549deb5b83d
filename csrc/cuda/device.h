// What the CUDA kernels of csrc/cuda include instead of the CUDA headers: with nvcc, the
// toolkit headers and PTX; in the frugal._cuda_emu build (FRUGAL_CUDA_EMU, g++), the host
// emulation of csrc/cuda_emu/emu.h. The kernels are the same source either way; only the
// primitives below have two implementations.
//
// Tensor-core fragments (PTX ISA 9.7.14.5.8, mma.m16n8k16 / m16n8k8 with .f16 / .bf16 inputs and
// .f32 accumulators), for lane = 4 * g + t (g = lane / 4, t = lane % 4); each 32-bit register
// holds two 16-bit elements, the lower-indexed one in the low half:
//   A (16 x K, row-major):  a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1],
//                           a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]  (K = 16 only)
//   B (K x 8, "col"):       b[0] = B[2t..2t+1][g],   b[1] = B[2t+8..2t+9][g]      (K = 16 only)
//   C, D (16 x 8, f32):     c[0] = C[g][2t], c[1] = C[g][2t+1],
//                           c[2] = C[g+8][2t], c[3] = C[g+8][2t+1]
//
// ldmatrix (PTX ISA, "ldmatrix", .m8n8 .b16): .xN loads N 8 x 8 matrices of 16-bit elements
// from shared memory, each row 16 contiguous bytes at the address lane 8i + r gives (row r of
// matrix i; the other lanes' addresses are unused); lane l receives r[i] = M_i[l/4][2(l%4)],
// M_i[l/4][2(l%4)+1] (the first in the low half), or with .trans M_i[2(l%4)][l/4],
// M_i[2(l%4)+1][l/4]: the fragment of the transposed matrix. So a non-transposed x4 of a
// row-major 16 x 16 tile (matrices: rows 0-7 / 8-15 of columns 0-7, then of columns 8-15) is an
// A fragment; of 16 rows of a K-contiguous B^T (rows 0-7 of k 0-7 / k 8-15, then rows 8-15) it
// is the B fragments of two n8 tiles; .trans gives B fragments from a row-major K x N B.
#pragma once

#if defined(FRUGAL_CUDA_EMU)
#include "cuda_emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#if !defined(FRUGAL_CUDA_EMU)
#include <mutex>
#include <vector>
#endif

namespace frugal::cuda::dev {

// Two floats rounded to T (__half or __nv_bfloat16) in one 32-bit register, the first in the
// low half: an mma A / B fragment register, or two adjacent output elements.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "pack2 packs fp16 or bf16");
  uint32_t u;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    static_assert(sizeof(h) == 4, "bf16x2 is 32 bits");
    memcpy(&u, &h, 4);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, 4);
  }
  return u;
}

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#if defined(FRUGAL_CUDA_EMU)
  return reinterpret_cast<T*>(::frugal::emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char frugal_dynamic_smem[];
  return reinterpret_cast<T*>(frugal_dynamic_smem);
#endif
}

// mma.sync.aligned.m16n8kK.row.col.f32.T.T.f32 with T = bf16 or f16.
#define FRUGAL_MMA_M16N8K16(T)                                                                  \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." T "." T                                 \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"              \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),  \
                 "f"(c[1]), "f"(c[2]), "f"(c[3]))
#define FRUGAL_MMA_M16N8K8(T)                                                                   \
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32." T "." T                                  \
               ".f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"                          \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                 \
               : "r"(a[0]), "r"(a[1]), "r"(b), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]))

// d = a * b + c over the warp, m16n8k16; BF16 selects bf16 inputs (else f16).
template <bool BF16>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                             const float c[4]) {
#if defined(FRUGAL_CUDA_EMU)
  ::frugal::emu::mma(16, BF16, d, a, b, c);
#elif defined(__CUDA_ARCH__)
  if constexpr (BF16) {
    FRUGAL_MMA_M16N8K16("bf16");
  } else {
    FRUGAL_MMA_M16N8K16("f16");
  }
#endif
}

// d = a * b + c over the warp, m16n8k8.
template <bool BF16>
__device__ __forceinline__ void mma_m16n8k8(float d[4], const uint32_t a[2], uint32_t b,
                                            const float c[4]) {
#if defined(FRUGAL_CUDA_EMU)
  ::frugal::emu::mma(8, BF16, d, a, &b, c);
#elif defined(__CUDA_ARCH__)
  if constexpr (BF16) {
    FRUGAL_MMA_M16N8K8("bf16");
  } else {
    FRUGAL_MMA_M16N8K8("f16");
  }
#endif
}

#undef FRUGAL_MMA_M16N8K16
#undef FRUGAL_MMA_M16N8K8

// ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16 over the warp, N = 1, 2 or 4; row is this
// lane's row address (16-byte aligned, in shared memory).
template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(FRUGAL_CUDA_EMU)
  ::frugal::emu::ldmatrix(N, TRANS, r, row);
#elif defined(__CUDA_ARCH__)
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (N == 1 && TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 2 && TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  }
#endif
}

// Asynchronous global -> shared copy of BYTES (4, 8 or 16); fill = false writes zeros and reads
// nothing (so a masked position's address is never dereferenced).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool fill) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(FRUGAL_CUDA_EMU)
  ::frugal::emu::cp_async(smem, gmem, BYTES, fill ? BYTES : 0);
#elif defined(__CUDA_ARCH__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = fill ? BYTES : 0;
  if constexpr (BYTES == 16) {  // .cg: K/V are streamed once, keep them out of L1
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem),
                 "n"(BYTES), "r"(src_bytes));
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(FRUGAL_CUDA_EMU)
  ::frugal::emu::cp_async_commit();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FRUGAL_CUDA_EMU)
  ::frugal::emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), raising the dynamic shared memory limit
// first when smem needs more than the default 48 KiB; returns the launch's error.
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   A&&... args) {
#if defined(FRUGAL_CUDA_EMU)
  (void)stream;
  return ::frugal::emu::launch(kernel, grid, block, smem, std::forward<A>(args)...);
#else
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
  return cudaGetLastError();
#endif
}

// Resident blocks per SM for a launch of kernel with this block size and dynamic shared
// memory: the occupancy calculator on a GPU (asked once per kernel, device and configuration:
// a plan per layer must not cost driver calls), the emulator's configured value on the host.
template <typename... P>
int blocks_per_sm(void (*kernel)(P...), int threads, size_t smem) {
#if defined(FRUGAL_CUDA_EMU)
  (void)kernel;
  (void)threads;
  (void)smem;
  return ::frugal::emu::blocks_per_sm();
#else
  struct Entry {
    const void* kernel;
    int device, threads;
    size_t smem;
    int blocks;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  const void* key = reinterpret_cast<const void*>(kernel);
  {
    const std::lock_guard<std::mutex> lock(mu);
    for (const Entry& e : cache) {
      if (e.kernel == key && e.device == device && e.threads == threads && e.smem == smem) {
        return e.blocks;
      }
    }
  }
  int n = 0;
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess) {
    (void)cudaGetLastError();
  } else if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) !=
             cudaSuccess) {
    (void)cudaGetLastError();
  }
  n = n > 0 ? n : 1;
  const std::lock_guard<std::mutex> lock(mu);
  cache.push_back({key, device, threads, smem, n});
  return n;
#endif
}

inline const char* error_string(cudaError_t e) {
#if defined(FRUGAL_CUDA_EMU)
  return e == cudaSuccess ? "no error" : ::frugal::emu::last_error();
#else
  return cudaGetErrorString(e);
#endif
}

}  // namespace frugal::cuda::dev
