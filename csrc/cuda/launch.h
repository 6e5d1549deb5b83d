// Launchers of the CUDA kernels: plain pointers and a stream, so the .cu files compile without
// torch headers (fast builds); the torch-facing glue lives in csrc/cuda/*_op.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace frugal::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// x: M rows of K elements, row i at x + i * row_stride (elements), columns contiguous.
// q: [M, K] int8 contiguous; scale: [M] float32.
cudaError_t launch_quantize_per_token(DType dtype, const void* x, int64_t row_stride, int8_t* q,
                                      float* scale, int64_t M, int64_t K, cudaStream_t stream);

}  // namespace frugal::cuda
