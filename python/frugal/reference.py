"""Plain-PyTorch reference implementations: short, obviously correct, and the ``torch``
backend of every op. Imports nothing of frugal's."""

import torch


def quantize_per_token(x):
    """x [..., K] float -> (q int8 [..., K], scale float32 [...]).

    scale = absmax / 127 per row; q = round_half_to_even(x / scale) clamped to [-127, 127].
    A row of zeros gives scale 0 and zeros; a row holding inf or NaN gives scale NaN and zeros.
    """
    xf = x.float()
    if xf.shape[-1] == 0:
        return torch.empty_like(xf, dtype=torch.int8), xf.new_zeros(xf.shape[:-1])
    scale = xf.abs().amax(dim=-1) / 127.0
    finite = torch.isfinite(xf).all(dim=-1)
    usable = (finite & (scale > 0))[..., None]
    r = xf / torch.where(usable, scale[..., None], 1.0)
    q = torch.where(usable, torch.round(r.clamp(-127.0, 127.0)), 0.0).to(torch.int8)
    return q, torch.where(finite, scale, float("nan"))


def dequantize(q, scale, out_dtype=torch.float32):
    """q int8 [..., K], scale float32 [...] (or a single scale) -> q * scale in out_dtype."""
    s = scale.float()
    if s.dim() > 0:
        s = s[..., None]
    return (q.float() * s).to(out_dtype)


INT8_MAX_K = 131071  # 128 * 128 * K must stay below 2**31 for int32 accumulation


def int8_mm(a, b):
    """a int8 [M, K], b int8 [N, K] (nn.Linear layout) -> int32 [M, N] = a @ b^T, exact."""
    return (a.long() @ b.long().t()).to(torch.int32)


def int8_scaled_mm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float16):
    """(a @ b^T) * a_scale[:, None] * b_scale[None, :] + bias, computed in float32.

    a_scale float32 [M] or [1]; b_scale float32 [N] or [1]; bias [N] or None.
    """
    acc = int8_mm(a, b).float()
    y = acc * a_scale.float().reshape(-1, 1) * b_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_weight_only_mm(x, b, b_scale, bias=None):
    """x float [M, K] @ (b int8 [N, K] * b_scale[:, None])^T + bias, in x's dtype."""
    y = (x.float() @ b.float().t()) * b_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
