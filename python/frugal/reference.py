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
