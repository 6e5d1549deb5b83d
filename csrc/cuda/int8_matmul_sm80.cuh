// CUTLASS 2.x GEMMs of the int8 ops (mma.sync, cp.async multistage mainloop), for sm_80 and
// newer, with the epilogue written as an epilogue visitor tree (EVT): the dequantization and
// bias run on the accumulators before the one store of the output (vLLM's cutlass_scaled_mm
// on sm_80 does the same; this file shares no code with it).
//
//   W8A8        int8 A [M, K] (row-major) x int8 B [N, K] (nn.Linear's layout: column-major
//               K x N), int32 accumulators; D = acc (int8_mm, int32 out) or
//               D = acc * a_scale[m] * b_scale[n] + bias[n] (int8_scaled_mm, fp16/bf16/fp32).
//   weight-only fp16/bf16 A x int8 B, B upcast to A's type in registers
//               (OpMultiplyAddMixedInputUpcast: int8 is exact in both), fp32 accumulators;
//               D = acc * b_scale[n] + bias[n] in A's type.
//
// Data-parallel schedule (one CTA per output tile, rasterized in groups of 8 along M for L2
// reuse). Rejected: CUTLASS's stream-K schedule for this kernel family, which would split K
// for shapes with few tiles, because its kernels keep a ~900-byte stack frame (measured with
// ptxas -v for every tile here), and the project's kernels have none; the visitor kernels
// support no other split-K.
//
// Only included by the int8_matmul_sm80*.cu translation units (CUTLASS headers are slow to
// compile; the torch glue never sees them).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

// Order matters: the visitor headers use names these define first.
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cuda/int8_matmul_outputs.h"
#include "cuda/launch.h"

namespace frugal::cuda::sm80 {

// Keeps a kernel's device code out of the targets that never run it: the W8A8 kernels are
// compiled for sm_80 (and the PTX that newer GPUs JIT) but not for sm_90a, whose build runs the
// CUTLASS 3.x kernels (int8_matmul_sm90.cu) instead; the stub left on sm_90a (an empty kernel)
// is never launched. It halves the device compile time of those kernels. Keyed on sm_90a's
// feature macro, not __CUDA_ARCH__ == 900: a build for plain sm_90 (TORCH_CUDA_ARCH_LIST=9.0)
// has no 3.x kernels (FRUGAL_SM90A unset), and the glue runs these there.
template <typename Kernel, bool kOnSm90a>
struct ArchGuard : Kernel {
  template <typename... Args>
  CUTLASS_DEVICE static void invoke(Args&&... args) {
#if defined(__CUDA_ARCH__)
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    Kernel::invoke(static_cast<Args&&>(args)...);
#else
    if constexpr (kOnSm90a) Kernel::invoke(static_cast<Args&&>(args)...);
#endif
#endif
  }
};

// The two tiles (int8: instruction 16 x 8 x 32; weight-only: 16 x 8 x 16; use_large_tile in
// int8_matmul_outputs.h picks one). Without split-K a small M makes few output tiles: the
// small tile keeps 64 CTAs busy at N = 4096 even for one row, each streaming its slice of the
// weight through a 5-deep cp.async pipeline (48 KiB in flight per CTA, 3 MiB over the GPU: HBM
// latency times bandwidth).
struct TileSmall {  // 4 warps of 32 x 32, K sliced in two; 60 KiB (int8)
  using Threadblock = cutlass::gemm::GemmShape<32, 64, 128>;
  using Warp = cutlass::gemm::GemmShape<32, 32, 64>;
  static constexpr int kStages = 5;
};
struct TileLarge {  // 4 warps of 64 x 64; 64 KiB (int8), 2 CTAs per SM
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 64>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 64>;
  static constexpr int kStages = 4;
};
// Weight-only: a 16-bit A tile row may span at most one 128-byte line of the swizzled shared
// memory layout, so K is 64 per stage, and the small tile runs more stages.
struct TileSmallWeightOnly {  // 4 warps of 32 x 32, K sliced in two; 64 KiB
  using Threadblock = cutlass::gemm::GemmShape<32, 64, 64>;
  using Warp = cutlass::gemm::GemmShape<32, 32, 32>;
  static constexpr int kStages = 8;
};
struct TileLargeWeightOnly {  // 4 warps of 64 x 64; 72 KiB (3 stages: 4 would take 96 KiB,
                             // one CTA per sm_80 SM)
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 64>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 64>;
  static constexpr int kStages = 3;
};

using cute::Int;
using cute::Stride;
namespace tb = cutlass::epilogue::threadblock;

// The output store, row-major D with leading dimension ldd.
template <typename ThreadMap, typename ElementD>
using StoreD = tb::VisitorAuxStore<ThreadMap, ElementD, cutlass::FloatRoundStyle::round_to_nearest,
                                   Stride<int64_t, Int<1>, Int<0>>>;
// Per-row (a_scale) and per-column (b_scale, bias) fp32 vectors; a null column pointer reads
// as 0 (no bias).
template <typename ThreadMap>
using PerRow = tb::VisitorColBroadcast<ThreadMap, float, Stride<Int<1>, Int<0>, Int<0>>>;
template <typename ThreadMap>
using PerCol = tb::VisitorRowBroadcast<ThreadMap, float, Stride<Int<0>, Int<1>, Int<0>>>;
template <template <class> class Fn, typename Out>
using Compute = tb::VisitorCompute<Fn, Out, float, cutlass::FloatRoundStyle::round_to_nearest>;

// EVT of the scaled W8A8 epilogue: D = (acc * a_scale[m]) * b_scale[n] + bias[n], fp32 in
// this order (the Triton and CPU kernels' order), one rounding to ElementD at the end.
template <typename ThreadMap, typename ElementD>
struct ScaledEpilogue {
  using AccTimesA = tb::Sm80EVT<Compute<cutlass::multiplies, float>, tb::VisitorAccFetch,
                                PerRow<ThreadMap>>;
  using Tree = tb::Sm80EVT<Compute<cutlass::multiply_add, ElementD>, AccTimesA, PerCol<ThreadMap>,
                           PerCol<ThreadMap>>;
  using Callbacks = tb::Sm80EVT<StoreD<ThreadMap, ElementD>, Tree>;

