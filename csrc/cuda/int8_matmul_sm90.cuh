// CUTLASS 3.x W8A8 GEMMs for sm_90a: TMA loads, wgmma (int8 x int8 -> int32), warp-specialized
// persistent kernels, and the epilogue as an sm90 epilogue visitor tree (EVT) that scales the
// accumulators and adds the bias before the TMA store (vLLM's cutlass_scaled_mm on sm_90 has
// the same structure; no code is shared with it).
//
//   int8_mm:        D (int32) = acc, through an int32 identity node (an fp32 epilogue would
//                   round accumulators above 2**24);
//   int8_scaled_mm: D = (acc * a_scale[m]) * b_scale[n] + bias[n] in fp32, rounded once to
//                   fp16 / bf16 / fp32 (a null bias reads as 0).
//
// Only included by int8_matmul_sm90.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cuda/int8_matmul_outputs.h"
#include "cuda/launch.h"

namespace frugal::cuda::sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// Keeps the kernel's device code out of every target but sm_90a (its wgmma / TMA instructions
// exist only there; CUTLASS's own fallback body would print from the device, which needs a
// stack frame). The stub left on sm_80 is never launched.
template <typename Kernel>
struct OnlySm90a : Kernel {
  template <typename... Args>
  CUTLASS_DEVICE void operator()(Args&&... args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    Kernel::operator()(static_cast<Args&&>(args)...);
#endif
  }
};

// The two tiles (wgmma's M is 64 per warpgroup, so 64 rows is the smallest; use_large_tile in
// int8_matmul_outputs.h picks one).
struct TileSmall {  // one producer and one consumer warpgroup, a K-deep (256) stage so that few
                    // CTAs keep many weight bytes in flight; a cluster of 2 along N shares
                    // (multicasts) the A tile
  using Shape = cute::Shape<_64, _64, _256>;
  using Cluster = cute::Shape<_1, _2, _1>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecialized;
  using EpiSchedule = cutlass::epilogue::TmaWarpSpecialized;
};
struct TileLarge {  // two consumer warpgroups share each 128 x 128 tile (64 rows each),
                    // persistent, a cluster of 2 along M shares the B tile. Rejected: the
                    // ping-pong schedule (a warpgroup per tile, its epilogue overlapping the
                    // other's mainloop), which spilled 12 bytes under ptxas's 168-register
                    // budget with this epilogue
  using Shape = cute::Shape<_128, _128, _128>;
  using Cluster = cute::Shape<_2, _1, _1>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpiSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
};

template <typename TileShape, typename ElementD>
struct ScaledEpilogue {
  using PerRow = fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using PerCol = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  template <template <class> class Fn, typename Out>
  using Compute = fusion::Sm90Compute<Fn, Out, float, cutlass::FloatRoundStyle::round_to_nearest>;
  using AccTimesA = fusion::Sm90EVT<Compute<cutlass::multiplies, float>, fusion::Sm90AccFetch,
                                    PerRow>;
  using Tree = fusion::Sm90EVT<Compute<cutlass::multiply_add, ElementD>, AccTimesA, PerCol, PerCol>;

  static typename Tree::Arguments arguments(const Int8GemmArgs& g) {
    typename AccTimesA::Arguments acc_a{{}, {g.a_scale, 0.0f, {}}, {}};
    return {acc_a, {g.b_scale, 0.0f, {}}, {g.bias, 0.0f, {}}, {}};
  }
};

template <typename TileShape, typename ElementD>
struct IdentityEpilogue {
  using Copy = fusion::Sm90Compute<cutlass::epilogue::thread::Identity, int32_t, int32_t,
                                   cutlass::FloatRoundStyle::round_to_nearest>;
  using Tree = fusion::Sm90EVT<Copy, fusion::Sm90AccFetch>;

  static typename Tree::Arguments arguments(const Int8GemmArgs&) { return {{}, {}}; }
};

template <typename ElementD, template <class, class> class Epi, typename Tile>
struct GemmTypes {
  using Epilogue = Epi<typename Tile::Shape, ElementD>;
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Tile::Shape,
      typename Tile::Cluster, cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, cutlass::layout::RowMajor, kAlignD, ElementD, cutlass::layout::RowMajor, kAlignD,
      typename Tile::EpiSchedule, typename Epilogue::Tree>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16,
      int8_t, cutlass::layout::ColumnMajor, 16, int32_t, typename Tile::Shape,
      typename Tile::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Tile::Schedule>::CollectiveOp;
  using Base = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>,
                                                    CollectiveMainloop, CollectiveEpilogue>;
};

// The kernel under a name that says what it is: cuobjdump and frugal.build_info report it as
// int8_gemm_sm90<ElementD, Epilogue, Tile>.
template <typename ElementD, template <class, class> class Epi, typename Tile>
struct int8_gemm_sm90 : OnlySm90a<typename GemmTypes<ElementD, Epi, Tile>::Base> {};

template <typename ElementD, template <class, class> class Epi, typename Tile>
struct Gemm {
  using Types = GemmTypes<ElementD, Epi, Tile>;
  using Epilogue = typename Types::Epilogue;
  using Base = typename Types::Base;
  using Kernel = int8_gemm_sm90<ElementD, Epi, Tile>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static cudaError_t run(const Int8GemmArgs& g, const Workspace& ws, cudaStream_t stream) {
    using StrideA = typename Base::StrideA;
    using StrideB = typename Base::StrideB;
    using StrideD = typename Base::StrideD;
    const int M = static_cast<int>(g.M), N = static_cast<int>(g.N), K = static_cast<int>(g.K);
    // (leading dimension, unit stride, batch stride) of row-major A and D and of B [N, K].
    const StrideA sa{g.lda, Int<1>{}, int64_t{0}};
    const StrideB sb{g.ldb, Int<1>{}, int64_t{0}};
    const StrideD sd{g.ldd, Int<1>{}, int64_t{0}};
    typename Device::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<const int8_t*>(g.a), sa, g.b, sb},
        {Epilogue::arguments(g), nullptr, sd, static_cast<ElementD*>(g.out), sd}};
    Device op;
    if (op.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
    const size_t bytes = Device::get_workspace_size(args);
    void* workspace = bytes > 0 ? ws.alloc(ws.ctx, bytes) : nullptr;
    if (bytes > 0 && workspace == nullptr) return cudaErrorMemoryAllocation;
    const cutlass::Status s = op.run(args, workspace, stream);
    if (s != cutlass::Status::kSuccess) {
      const cudaError_t e = cudaGetLastError();
      return e != cudaSuccess ? e : cudaErrorLaunchFailure;
    }
    return cudaSuccess;
  }

  static KernelLaunchConfig config(const char* name) {
    return {name, static_cast<int>(Base::MaxThreadsPerBlock),
            static_cast<int>(Base::SharedStorageSize)};
  }
};

}  // namespace frugal::cuda::sm90
