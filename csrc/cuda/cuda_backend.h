// The GPU side of the glue written once for the GPU and the host emulation
// (paged_attention_glue.h, sparse_attention_glue.h): CUDA tensors on the reference tensor's
// device, that device's guard, torch's current stream, CUDA's error names. An op's Backend adds
// what only it needs (the paged split plan's knobs).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

namespace frugal::cuda {

struct CudaDeviceBackend {
  static constexpr const char* kDevice = "CUDA";
  static bool on_device(const at::Tensor& t, const at::Tensor& ref) {
    return t.is_cuda() && t.device() == ref.device();
  }
  using Guard = c10::cuda::CUDAGuard;
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  static const char* error_string(cudaError_t e) { return cudaGetErrorString(e); }
};

}  // namespace frugal::cuda
