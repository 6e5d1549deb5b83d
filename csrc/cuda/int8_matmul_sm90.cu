// The CUTLASS 3.x W8A8 GEMMs for sm_90a (int8_matmul_sm90.cuh): int32 output for int8_mm,
// fp16 / bf16 / fp32 for int8_scaled_mm, each in the small and the large tile. Device code for
// sm_90a only (the empty stubs on other targets are never launched).
#include "cuda/int8_matmul_outputs.h"
#include "cuda/int8_matmul_sm90.cuh"

namespace frugal::cuda {

namespace {
template <typename ElementD, template <class, class> class Epi>
cudaError_t w8a8(const Int8GemmArgs& g, const Workspace& ws, cudaStream_t stream) {
  if (use_large_tile(g.M, g.N)) {
    return sm90::Gemm<ElementD, Epi, sm90::TileLarge>::run(g, ws, stream);
  }
  return sm90::Gemm<ElementD, Epi, sm90::TileSmall>::run(g, ws, stream);
}
}  // namespace

cudaError_t launch_int8_gemm_sm90(const Int8GemmArgs& g, const Workspace& ws,
                                  cudaStream_t stream) {
  using namespace sm90;
  if (g.a_dtype != DType::kInt8) return cudaErrorInvalidValue;
  switch (g.out_dtype) {
#define FRUGAL_CASE(DT, D, NAME, EPI) \
  case DT: return w8a8<D, EPI>(g, ws, stream);
    FRUGAL_INT8_W8A8_OUTPUTS(FRUGAL_CASE)
#undef FRUGAL_CASE
    default: return cudaErrorInvalidValue;
  }
}

const KernelLaunchConfig* int8_gemm_sm90_configs() {
  using namespace sm90;
#define FRUGAL_ROWS(DT, D, NAME, EPI)                                                   \
  Gemm<D, EPI, TileSmall>::config("int8_gemm_sm90<" NAME ", " #EPI ", TileSmall>"),    \
      Gemm<D, EPI, TileLarge>::config("int8_gemm_sm90<" NAME ", " #EPI ", TileLarge>"),
  static const KernelLaunchConfig rows[] = {FRUGAL_INT8_W8A8_OUTPUTS(FRUGAL_ROWS){nullptr, 0, 0}};
#undef FRUGAL_ROWS
  return rows;
}

}  // namespace frugal::cuda
