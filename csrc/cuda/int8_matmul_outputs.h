// What both CUTLASS W8A8 families share (int8_matmul_sm80.cu, int8_matmul_sm90.cu): the rule
// that picks their tile, and the output types they instantiate.
#pragma once

#include <cstdint>

namespace frugal::cuda {

// Both families run their large tile (128 x 128) once it makes about a wave of output tiles on
// an A100 / H100 (128), their small tile below, decode included: at M = 128, N = 4096 the large
// tile would leave 32 CTAs for 108-132 SMs (vLLM's dispatch adds a third, medium tile for that
// range; two tiles keep the build within CI's time).
constexpr int64_t kLargeTileWave = 128;
inline bool use_large_tile(int64_t M, int64_t N) {
  return ((M + 127) / 128) * ((N + 127) / 128) >= kLargeTileWave;
}

}  // namespace frugal::cuda

// The W8A8 outputs as an X-macro: X(out dtype, ElementD, "ElementD as the demangler names it
// without namespaces", epilogue). The dtype picks one at run time; the names make each family's
// launch configuration table (frugal.build_info's kernel names). Expanded after the CUTLASS
// headers.
#define FRUGAL_INT8_W8A8_OUTPUTS(X)                                                   \
  X(::frugal::cuda::DType::kInt32, int32_t, "int", IdentityEpilogue)                  \
  X(::frugal::cuda::DType::kFloat16, cutlass::half_t, "half_t", ScaledEpilogue)       \
  X(::frugal::cuda::DType::kBFloat16, cutlass::bfloat16_t, "bfloat16_t", ScaledEpilogue) \
  X(::frugal::cuda::DType::kFloat32, float, "float", ScaledEpilogue)
