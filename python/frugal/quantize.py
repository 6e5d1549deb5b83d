"""Per-token int8 quantization: the public functions, their custom ops and fake kernels."""

import torch

from . import _ext, reference
from .dispatch import triton_custom_op
from .errors import ShapeError, check_dtype, check_dtype_arg, check_min_dim
from .registry import Op, cpp_kernel

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

if _ext.ext() is not None:

    @torch.library.register_fake("frugal::quantize_per_token")
    def _quantize_per_token_fake(x):
        return (x.new_empty(x.shape, dtype=torch.int8),
                x.new_empty(x.shape[:-1], dtype=torch.float32))


@triton_custom_op("frugal::quantize_per_token_triton")
def _quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from frugal.kernels import quantize as kernel

    return kernel.quantize_per_token(x)


@_quantize_per_token_triton.register_fake
def _quantize_per_token_triton_fake(x):
    # Explicit, so tracing never runs the kernel (the Triton interpreter would, on fake data).
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


QUANTIZE_PER_TOKEN = Op("quantize_per_token")


@QUANTIZE_PER_TOKEN.implement("cuda", devices=("cuda",),
                              requires=cpp_kernel("quantize_per_token", "CUDA"))
@QUANTIZE_PER_TOKEN.implement("cpu", devices=("cpu",),
                              requires=cpp_kernel("quantize_per_token", "CPU"))
def _quantize_cpp(x):
    return torch.ops.frugal.quantize_per_token(x)


@QUANTIZE_PER_TOKEN.implement("triton")
def _quantize_triton(x):
    return torch.ops.frugal.quantize_per_token_triton(x)


QUANTIZE_PER_TOKEN.implement("torch")(reference.quantize_per_token)


def _select_quantize(x, *, backend="auto", explain=False):
    check_dtype("quantize_per_token", "x", x, _FLOATS)
    check_min_dim("quantize_per_token", "x", x, 1, "[..., K]")
    return QUANTIZE_PER_TOKEN.select(x.device, backend, x, explain=explain)


def quantize_per_token(x, *, backend="auto"):
    """Symmetric int8 quantization of each row (token) over the last dim.

    Parameters
    ----------
    x : Tensor [..., K], float32, float16 or bfloat16, any strides.
    backend : "auto" | "triton" | "cuda" | "cpu" | "torch"

    Returns
    -------
    q : Tensor [..., K] int8, ``round_half_to_even(x / scale)`` clamped to [-127, 127].
    scale : Tensor [...] float32, ``absmax(row) / 127``.

    Every backend gives bit-identical results. A row of zeros (and K = 0) gives scale 0 and
    zeros. A row holding inf or NaN gives scale NaN and zeros, so ``dequantize`` returns NaN for
    that row instead of a silently wrong number. M = 0 gives empty results.
    """
    return _select_quantize(x, backend=backend).run(x)


quantize_per_token._frugal_select = _select_quantize


def _check_dequantize(q, scale, out_dtype):
    op = "dequantize"
    check_dtype(op, "q", q, (torch.int8,))
    check_dtype(op, "scale", scale, (torch.float32,))
    check_dtype_arg(op, "out_dtype", out_dtype, _FLOATS)
    check_min_dim(op, "q", q, 1, "[..., K]")
    if scale.dim() > 0 and tuple(scale.shape) != tuple(q.shape[:-1]):
        raise ShapeError(f"{op}: scale must have shape {tuple(q.shape[:-1])} (q.shape[:-1]) or be "
                         f"0-d; got {tuple(scale.shape)}")
    if scale.device != q.device:
        from .errors import DeviceError

        raise DeviceError(f"{op}: scale must be on q's device ({q.device}); got {scale.device}")


# One fused elementwise multiply: PyTorch (and torch.compile) already does it at bandwidth.
DEQUANTIZE = Op("dequantize")
DEQUANTIZE.implement("torch")(reference.dequantize)


def _select_dequantize(q, scale, out_dtype=torch.float32, *, backend="auto", explain=False):
    _check_dequantize(q, scale, out_dtype)
    return DEQUANTIZE.select(q.device, backend, q, scale, out_dtype, explain=explain)


def dequantize(q, scale, out_dtype=torch.float32, *, backend="auto"):
    """Inverse of :func:`quantize_per_token`: ``q * scale[..., None]`` in ``out_dtype``.

    Parameters
    ----------
    q : Tensor [..., K] int8.
    scale : Tensor [...] float32 (one scale per row) or a 0-d tensor (one for all).
    out_dtype : float32, float16 or bfloat16.
    backend : "auto" | "torch" (a single elementwise multiply; no custom kernel is needed).
    """
    return _select_dequantize(q, scale, out_dtype, backend=backend).run(q, scale, out_dtype)


dequantize._frugal_select = _select_dequantize
