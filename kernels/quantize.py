"""Per-token (per-row) symmetric int8 quantization.

scale = absmax(row) / 127 and q = round_half_to_even(x / scale) clamped to [-127, 127], with
IEEE division, so the result is bit-identical to the PyTorch reference and the C++/CUDA kernels.
A row of zeros gives scale 0 and zeros; a row holding inf or NaN gives scale NaN and zeros.
"""

import torch
import triton
import triton.language as tl

from . import _launch, configs
from ._common import FLT_MAX, round_half_even

_MIN_BLOCK_K = 128


# K and stride_xm are not specialized (K = 1 would be a variant of its own for every other
# choice); ALIGNED states their divisibility by 16 instead, for vector loads and stores.
@triton.jit(do_not_specialize=["K", "stride_xm"])
def _quantize_per_token_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_xm,
    BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    if ALIGNED:
        K = K // 16 * 16
        stride_xm = stride_xm // 16 * 16
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * K
    offs = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.abs(x)
        bad = (~(amax <= FLT_MAX)).to(tl.int32)  # inf or NaN
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        bad = tl.zeros([BLOCK_K], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.abs(tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32))
            bad |= (~(a <= FLT_MAX)).to(tl.int32)
            amax = tl.maximum(amax, a)
    is_bad = tl.max(bad, axis=0) != 0
    scale = tl.div_rn(tl.max(amax, axis=0), 127.0)
    tl.store(s_ptr + row, tl.where(is_bad, float("nan"), scale))
    zero = is_bad | (scale == 0.0)
    divisor = tl.where(zero, 1.0, scale)
    if ONE_BLOCK:
        r = tl.minimum(tl.maximum(tl.div_rn(x, divisor), -127.0), 127.0)
        q = tl.where(zero, 0.0, round_half_even(r)).to(tl.int8)
        tl.store(q_row + offs, q, mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            m = k0 + offs < K
            x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
            r = tl.minimum(tl.maximum(tl.div_rn(x, divisor), -127.0), 127.0)
            q = tl.where(zero, 0.0, round_half_even(r)).to(tl.int8)
            tl.store(q_row + k0 + offs, q, mask=m)


# frugal check: {kernel: (label, tensor cores expected for these pointer dtypes)}
CHECK_KERNELS = {"_quantize_per_token_kernel": ("quantize_per_token", lambda dtypes: False)}


def pick_config(K, device):
    return configs.pick("quantize_per_token", "K", K, _launch.device_key(device))


def quantize_per_token(x, *, config=None):
    """x [..., K] float32/float16/bfloat16 -> (q int8 [..., K], scale float32 [...]).
    ``config`` overrides the picked launch config (tests, tuning)."""
    K = x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    M = scale.numel()
    if M == 0:
        return q, scale
    if K == 0:
        return q, scale.zero_()
    x2 = x.reshape(M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    cfg = config or pick_config(K, x.device)
    # Short rows take a smaller block, but not below _MIN_BLOCK_K: every power of two down to 1
    # would be a compiled variant of its own, for rows that cost nothing either way.
    block_k = min(cfg["BLOCK_K"], max(_MIN_BLOCK_K, triton.next_power_of_2(K)))
    _launch.launch(_quantize_per_token_kernel, (M,), x.device)(
        x2, q, scale, K, x2.stride(0),
        BLOCK_K=block_k, ONE_BLOCK=K <= block_k,
        ALIGNED=K % 16 == 0 and (M == 1 or x2.stride(0) % 16 == 0), num_warps=cfg["num_warps"],
    )
    return q, scale