  static typename Callbacks::Arguments arguments(const Int8GemmArgs& g) {
    const auto* a_scale = g.a_scale;
    const auto* b_scale = g.b_scale;
    const auto* bias = g.bias;
    typename AccTimesA::Arguments acc_a{{}, {a_scale, 0.0f, {}}, {}};
    typename Tree::Arguments tree{acc_a, {b_scale, 0.0f, {}}, {bias, 0.0f, {}}, {}};
    return {tree, {static_cast<ElementD*>(g.out), {g.ldd, Int<1>{}, Int<0>{}}}};
  }
};

// EVT of the weight-only epilogue: D = acc * b_scale[n] + bias[n].
template <typename ThreadMap, typename ElementD>
struct ChannelScaledEpilogue {
  using Tree = tb::Sm80EVT<Compute<cutlass::multiply_add, ElementD>, tb::VisitorAccFetch,
                           PerCol<ThreadMap>, PerCol<ThreadMap>>;
  using Callbacks = tb::Sm80EVT<StoreD<ThreadMap, ElementD>, Tree>;

  static typename Callbacks::Arguments arguments(const Int8GemmArgs& g) {
    const auto* b_scale = g.b_scale;
    const auto* bias = g.bias;
    typename Tree::Arguments tree{{}, {b_scale, 0.0f, {}}, {bias, 0.0f, {}}, {}};
    return {tree, {static_cast<ElementD*>(g.out), {g.ldd, Int<1>{}, Int<0>{}}}};
  }
};

// EVT of int8_mm: D = acc (int32, exact).
template <typename ThreadMap, typename ElementD>
struct IdentityEpilogue {
  using Callbacks = tb::Sm80EVT<StoreD<ThreadMap, ElementD>, tb::VisitorAccFetch>;

