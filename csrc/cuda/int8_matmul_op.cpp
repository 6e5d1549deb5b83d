// Torch-facing glue of the CUTLASS int8 GEMMs (int8_matmul_sm80.cu, int8_matmul_sm90.cu,
// int8_matmul_weight_only.cu): frugal::int8_mm, int8_scaled_mm and int8_weight_only_mm on CUDA
// tensors. Checks, allocation, the device guard and current stream, the operand copies the
// kernels' 16-byte vector accesses need, and the choice of kernel family by the device:
//   compute capability 9.0 with an sm_90a build: CUTLASS 3.x (wgmma) for W8A8;
//   any other capability >= 8.0: CUTLASS 2.x (mma.sync; the sm_80 cubin on 8.x, the compute_80
//   PTX, JIT-compiled once by the driver, on newer GPUs). The weight-only GEMM is 2.x everywhere.
// The tile is chosen by M inside the launchers (a small-M tile for decode, a large one above
// M = 64).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <optional>
#include <vector>

#include "cuda/launch.h"

namespace frugal::cuda {

// Defined by the kernel translation units (not in launch.h: only this file picks between
// them); int8_matmul_sm90.cu is built when the targets include sm_90a (FRUGAL_SM90A).
cudaError_t launch_int8_gemm_sm80_w8a8(const Int8GemmArgs& args, const Workspace& ws,
                                       cudaStream_t stream);
cudaError_t launch_int8_gemm_weight_only(const Int8GemmArgs& args, const Workspace& ws,
                                         cudaStream_t stream);
const KernelLaunchConfig* int8_gemm_sm80_w8a8_configs();
const KernelLaunchConfig* int8_gemm_weight_only_configs();
#if defined(FRUGAL_SM90A)
const KernelLaunchConfig* int8_gemm_sm90_configs();
#endif

const KernelLaunchConfig* int8_gemm_kernel_configs() {
  static const std::vector<KernelLaunchConfig> rows = [] {
    std::vector<KernelLaunchConfig> all;
    for (const KernelLaunchConfig* table : {int8_gemm_sm80_w8a8_configs(),
#if defined(FRUGAL_SM90A)
                                            int8_gemm_sm90_configs(),
#endif
                                            int8_gemm_weight_only_configs()}) {
      for (const KernelLaunchConfig* c = table; c->kernel != nullptr; ++c) all.push_back(*c);
    }
    all.push_back({nullptr, 0, 0});
    return all;
  }();
  return rows.data();
}

namespace {

// Compute capability (10 * major + minor) per device, read once.
int capability(const at::Device& device) {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = device.index();
  int cc = dev >= 0 && dev < 64 ? cache[dev].load() : 0;
  if (cc == 0) {
    int major = 0, minor = 0;
    TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) ==
                        cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) ==
                        cudaSuccess,
                "int8 GEMM: cannot read the compute capability of cuda:", dev);
    cc = 10 * major + minor;
    if (dev >= 0 && dev < 64) cache[dev].store(cc);
  }
  return cc;
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": ", name,
              " must be a CUDA tensor on ", ref.device(), "; got ", t.device());
}

// A 2-D operand as the kernels read it: unit stride along K, a leading dimension that keeps
// every row 16-byte aligned, a 16-byte aligned start; a copy when it is not so already.
at::Tensor operand(const at::Tensor& t) {
  const int64_t elems = 16 / t.element_size();
  const bool ok = t.stride(1) == 1 && t.stride(0) % elems == 0 && t.stride(0) >= t.size(1) &&
                  reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// An fp32 vector of n values from a tensor of n values or one (broadcast), contiguous.
at::Tensor fp32_vector(const at::Tensor& t, int64_t n) {
  at::Tensor f = t.reshape({-1}).to(at::kFloat);
  if (f.numel() == 1 && n != 1) f = f.expand({n});
  return f.contiguous();
}

// A (a_dtype) [M, K] x B int8 [N, K]: the shared checks.
void check_mm(const char* op, const char* a_name, const at::Tensor& a, const at::Tensor& b) {
  check_cuda(op, a_name, a, a);
  check_cuda(op, "b", b, a);
  TORCH_CHECK(a.dim() == 2, op, ": ", a_name, " must be 2-D [M, K]; got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kChar, op,
              ": b must be int8 [N, K]; got ", b.scalar_type(), " of shape ", b.sizes());
  TORCH_CHECK(b.size(1) == a.size(1), op, ": b.shape[1] (K) must equal ", a_name,
              ".shape[1] = ", a.size(1), "; got ", b.size(1));
  TORCH_CHECK(a.size(1) % 16 == 0 && b.size(0) % 8 == 0, op,
              ": the CUDA (CUTLASS) kernels need K a multiple of 16 and N a multiple of 8; got K=",
              a.size(1), ", N=", b.size(0));
  TORCH_CHECK(a.size(0) <= INT32_MAX && b.size(0) <= INT32_MAX && a.size(1) <= INT32_MAX, op,
              ": M, N and K must fit int32; got ", a.sizes(), " x ", b.sizes());
  TORCH_CHECK(capability(a.device()) >= 80, op,
              ": the CUDA (CUTLASS) kernels need compute capability 8.0 or newer; cuda:",
              a.device().index(), " has ", capability(a.device()) / 10, ".",
              capability(a.device()) % 10);
}

// b_scale (fp32, N values or 1) and the optional bias (any float dtype, N values).
void check_channel_vectors(const char* op, const at::Tensor& ref, const at::Tensor& b_scale,
                           const std::optional<at::Tensor>& bias, int64_t N) {
  check_cuda(op, "b_scale", b_scale, ref);
  TORCH_CHECK(b_scale.scalar_type() == at::kFloat && (b_scale.numel() == N || b_scale.numel() == 1),
              op, ": b_scale must be float32 with ", N, " values (one per column) or 1; got ",
              b_scale.scalar_type(), " of shape ", b_scale.sizes());
  if (bias.has_value()) {
    check_cuda(op, "bias", *bias, ref);
    TORCH_CHECK(bias->numel() == N && at::isFloatingType(bias->scalar_type()), op,
                ": bias must be a float tensor of ", N, " values; got ", bias->scalar_type(),
                " of shape ", bias->sizes());
  }
}

DType out_dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kInt32;
  }
}

