// Torch-facing glue of the CUDA paged KV-cache kernels (csrc/cuda/paged_attention.cu): the
// shared glue of paged_attention_glue.h on the GPU, with the current stream and a device guard.
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "cuda/cuda_backend.h"
#include "cuda/paged_attention_glue.h"

namespace frugal::cuda {
namespace {

struct CudaBackend : CudaDeviceBackend {
  static PlanKnobs knobs(const at::Tensor& q) {
    // SM counts per device, read once: the split plan must not cost a driver call per layer.
    static std::array<std::atomic<int>, 64> sms{};
    const int dev = q.device().index();
    int n = dev < 64 ? sms[dev].load() : 0;
    if (n == 0) {
      TORCH_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess,
                  "paged_attention: cannot read the SM count of cuda:", dev);
      if (dev < 64) sms[dev].store(n);
    }
    return {n, 512};  // vLLM v2's partition: never split below 512 positions
  }
  static void on_plan(const PagedAttentionPlan&) {}
};

}  // namespace
}  // namespace frugal::cuda

TORCH_LIBRARY_IMPL(frugal, CUDA, m) {
  using frugal::cuda::CudaBackend;
  m.impl("paged_attention", &frugal::cuda::glue::paged_attention<CudaBackend>);
  m.impl("paged_prefill_attention", &frugal::cuda::glue::paged_prefill_attention<CudaBackend>);
  m.impl("paged_append", &frugal::cuda::glue::paged_append<CudaBackend>);
  m.impl("paged_attention_lse", &frugal::cuda::glue::paged_attention_lse<CudaBackend>);
  m.impl("paged_prefill_attention_lse",
         &frugal::cuda::glue::paged_prefill_attention_lse<CudaBackend>);
}
