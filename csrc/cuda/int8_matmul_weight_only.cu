// The CUTLASS 2.x weight-only GEMMs (int8_matmul_sm80.cuh): fp16 / bf16 activations times an
// int8 weight upcast in registers, per-channel scale and bias in the epilogue, each in the
// small-M and large-M tile. Device code for sm_80 and sm_90a alike. Rejected for sm_90a:
// CUTLASS 3.x's mixed-input wgmma kernels, whose instantiations cost as much build time as the
// W8A8 ones, for decode shapes that are memory-bound on either kernel (docs/cuda_kernels.md).
#include "cuda/int8_matmul_sm80.cuh"

namespace frugal::cuda {

cudaError_t launch_int8_gemm_weight_only(const Int8GemmArgs& g, const Workspace& ws,
                                         cudaStream_t stream) {
  using cutlass::bfloat16_t;
  using cutlass::half_t;
  using sm80::ChannelScaledEpilogue;
  if (g.a_dtype != g.out_dtype) return cudaErrorInvalidValue;
  switch (g.a_dtype) {
    case DType::kFloat16:
      return sm80::run_bucketed<half_t, half_t, ChannelScaledEpilogue>(g, ws, stream);
    case DType::kBFloat16:
      return sm80::run_bucketed<bfloat16_t, bfloat16_t, ChannelScaledEpilogue>(g, ws, stream);
    default: return cudaErrorInvalidValue;
  }
}

const KernelLaunchConfig* int8_gemm_weight_only_configs() {
  using namespace sm80;
  using cutlass::bfloat16_t;
  using cutlass::half_t;
#define FRUGAL_ROW(T, NAME_T, TILE, NAME_TILE)                                           \
  Gemm<T, T, ChannelScaledEpilogue, TILE>::config("int8_gemm_sm80<" NAME_T ", " NAME_T \
                                                  ", ChannelScaledEpilogue, " NAME_TILE ">")
  static const KernelLaunchConfig rows[] = {
      FRUGAL_ROW(half_t, "half_t", TileSmallWeightOnly, "TileSmallWeightOnly"),
      FRUGAL_ROW(half_t, "half_t", TileLargeWeightOnly, "TileLargeWeightOnly"),
      FRUGAL_ROW(bfloat16_t, "bfloat16_t", TileSmallWeightOnly, "TileSmallWeightOnly"),
      FRUGAL_ROW(bfloat16_t, "bfloat16_t", TileLargeWeightOnly, "TileLargeWeightOnly"),
      {nullptr, 0, 0}};
#undef FRUGAL_ROW
  return rows;
}

}  // namespace frugal::cuda
