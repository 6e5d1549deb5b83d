// Torch-facing glue of the CUDA quantize_per_token kernel (csrc/cuda/quantize.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.h"

namespace frugal::cuda {
namespace {

DType dtype_of(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": x must be float32, float16 or bfloat16; got ", x.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "quantize_per_token: x must have at least 1 dim; got a 0-d tensor");
  const DType dtype = dtype_of(x, "quantize_per_token");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const int64_t M = scale.numel();
  if (M == 0) return {q, scale};
  if (K == 0) {
    scale.zero_();
    return {q, scale};
  }
  at::Tensor x2 = x.reshape({M, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const cudaError_t err = launch_quantize_per_token(
      dtype, x2.const_data_ptr(), x2.stride(0), q.data_ptr<int8_t>(), scale.data_ptr<float>(), M,
      K, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "quantize_per_token: CUDA launch failed: ",
              cudaGetErrorString(err));
  return {q, scale};
}

}  // namespace
}  // namespace frugal::cuda

TORCH_LIBRARY_IMPL(frugal, CUDA, m) {
  m.impl("quantize_per_token", &frugal::cuda::quantize_per_token_cuda);
}
