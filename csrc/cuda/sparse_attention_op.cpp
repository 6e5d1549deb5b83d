// Torch-facing glue of the CUDA block-sparse attention forward (csrc/cuda/sparse_attention.cu):
// frugal::sparse_attention_fwd on CUDA tensors, through the glue shared with the host emulation
// (sparse_attention_glue.h), with the current stream and a device guard (cuda_backend.h).
#include <torch/library.h>

#include "cuda/cuda_backend.h"
#include "cuda/sparse_attention_glue.h"

TORCH_LIBRARY_IMPL(frugal, CUDA, m) {
  m.impl("sparse_attention_fwd",
         &frugal::cuda::sparse_glue::sparse_attention_fwd<frugal::cuda::CudaDeviceBackend>);
}
