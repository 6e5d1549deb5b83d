"""Block-sparse attention: :func:`sparse_attention` over a :class:`frugal.BlockMask`.

Backends: Triton on CUDA tensors (``frugal.kernels.sparse_attention``: flash-attention-2 style
forward and backward that visit only the mask's blocks), the C++ CPU kernels on CPU tensors
(``csrc/cpu/sparse_attention.cpp``), and PyTorch (dense masked attention: O(N^2) memory, the
reference). Gradients flow through every backend via autograd (with respect to q, k and v).
Every backend takes the score modifiers of :mod:`frugal.score_mods` (softcap, ALiBi).
"""

from typing import List, Optional, Tuple

import torch

from . import _ext, reference
from .block_mask import BlockMask, SparseLayout
from .dispatch import triton_custom_op
from .errors import ShapeError, check_dtype, check_same_device, check_scale
from .registry import Op, cpp_kernel
from .score_mods import check_alibi_slopes, check_softcap

__all__ = ["sparse_attention", "HEAD_DIMS"]

HEAD_DIMS = tuple(range(8, 257, 8))  # every multiple of 8 up to 256 (FlashAttention's rule)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_OP = "sparse_attention"


def _has_cpu_ops():
    return _ext.ext() is not None and hasattr(torch.ops.frugal, "sparse_attention_fwd")


# --------------------------------------------------------------------------- custom ops


@triton_custom_op("frugal::sparse_attention_fwd_triton")
def _fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: List[torch.Tensor],
                layout_ints: List[int], scale: float, softcap: float,
                alibi_slopes: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    from frugal.kernels import sparse_attention as kernel

    lay = SparseLayout.from_op_args(q.shape[2], k.shape[2], layout, layout_ints)
    return kernel.forward(q, k, v, lay, scale, softcap, alibi_slopes)


