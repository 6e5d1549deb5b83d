// quantize_per_token on the GPU: one block per row (grid-stride over rows), a block-wide
// absmax, then the row is read again (from L2) and quantized. Bit-identical to the reference:
// IEEE division (__fdiv_rn) and round-half-to-even (__float2int_rn).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "cuda/launch.h"

namespace frugal::cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kQMax = 127.0f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC>
struct alignas(VEC) QPack {
  int8_t v[VEC];
};

template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ Pack<T, VEC> load(const T* xr, int64_t k, int64_t K) {
  if constexpr (ALIGNED) {
    return *reinterpret_cast<const Pack<T, VEC>*>(xr + k);
  } else {
    Pack<T, VEC> p;
#pragma unroll
    for (int i = 0; i < VEC; ++i) p.v[i] = k + i < K ? xr[k + i] : T{};
    return p;
  }
}

__device__ __forceinline__ float block_max(float v, float* smem) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? smem[lane] : 0.0f;
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Each thread handles VEC consecutive elements per step. ALIGNED: K and row_stride are
// multiples of VEC and x, q are pack-aligned, so packs are loaded and stored whole; otherwise
// element by element with bounds checks.
template <typename T, int VEC, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
    quantize_per_token_kernel(const T* __restrict__ x, int64_t row_stride, int8_t* __restrict__ q,
                              float* __restrict__ scale, int64_t M, int64_t K) {
  __shared__ float smem[kThreads / 32];
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * row_stride;
    int8_t* qr = q + row * K;
    float amax = 0.0f;
    int bad = 0;
    for (int64_t k = int64_t(threadIdx.x) * VEC; k < K; k += int64_t(kThreads) * VEC) {
      const Pack<T, VEC> p = load<T, VEC, ALIGNED>(xr, k, K);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float a = fabsf(to_float(p.v[i]));
        bad |= !(a <= FLT_MAX);  // inf or NaN
        amax = fmaxf(amax, a);
      }
    }
    bad = __syncthreads_or(bad);
    amax = block_max(amax, smem);
    const float s = bad ? __int_as_float(0x7fc00000) : __fdiv_rn(amax, kQMax);
    if (threadIdx.x == 0) scale[row] = s;
    const bool zero = bad || s == 0.0f;
    const float divisor = zero ? 1.0f : s;
    for (int64_t k = int64_t(threadIdx.x) * VEC; k < K; k += int64_t(kThreads) * VEC) {
      const Pack<T, VEC> p = load<T, VEC, ALIGNED>(xr, k, K);
      QPack<VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float r = fminf(fmaxf(__fdiv_rn(to_float(p.v[i]), divisor), -kQMax), kQMax);
        out.v[i] = zero ? 0 : static_cast<int8_t>(__float2int_rn(r));
      }
      if constexpr (ALIGNED) {
        *reinterpret_cast<QPack<VEC>*>(qr + k) = out;
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          if (k + i < K) qr[k + i] = out.v[i];
        }
      }
    }
    __syncthreads();  // smem is reused by the next row
  }
}

template <typename T>
cudaError_t launch(const T* x, int64_t row_stride, int8_t* q, float* scale, int64_t M, int64_t K,
                   cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int blocks = static_cast<int>(M < (int64_t{1} << 20) ? M : (int64_t{1} << 20));
  const bool aligned = K % kVec == 0 && row_stride % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(q) % kVec == 0;
  if (aligned) {
    quantize_per_token_kernel<T, kVec, true>
        <<<blocks, kThreads, 0, stream>>>(x, row_stride, q, scale, M, K);
  } else {
    quantize_per_token_kernel<T, kVec, false>
        <<<blocks, kThreads, 0, stream>>>(x, row_stride, q, scale, M, K);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_quantize_per_token(DType dtype, const void* x, int64_t row_stride, int8_t* q,
                                      float* scale, int64_t M, int64_t K, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch(static_cast<const float*>(x), row_stride, q, scale, M, K, stream);
    case DType::kFloat16:
      return launch(static_cast<const __half*>(x), row_stride, q, scale, M, K, stream);
    case DType::kBFloat16:
      return launch(static_cast<const __nv_bfloat16*>(x), row_stride, q, scale, M, K, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace frugal::cuda
