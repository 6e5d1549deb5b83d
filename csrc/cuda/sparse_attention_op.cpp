// Torch-facing glue of the CUDA block-sparse attention forward (csrc/cuda/sparse_attention.cu):
// frugal::sparse_attention_fwd on CUDA tensors, through the glue shared with the host emulation
// (sparse_attention_glue.h), with the current stream and a device guard.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "cuda/sparse_attention_glue.h"

namespace frugal::cuda {
namespace {

struct CudaBackend {
  static constexpr const char* kDevice = "CUDA";
  static bool on_device(const at::Tensor& t, const at::Tensor& ref) {
    return t.is_cuda() && t.device() == ref.device();
  }
  using Guard = c10::cuda::CUDAGuard;
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  static const char* error_string(cudaError_t e) { return cudaGetErrorString(e); }
};

}  // namespace
}  // namespace frugal::cuda

TORCH_LIBRARY_IMPL(frugal, CUDA, m) {
  m.impl("sparse_attention_fwd",
         &frugal::cuda::sparse_glue::sparse_attention_fwd<frugal::cuda::CudaBackend>);
}