// Runs the GEMM into out; workspace memory comes from torch's caching allocator on the current
// stream (kept until the kernel is enqueued: the allocator orders reuse after it).
void run(const char* op, Int8GemmArgs& g, const at::Tensor& a, const at::Tensor& b,
         const at::Tensor& out, bool weight_only) {
  g.a = a.const_data_ptr();
  g.lda = a.stride(0);
  g.b = b.const_data_ptr<int8_t>();
  g.ldb = b.stride(0);
  g.out = out.data_ptr();
  g.ldd = out.stride(0);
  g.M = a.size(0);
  g.N = b.size(0);
  g.K = a.size(1);
  struct Scratch {
    at::TensorOptions options;
    at::Tensor buffer;
  } scratch{a.options().dtype(at::kByte), {}};
  const Workspace ws{[](void* ctx, size_t bytes) -> void* {
                       auto* s = static_cast<Scratch*>(ctx);
                       s->buffer = at::empty({static_cast<int64_t>(bytes)}, s->options);
                       return s->buffer.data_ptr();
                     },
                     &scratch};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  cudaError_t err;
  if (weight_only) {
    err = launch_int8_gemm_weight_only(g, ws, stream);
  } else {
#if defined(FRUGAL_SM90A)
    err = capability(a.device()) == 90 ? launch_int8_gemm_sm90(g, ws, stream)
                                       : launch_int8_gemm_sm80_w8a8(g, ws, stream);
#else
    err = launch_int8_gemm_sm80_w8a8(g, ws, stream);
#endif
  }
  TORCH_CHECK(err == cudaSuccess, op, ": CUTLASS launch failed: ", cudaGetErrorString(err));
}

at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "int8_mm";
  TORCH_CHECK(a.scalar_type() == at::kChar, op, ": a must be int8; got ", a.scalar_type());
  check_mm(op, "a", a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0 || b.size(0) == 0 || a.size(1) == 0) {
    return at::zeros({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  }
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  Int8GemmArgs g{};
  g.a_dtype = DType::kInt8;
  g.out_dtype = DType::kInt32;
  run(op, g, operand(a), operand(b), out, false);
  return out;
}

at::Tensor int8_scaled_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                               const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                               at::ScalarType out_dtype) {
  constexpr const char* op = "int8_scaled_mm";
  TORCH_CHECK(a.scalar_type() == at::kChar, op, ": a must be int8; got ", a.scalar_type());
  check_mm(op, "a", a, b);
  const int64_t M = a.size(0), N = b.size(0);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16; got ", out_dtype);
  check_cuda(op, "a_scale", a_scale, a);
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && (a_scale.numel() == M || a_scale.numel() == 1),
              op, ": a_scale must be float32 with ", M, " values (one per row) or 1; got ",
              a_scale.scalar_type(), " of shape ", a_scale.sizes());
  check_channel_vectors(op, a, b_scale, bias, N);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const at::Tensor sa = fp32_vector(a_scale, M), sb = fp32_vector(b_scale, N);
  const at::Tensor bias32 = bias.has_value() ? fp32_vector(*bias, N) : at::Tensor();
  if (a.size(1) == 0) {  // no products: the epilogue of zeros is the bias
    return bias.has_value() ? bias32.expand({M, N}).to(out_dtype).contiguous() : out.zero_();
  }
  Int8GemmArgs g{};
  g.a_dtype = DType::kInt8;
  g.out_dtype = out_dtype_of(out_dtype);
  g.a_scale = sa.const_data_ptr<float>();
  g.b_scale = sb.const_data_ptr<float>();
  g.bias = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
  run(op, g, operand(a), operand(b), out, false);
  return out;
}

at::Tensor int8_weight_only_mm_cuda(const at::Tensor& x, const at::Tensor& b,
                                    const at::Tensor& b_scale,
                                    const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "int8_weight_only_mm";
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": the CUDA (CUTLASS) kernel takes float16 or bfloat16 x; got ", x.scalar_type());
  check_mm(op, "x", x, b);
  const int64_t M = x.size(0), N = b.size(0);
  check_channel_vectors(op, x, b_scale, bias, N);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor sb = fp32_vector(b_scale, N);
  const at::Tensor bias32 = bias.has_value() ? fp32_vector(*bias, N) : at::Tensor();
  if (x.size(1) == 0) {
    return bias.has_value() ? bias32.expand({M, N}).to(x.scalar_type()).contiguous() : out.zero_();
  }
  Int8GemmArgs g{};
  g.a_dtype = out_dtype_of(x.scalar_type());
  g.out_dtype = g.a_dtype;
  g.b_scale = sb.const_data_ptr<float>();
  g.bias = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
  run(op, g, operand(x), operand(b), out, true);
  return out;
}

}  // namespace
}  // namespace frugal::cuda

TORCH_LIBRARY_IMPL(frugal, CUDA, m) {
  m.impl("int8_mm", &frugal::cuda::int8_mm_cuda);
  m.impl("int8_scaled_mm", &frugal::cuda::int8_scaled_mm_cuda);
  m.impl("int8_weight_only_mm", &frugal::cuda::int8_weight_only_mm_cuda);
}