  static typename Callbacks::Arguments arguments(const Int8GemmArgs& g) {
    return {{}, {static_cast<ElementD*>(g.out), {g.ldd, Int<1>{}, Int<0>{}}}};
  }
};

// One GEMM's kernel: A (ElementA, row-major) x B (int8, column-major) -> D (ElementD,
// row-major), epilogue Epi, tile Tile. Operands are read in 16-byte vectors (K % (16 /
// sizeof(A)) == 0, the leading dimensions likewise, 16-byte aligned pointers: the glue sees to
// it) and D is written 4 elements at a time (N % 4 == 0).
template <typename ElementA, typename ElementD, template <class, class> class Epi, typename Tile>
struct GemmTypes {
  static constexpr bool kInt8 = std::is_same_v<ElementA, int8_t>;
  using ElementAcc = std::conditional_t<kInt8, int32_t, float>;
  using Instruction = std::conditional_t<kInt8, cutlass::gemm::GemmShape<16, 8, 32>,
                                         cutlass::gemm::GemmShape<16, 8, 16>>;
  using MathOp = std::conditional_t<kInt8, cutlass::arch::OpMultiplyAddSaturate,
                                    cutlass::arch::OpMultiplyAddMixedInputUpcast>;
  static constexpr int kAlignA = 16 / sizeof(ElementA);
  static constexpr int kAlignD = 4;
  using ThreadMap = tb::OutputTileThreadLayout<typename Tile::Threadblock, typename Tile::Warp,
                                               ElementD, kAlignD, 1>;
  using Epilogue = Epi<ThreadMap, ElementD>;
  // The C type below only shapes the default epilogue whose iterators the visitor tree
  // replaces (fp32 fragments of kAlignD); D's real type is the visitor store's.
  using Base = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementA, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignA, int8_t,
      cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, 16, float,
      cutlass::layout::RowMajor, kAlignD, ElementAcc, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, typename Tile::Threadblock, typename Tile::Warp, Instruction,
      typename Epilogue::Callbacks, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>,
      Tile::kStages, MathOp, 1>::GemmKernel;
};

// The kernel under a name that says what it is: cuobjdump and frugal.build_info report it as
// int8_gemm_sm80<ElementA, ElementD, Epilogue, Tile>. The W8A8 kernels leave sm_90a a stub.
template <typename ElementA, typename ElementD, template <class, class> class Epi, typename Tile>
struct int8_gemm_sm80
    : ArchGuard<typename GemmTypes<ElementA, ElementD, Epi, Tile>::Base,
                !std::is_same_v<ElementA, int8_t>> {};

template <typename ElementA, typename ElementD, template <class, class> class Epi, typename Tile>
struct Gemm {
  using Types = GemmTypes<ElementA, ElementD, Epi, Tile>;
  using Kernel = int8_gemm_sm80<ElementA, ElementD, Epi, Tile>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static cudaError_t run(const Int8GemmArgs& g, const Workspace& ws, cudaStream_t stream) {
    typename Device::Arguments args(
        cutlass::gemm::GemmUniversalMode::kGemm,
        {static_cast<int>(g.M), static_cast<int>(g.N), static_cast<int>(g.K)}, 1,
        Types::Epilogue::arguments(g), g.a, g.b, nullptr, nullptr, 0, 0, 0, 0, g.lda, g.ldb, 0,
        0);
    Device op;
    if (op.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
    const size_t bytes = op.get_workspace_size(args);
    void* workspace = bytes > 0 ? ws.alloc(ws.ctx, bytes) : nullptr;
    if (bytes > 0 && workspace == nullptr) return cudaErrorMemoryAllocation;
    const cutlass::Status s = op(args, workspace, stream);
    if (s != cutlass::Status::kSuccess) {
      const cudaError_t e = cudaGetLastError();
      return e != cudaSuccess ? e : cudaErrorLaunchFailure;
    }
    return cudaSuccess;
  }

  // Threads and dynamic shared memory of the kernel's launches.
  static KernelLaunchConfig config(const char* name) {
    return {name, Kernel::kThreadCount, static_cast<int>(sizeof(typename Kernel::SharedStorage))};
  }
};

// Runs the GEMM of Epi with the tile use_large_tile picks.
template <typename ElementA, typename ElementD, template <class, class> class Epi>
cudaError_t run_bucketed(const Int8GemmArgs& g, const Workspace& ws, cudaStream_t stream) {
  constexpr bool kInt8 = std::is_same_v<ElementA, int8_t>;
  using Small = std::conditional_t<kInt8, TileSmall, TileSmallWeightOnly>;
  using Large = std::conditional_t<kInt8, TileLarge, TileLargeWeightOnly>;
  if (!use_large_tile(g.M, g.N)) return Gemm<ElementA, ElementD, Epi, Small>::run(g, ws, stream);
  return Gemm<ElementA, ElementD, Epi, Large>::run(g, ws, stream);
}

}  // namespace frugal::cuda::sm80