@_fwd_triton.register_fake
def _(q, k, v, *args):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@triton_custom_op("frugal::sparse_attention_bwd_triton")
def _bwd_triton(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor, lse: torch.Tensor, layout: List[torch.Tensor],
                layout_ints: List[int], scale: float, softcap: float,
                alibi_slopes: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from frugal.kernels import sparse_attention as kernel

    lay = SparseLayout.from_op_args(q.shape[2], k.shape[2], layout, layout_ints)
    return kernel.backward(dout, q, k, v, out, lse, lay, scale, softcap, alibi_slopes)


@_bwd_triton.register_fake
def _(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


if _has_cpu_ops():

    @torch.library.register_fake("frugal::sparse_attention_fwd")
    def _fwd_cpu_fake(q, k, v, *args):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("frugal::sparse_attention_bwd")
    def _bwd_cpu_fake(dout, q, k, v, *args):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _cpp_fwd(q, k, v, *args):
    """frugal::sparse_attention_fwd: the C++ CPU kernel on CPU tensors, the CUDA C++ one on
    CUDA tensors (the dispatcher picks by device)."""
    return torch.ops.frugal.sparse_attention_fwd(q, k, v, *args)


def _cpu_bwd(*args):
    return torch.ops.frugal.sparse_attention_bwd(*args)


# The forward and backward kernels of each autograd backend. "cuda": frugal::sparse_attention_fwd
# dispatches CUDA tensors to its CUDA C++ kernel (csrc/cuda/sparse_attention.cu); the backward
# is Triton's, which reads the same (out, lse).
_KERNELS = {"triton": (_fwd_triton, _bwd_triton), "cpu": (_cpp_fwd, _cpu_bwd),
            "cuda": (_cpp_fwd, _bwd_triton)}


class _SparseAttention(torch.autograd.Function):
    # softcap: a float, 0.0 meaning none; alibi: None or contiguous fp32 [B, Hq] slopes, which
    # get no gradient (frugal.score_mods).
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, softcap, alibi, backend):
        out, lse = _KERNELS[backend][0](q, k, v, *layout.op_args(), scale, softcap, alibi)
        ctx.save_for_backward(q, k, v, out, lse, alibi)
        ctx.layout, ctx.scale, ctx.softcap, ctx.backend = layout, scale, softcap, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, alibi = ctx.saved_tensors
        dq, dk, dv = _KERNELS[ctx.backend][1](dout.contiguous(), q, k, v, out, lse,
                                              *ctx.layout.op_args(), ctx.scale, ctx.softcap,
                                              alibi)
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------- public API


def _check(q, k, v, mask, scale, softcap, alibi_slopes):
    """Validates a call -> (softcap as a float, 0.0 for none; alibi_slopes as contiguous fp32
    [B, Hq] or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(_OP, name, t, _FLOATS)
        if t.dim() != 4:
            raise ShapeError(f"{_OP}: {name} must be 4-d [batch, heads, tokens, head_dim]; got "
                             f"shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        from .errors import DTypeError

        raise DTypeError(f"{_OP}: q, k and v must have the same dtype; got {q.dtype}, "
                         f"{k.dtype} and {v.dtype}")
    check_same_device(_OP, q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ShapeError(f"{_OP}: k and v must have the same shape [B, Hkv, Nk, D]; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    B, hq, nq, d = q.shape
    if k.shape[0] != B:
        raise ShapeError(f"{_OP}: q and k must have the same batch size; got {B} and "
                         f"{k.shape[0]}")
    if k.shape[3] != d:
        raise ShapeError(f"{_OP}: q and k must have the same head_dim; got {d} and "
                         f"{k.shape[3]}")
    if d not in HEAD_DIMS:
        raise ShapeError(f"{_OP}: head_dim must be a multiple of 8 in [8, 256]; got {d}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ShapeError(f"{_OP}: the number of q heads must be a multiple of the number of k/v "
                         f"heads (GQA); got Hq={hq} and Hkv={hkv}")
    if not isinstance(mask, BlockMask):
        raise TypeError(f"{_OP}: mask must be a frugal.BlockMask (see frugal.masks); got "
                        f"{type(mask).__name__}")
    if mask.seq_lens != (nq, k.shape[2]):
        raise ShapeError(f"{_OP}: mask was built for (Nq, Nk) = {mask.seq_lens}; q and k have "
                         f"Nq={nq}, Nk={k.shape[2]}")
    bm, hm = mask.shape[:2]
    if bm not in (1, B):
        raise ShapeError(f"{_OP}: mask batch dim must be 1 or B={B}; got {bm}")
    if hm not in (1, hq):
        raise ShapeError(f"{_OP}: mask head dim must be 1 or Hq={hq}; got {hm}")
    check_scale(_OP, scale)
    return (check_softcap(_OP, softcap),
            check_alibi_slopes(_OP, alibi_slopes, B, hq, q.device))


# CUDA C++ first on CUDA tensors: its device code runs in the suite through the host emulation
# (ldmatrix and mma fragments included), the Triton kernels' in the interpreter (README).
SPARSE_ATTENTION = Op("sparse_attention", order={"cuda": ("cuda", "triton", "torch"),
                                                 "cpu": ("cpu", "torch")})


def _kernel_run(backend):
    def run(q, k, v, mask, scale, softcap=0.0, alibi_slopes=None):
        layout = mask.layout(q.shape[0], q.shape[1], q.device)
        return _SparseAttention.apply(q, k, v, layout, scale, softcap, alibi_slopes, backend)

    return run


def _triton_why_not(q, *_):
    from frugal.kernels import sparse_attention as kernel

    return kernel.unsupported(q.dtype)


SPARSE_ATTENTION.implement("triton", why_not=_triton_why_not)(_kernel_run("triton"))
def _cuda_why_not(q, *_):
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel takes float16 or bfloat16; got {q.dtype}"
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        return ("the CUDA kernel needs compute capability 8.0 or newer (mma.sync m16n8k16, "
                "cp.async); got {}.{}".format(*torch.cuda.get_device_capability(q.device)))
    return None


SPARSE_ATTENTION.implement(
    "cuda", devices=("cuda",), requires=cpp_kernel("sparse_attention_fwd", "CUDA"),
    why_not=_cuda_why_not)(_kernel_run("cuda"))
SPARSE_ATTENTION.implement("cpu", devices=("cpu",),
                           requires=cpp_kernel("sparse_attention_fwd", "CPU"))(_kernel_run("cpu"))


@SPARSE_ATTENTION.implement("torch")
def _sparse_torch(q, k, v, mask, scale, softcap=0.0, alibi_slopes=None):
    # fp32 scores for half inputs, as the kernels keep them: fp16 scores overflow to inf (NaN
    # rows) at scales the kernels handle.
    up = (lambda t: t.float()) if q.dtype in (torch.float16, torch.bfloat16) else (lambda t: t)
    out, lse = reference.sparse_attention(up(q), up(k), up(v), mask, scale,
                                          softcap=softcap or None, alibi_slopes=alibi_slopes)
    return out.to(q.dtype), lse


def _scale(q, scale):
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def _prepare(q, k, v, mask, scale, softcap, alibi_slopes, backend, explain=False):
    """(impl, the run's arguments after q, k, v, mask: scale, softcap, slopes)."""
    cap, slopes = _check(q, k, v, mask, scale, softcap, alibi_slopes)
    args = (_scale(q, scale), cap, None if slopes is None else slopes.detach())
    return SPARSE_ATTENTION.select(q.device, backend, q, k, v, mask, *args, explain=explain), args


def _select(q, k, v, mask, scale=None, return_lse=False, *, softcap=None, alibi_slopes=None,
            backend="auto", explain=False):
    return _prepare(q, k, v, mask, scale, softcap, alibi_slopes, backend, explain)[0]


def sparse_attention(q, k, v, mask, scale=None, return_lse=False, *, softcap=None,
                     alibi_slopes=None, backend="auto"):
    """Attention that computes only the blocks ``mask`` lists.

    Parameters
    ----------
    q : Tensor [B, Hq, Nq, D]; k, v : Tensor [B, Hkv, Nk, D]
        Same dtype (float32, float16 or bfloat16) and device, any strides. Hq must be a
        multiple of Hkv (GQA/MQA: query head h reads kv head ``h // (Hq // Hkv)``); D a
        multiple of 8 up to 256 (:data:`HEAD_DIMS`).
    mask : BlockMask
        Built for (Nq, Nk) (see :mod:`frugal.masks`); its batch and head dims are 1 or B, Hq.
    scale : float, default ``D ** -0.5``
    return_lse : bool
        Also return the log-sum-exp of each row's scores, modifiers applied (float32
        [B, Hq, Nq]; no gradient flows through it).
    softcap : float > 0, optional
        Caps the scaled scores: ``s = softcap * tanh(s / softcap)`` (Gemma-2), before ALiBi and
        the mask; the backward scales dS by ``1 - tanh**2``.
    alibi_slopes : Tensor float32 [Hq] or [B, Hq], optional
        ALiBi: ``s -= slope[b, h] * |q_pos - k_pos|`` with query i at position ``i + Nk - Nq``
        and key j at j (bottom-right, as the causal masks); on q's device; no gradient. The
        rules are those of :mod:`frugal.score_mods`.
    backend : "auto" | "cuda" | "triton" | "cpu" | "torch"
        auto: CUDA C++ (fp16 / bf16; the backward runs Triton), then Triton on CUDA tensors, C++
        on CPU tensors, else PyTorch (dense: O(N^2) memory).

    Returns
    -------
    out [B, Hq, Nq, D] in q's dtype, and lse when ``return_lse``. A query row that the mask
    gives no key returns zeros (and lse = -inf), never NaN; it gets zero gradient.
    """
    impl, args = _prepare(q, k, v, mask, scale, softcap, alibi_slopes, backend)
    if q.shape[0] == 0 or q.shape[1] == 0:
        out = q.new_zeros(q.shape)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    else:
        out, lse = impl.run(q, k, v, mask, *args)
    return (out, lse) if return_lse else out


sparse_attention._frugal_select = _select
