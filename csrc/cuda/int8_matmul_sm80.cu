// The CUTLASS 2.x W8A8 GEMMs (int8_matmul_sm80.cuh): int32 output for int8_mm, fp16 / bf16 /
// fp32 for int8_scaled_mm, each in the small and the large tile. Device code for sm_80 and the
// PTX that newer GPUs JIT; sm_90a runs int8_matmul_sm90.cu instead.
#include "cuda/int8_matmul_outputs.h"
#include "cuda/int8_matmul_sm80.cuh"

namespace frugal::cuda {

cudaError_t launch_int8_gemm_sm80_w8a8(const Int8GemmArgs& g, const Workspace& ws,
                                       cudaStream_t stream) {
  using namespace sm80;
  if (g.a_dtype != DType::kInt8) return cudaErrorInvalidValue;
  switch (g.out_dtype) {
#define FRUGAL_CASE(DT, D, NAME, EPI) \
  case DT: return run_bucketed<int8_t, D, EPI>(g, ws, stream);
    FRUGAL_INT8_W8A8_OUTPUTS(FRUGAL_CASE)
#undef FRUGAL_CASE
    default: return cudaErrorInvalidValue;
  }
}

const KernelLaunchConfig* int8_gemm_sm80_w8a8_configs() {
  using namespace sm80;
#define FRUGAL_ROWS(DT, D, NAME, EPI)                                                          \
  Gemm<int8_t, D, EPI, TileSmall>::config("int8_gemm_sm80<signed char, " NAME ", " #EPI      \
                                          ", TileSmall>"),                                    \
      Gemm<int8_t, D, EPI, TileLarge>::config("int8_gemm_sm80<signed char, " NAME ", " #EPI \
                                              ", TileLarge>"),
  static const KernelLaunchConfig rows[] = {FRUGAL_INT8_W8A8_OUTPUTS(FRUGAL_ROWS){nullptr, 0, 0}};
#undef FRUGAL_ROWS
  return rows;
}

}  // namespace frugal::cuda
