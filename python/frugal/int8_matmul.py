"""W8A8 int8 matmul with a fused dequant/bias epilogue, weight-only int8 matmul, and
per-channel weight quantization: public functions, custom ops and fake kernels.

Layouts follow nn.Linear: the weight ``bq`` is int8 [N, K]; activations are [..., K] with any
leading dims (flattened). Accumulation is in int32 and exact for K <= 131071
(``INT8_MAX_K``: 128 * 128 * K < 2**31 for every int8 input); larger K is refused.
"""

import math
from typing import Optional

import torch

from . import _ext, reference
from .dispatch import triton_custom_op
from .errors import (
    DeviceError,
    ShapeError,
    check_dtype,
    check_dtype_arg,
    check_min_dim,
    check_tensor,
)
from .quantize import quantize_per_token
from .registry import Op, cpp_kernel

INT8_MAX_K = reference.INT8_MAX_K
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

if _ext.ext() is not None:

    @torch.library.register_fake("frugal::int8_mm")
    def _int8_mm_fake(a, b):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)

    @torch.library.register_fake("frugal::int8_scaled_mm")
    def _int8_scaled_mm_fake(a, b, a_scale, b_scale, bias, out_dtype):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("frugal::int8_pack_weight")
    def _int8_pack_weight_fake(b):
        # Header (64 bytes), int32 column compensation, then [Npad / 16 ...][ceil(K / 4)][4].
        n_pad, k4 = -(-b.shape[0] // 16) * 16, -(-b.shape[1] // 4)
        return b.new_empty((64 + 4 * n_pad + 4 * n_pad * k4,), dtype=torch.int8)

    @torch.library.register_fake("frugal::int8_scaled_mm_packed")
    def _int8_scaled_mm_packed_fake(a, b_packed, a_scale, b_scale, bias, out_dtype):
        return a.new_empty((a.shape[0], b_scale.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("frugal::int8_dynamic_linear_packed")
    def _int8_dynamic_linear_packed_fake(x, b_packed, b_scale, bias):
        return x.new_empty((x.shape[0], b_scale.shape[0]))

    @torch.library.register_fake("frugal::int8_weight_only_mm")
    def _int8_weight_only_mm_fake(x, b, b_scale, bias):
        return x.new_empty((x.shape[0], b.shape[0]))


@triton_custom_op("frugal::int8_mm_triton")
def _int8_mm_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from frugal.kernels import int8_matmul as kernel

    return kernel.int8_mm(a, b)


@_int8_mm_triton.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@triton_custom_op("frugal::int8_scaled_mm_triton")
def _int8_scaled_mm_triton(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor,
                           b_scale: torch.Tensor, bias: Optional[torch.Tensor],
                           out_dtype: torch.dtype) -> torch.Tensor:
    from frugal.kernels import int8_matmul as kernel

    return kernel.int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype)


@_int8_scaled_mm_triton.register_fake
def _(a, b, a_scale, b_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@triton_custom_op("frugal::int8_weight_only_mm_triton")
def _int8_weight_only_mm_triton(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                                bias: Optional[torch.Tensor]) -> torch.Tensor:
    from frugal.kernels import int8_matmul as kernel

    return kernel.int8_weight_only_mm(x, b, b_scale, bias)


@_int8_weight_only_mm_triton.register_fake
def _(x, b, b_scale, bias):
    return x.new_empty((x.shape[0], b.shape[0]))


# The implementations, on 2-D operands (the public functions flatten and handle empty shapes).
# On CUDA tensors auto runs Triton before the CUTLASS kernels (csrc/cuda/int8_matmul_*.cu):
# those are only compile-checked here (no GPU, and CUTLASS cannot run in the host emulation),
# while the Triton kernels' arithmetic runs in the suite's interpreter; `frugal tune` checks and
# times both on the device, and its data then decides (README, "int8 GEMM on CUTLASS").
_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def _cutlass_why_not(a, b, x_dtypes=None):
    if x_dtypes is not None and a.dtype not in x_dtypes:
        return f"the CUTLASS kernel takes float16 or bfloat16 x; got {a.dtype}"
    if a.shape[1] % 16 or b.shape[0] % 8:
        return (f"the CUTLASS kernels need K a multiple of 16 and N a multiple of 8; got "
                f"K={a.shape[1]}, N={b.shape[0]}")
    cc = torch.cuda.get_device_capability(a.device)
    if cc < (8, 0):
        return f"the CUTLASS kernels need compute capability 8.0 or newer; got {cc[0]}.{cc[1]}"
    return None


INT8_MM = Op("int8_mm", order=_ORDER)
INT8_MM.implement("cpu", devices=("cpu",), requires=cpp_kernel("int8_mm", "CPU"))(
    lambda a, b: torch.ops.frugal.int8_mm(a, b))
INT8_MM.implement("triton")(lambda a, b: torch.ops.frugal.int8_mm_triton(a, b))
INT8_MM.implement("cuda", devices=("cuda",), requires=cpp_kernel("int8_mm", "CUDA"),
                  why_not=_cutlass_why_not)(lambda a, b: torch.ops.frugal.int8_mm(a, b))


def _int_mm(a, b):
    """a @ b^T exactly: torch._int_mm (oneDNN on CPUs, AMX where present; cuBLASLt on GPUs)
    where it takes the shapes, else the int64 reference. The "torch" backend: on some CPUs
    the fastest there is, and `frugal tune` finds out."""
    # CPU: K = 1 returns garbage in torch 2.14 (found by tests/test_fuzz.py). CUDA: its shape
    # rules.
    ok = a.shape[1] > 1 if a.device.type == "cpu" else (
        a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0)
    return torch._int_mm(a, b.t()) if ok else reference.int8_mm(a, b)


INT8_MM.implement("torch")(_int_mm)

INT8_MATMUL = Op("int8_matmul", order=_ORDER)
INT8_MATMUL.implement("cpu", devices=("cpu",), requires=cpp_kernel("int8_scaled_mm", "CPU"))(
    lambda *args: torch.ops.frugal.int8_scaled_mm(*args))
INT8_MATMUL.implement("triton")(lambda *args: torch.ops.frugal.int8_scaled_mm_triton(*args))
INT8_MATMUL.implement("cuda", devices=("cuda",), requires=cpp_kernel("int8_scaled_mm", "CUDA"),
                      why_not=lambda a, b, *_: _cutlass_why_not(a, b))(
    lambda *args: torch.ops.frugal.int8_scaled_mm(*args))


@INT8_MATMUL.implement("torch")
def _int8_scaled_mm_torch(a, b, a_scale, b_scale, bias, out_dtype):
    # The reference's epilogue (fp32, in its order) over torch._int_mm's exact product.
    y = _int_mm(a, b).float() * a_scale.float().reshape(-1, 1) * b_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


INT8_WEIGHT_ONLY = Op("int8_weight_only_matmul", order=_ORDER)
INT8_WEIGHT_ONLY.implement("cpu", devices=("cpu",),
                           requires=cpp_kernel("int8_weight_only_mm", "CPU"))(
    lambda *args: torch.ops.frugal.int8_weight_only_mm(*args))
INT8_WEIGHT_ONLY.implement("triton")(
    lambda *args: torch.ops.frugal.int8_weight_only_mm_triton(*args))
INT8_WEIGHT_ONLY.implement(
    "cuda", devices=("cuda",), requires=cpp_kernel("int8_weight_only_mm", "CUDA"),
    why_not=lambda x, b, *_: _cutlass_why_not(x, b, (torch.float16, torch.bfloat16)))(
    lambda *args: torch.ops.frugal.int8_weight_only_mm(*args))
INT8_WEIGHT_ONLY.implement("torch")(reference.int8_weight_only_mm)


def _rows(x):
    """x [..., K] as [M, K] (K = 0 included, where reshape(-1, 0) is ambiguous)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _check_weight(op, name, b, K, K_name):
    check_dtype(op, name, b, (torch.int8,))
    if b.dim() != 2:
        raise ShapeError(f"{op}: {name} must be 2-D [N, K] (nn.Linear layout); got a {b.dim()}-d "
                         f"tensor of shape {tuple(b.shape)}")
    if b.shape[1] != K:
        raise ShapeError(f"{op}: {name}.shape[1] (K) must equal {K_name} = {K}; got "
                         f"{b.shape[1]} ({name} has shape {tuple(b.shape)})")
    if K > INT8_MAX_K:
        raise ShapeError(f"{op}: K must be <= {INT8_MAX_K} so that int32 accumulation cannot "
                         f"overflow (128 * 128 * K < 2**31); got K={K}")


def _check_scale(op, name, scale, rows_shape, what):
    check_dtype(op, name, scale, (torch.float32,))
    if scale.numel() != 1 and tuple(scale.shape) != tuple(rows_shape):
        raise ShapeError(f"{op}: {name} must have shape {tuple(rows_shape)} ({what}) or hold a "
                         f"single value; got shape {tuple(scale.shape)}")


def _check_bias(op, bias, N):
    if bias is None:
        return
    check_dtype(op, "bias", bias, _FLOATS)
    if tuple(bias.shape) != (N,):
        raise ShapeError(f"{op}: bias must have shape ({N},) (N); got {tuple(bias.shape)}")


def _check_devices(op, **tensors):
    tensors = {k: v for k, v in tensors.items() if v is not None}
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise DeviceError(f"{op}: {name} must be on the same device as {first_name} "
                              f"({first.device}); got {t.device}")


def _check_mm(op, a, b):
    check_dtype(op, "a", a, (torch.int8,))
    if a.dim() != 2:
        raise ShapeError(f"{op}: a must be 2-D [M, K]; got a {a.dim()}-d tensor of shape "
                         f"{tuple(a.shape)}")
    _check_weight(op, "b", b, a.shape[1], "a.shape[1]")
    _check_devices(op, a=a, b=b)


def _select_int8_mm(a, b, *, backend="auto", explain=False):
    _check_mm("int8_mm", a, b)
    return INT8_MM.select(a.device, backend, a, b, explain=explain)


def int8_mm(a, b, *, backend="auto"):
    """Exact int8 GEMM in nn.Linear layout: ``a @ b.T`` with int32 accumulation.

    Parameters
    ----------
    a : Tensor [M, K] int8.
    b : Tensor [N, K] int8.
    backend : "auto" | "triton" | "cuda" | "cpu" | "torch"

    Returns
    -------
    Tensor [M, N] int32. K must be <= 131071 (no int8 input can overflow int32 then).
    """
    impl = _select_int8_mm(a, b, backend=backend)
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
        return torch.zeros((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    return impl.run(a, b)


int8_mm._frugal_select = _select_int8_mm


def _k_zero(lead, N, bias, dtype, device):
    """A matmul over K = 0: zeros (as int8_mm gives), plus the bias rounded as the epilogue
    rounds it."""
    y = torch.zeros((*lead, N), dtype=torch.float32, device=device)
    return (y if bias is None else y + bias.float()).to(dtype)


def _check_matmul(op, aq, bq, a_scale, b_scale, bias, out_dtype):
    check_dtype(op, "aq", aq, (torch.int8,))
    check_min_dim(op, "aq", aq, 1, "[..., K]")
    _check_weight(op, "bq", bq, aq.shape[-1], "aq.shape[-1]")
    _check_scale(op, "a_scale", a_scale, aq.shape[:-1], "aq.shape[:-1], one per token")
    _check_scale(op, "b_scale", b_scale, bq.shape[:1], "N, one per output channel")
    _check_bias(op, bias, bq.shape[0])
    check_dtype_arg(op, "out_dtype", out_dtype, _FLOATS)
    _check_devices(op, aq=aq, bq=bq, a_scale=a_scale, b_scale=b_scale, bias=bias)


def _select_int8_matmul(aq, bq, a_scale, b_scale, bias=None, out_dtype=torch.float16, *,
                        backend="auto", explain=False):
    _check_matmul("int8_matmul", aq, bq, a_scale, b_scale, bias, out_dtype)
    return INT8_MATMUL.select(aq.device, backend, _rows(aq), bq,
                              a_scale.reshape(-1), b_scale.reshape(-1), bias, out_dtype,
                              explain=explain)


def int8_matmul(aq, bq, a_scale, b_scale, bias=None, out_dtype=torch.float16, *,
                backend="auto"):
    """W8A8 matmul with the dequantization and bias fused into the GEMM's epilogue:
    ``(aq @ bq.T) * a_scale[..., None] * b_scale + bias`` (int32 accumulation, fp32 epilogue).

    Parameters
    ----------
    aq : Tensor [..., K] int8 (leading dims are flattened), e.g. from quantize_per_token.
    bq : Tensor [N, K] int8, e.g. from quantize_per_channel.
    a_scale : Tensor float32 of shape aq.shape[:-1] (per token) or a single value.
    b_scale : Tensor float32 [N] (per output channel) or a single value.
    bias : Tensor [N] float32/float16/bfloat16, or None.
    out_dtype : float16 (default), bfloat16 or float32.
    backend : "auto" | "triton" | "cuda" | "cpu" | "torch"

    Returns
    -------
    Tensor [..., N] of out_dtype.
    """
    impl = _select_int8_matmul(aq, bq, a_scale, b_scale, bias, out_dtype, backend=backend)
    lead, K, N = aq.shape[:-1], aq.shape[-1], bq.shape[0]
    if K == 0:
        return _k_zero(lead, N, bias, out_dtype, aq.device)
    a2 = aq.reshape(-1, K)
    a_s = a_scale.reshape(-1)
    b_s = b_scale.reshape(-1)
    if a2.shape[0] == 0 or N == 0:
        return torch.empty((*lead, N), dtype=out_dtype, device=aq.device)
    return impl.run(a2, bq, a_s, b_s, bias, out_dtype).reshape(*lead, N)


int8_matmul._frugal_select = _select_int8_matmul


def _select_weight_only(x, bq, b_scale, bias=None, *, backend="auto", explain=False):
    op = "int8_weight_only_matmul"
    check_dtype(op, "x", x, _FLOATS)
    check_min_dim(op, "x", x, 1, "[..., K]")
    _check_weight(op, "bq", bq, x.shape[-1], "x.shape[-1]")
    _check_scale(op, "b_scale", b_scale, bq.shape[:1], "N, one per output channel")
    _check_bias(op, bias, bq.shape[0])
    _check_devices(op, x=x, bq=bq, b_scale=b_scale, bias=bias)
    return INT8_WEIGHT_ONLY.select(x.device, backend, _rows(x), bq, b_scale,
                                   bias, explain=explain)


def int8_weight_only_matmul(x, bq, b_scale, bias=None, *, backend="auto"):
    """Weight-only int8 matmul for decode: ``x @ (bq * b_scale[:, None]).T + bias`` in x's
    dtype; the int8 weight is converted in registers, so only 1 byte per weight is read.

    Parameters
    ----------
    x : Tensor [..., K] float32, float16 or bfloat16.
    bq : Tensor [N, K] int8; b_scale : Tensor float32 [N] or a single value.
    bias : Tensor [N] float, or None.
    backend : "auto" | "triton" | "cuda" | "cpu" | "torch"
    """
    impl = _select_weight_only(x, bq, b_scale, bias, backend=backend)
    lead, K, N = x.shape[:-1], x.shape[-1], bq.shape[0]
    if K == 0:
        return _k_zero(lead, N, bias, x.dtype, x.device)
    x2 = x.reshape(-1, K)
    b_s = b_scale.reshape(-1).expand(N).contiguous() if b_scale.numel() == 1 else b_scale
    if x2.shape[0] == 0 or N == 0:
        return torch.empty((*lead, N), dtype=x.dtype, device=x.device)
    return impl.run(x2, bq, b_s, bias).reshape(*lead, N)


int8_weight_only_matmul._frugal_select = _select_weight_only


def quantize_per_channel(w, *, backend="auto"):
    """Symmetric int8 quantization of a weight per output channel (row of nn.Linear's weight).

    Parameters
    ----------
    w : Tensor [N, K] float32, float16 or bfloat16.

    Returns
    -------
    (int8 [N, K], float32 [N]): the same rule as :func:`quantize_per_token` applied per row.
    """
    check_tensor("quantize_per_channel", "w", w)
    if w.dim() != 2:
        raise ShapeError(f"quantize_per_channel: w must be 2-D [N, K]; got a {w.dim()}-d tensor "
                         f"of shape {tuple(w.shape)}")
    return quantize_per_token(w, backend=backend)
