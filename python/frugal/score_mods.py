"""Score modifiers shared by the attention ops: a logit softcap (Gemma-2) and ALiBi biases
(BLOOM, MPT). One definition, one argument check; every backend applies them in this order
to a query row's score against key position ``k_pos`` (``q_pos`` the query's position):

1. ``s = scale * (q . k)``
2. softcap ``c > 0``: ``s = c * tanh(s / c)`` (Gemma-2 caps after scaling)
3. ALiBi slope ``m`` of the query head (and batch row): ``s = s - m * |q_pos - k_pos|``
   (FlashAttention's rule; where ``k_pos <= q_pos`` it is ``m * (k_pos - q_pos)``, which equals
   BLOOM's ``m * k_pos`` up to a per-row constant that softmax cancels)
4. the mask (-inf where not allowed), then softmax; the returned lse is of these scores.

Positions: ``sparse_attention`` puts query i at ``i + Nk - Nq`` (bottom-right, like its causal
masks) and key j at j; the paged ops use the sequence positions they already define (decode:
``seq_lens[b] - 1``; prefill: ``[seq_lens[b] - n_b, seq_lens[b])``). Backward: the softcap's
derivative ``1 - tanh(s / c)**2`` scales dS; the slopes get no gradient (as FlashAttention).

:func:`frugal.reference.apply_score_mods` is the reference of steps 2-3.
"""

import math

import torch

from .errors import DeviceError, DTypeError, ShapeError, check_tensor

# The largest softcap a kernel takes: |s| / c must not underflow the tanh's argument to zero
# for every score (a cap this large is no cap at all, and c * tanh(s / c) loses s's bits).
MAX_SOFTCAP = 2.0**64


def check_softcap(op, softcap):
    """softcap None (off) or a finite float > 0 -> a float, 0.0 meaning off."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{op}: softcap must be a float > 0 or None; got "
                        f"{type(softcap).__name__}")
    c = float(softcap)
    if not (math.isfinite(c) and 0.0 < c <= MAX_SOFTCAP):
        raise ValueError(f"{op}: softcap must be a finite float in (0, 2**64] or None (no "
                         f"cap); got {softcap}")
    return c


def check_alibi_slopes(op, alibi_slopes, batch, heads, device):
    """alibi_slopes None, or float32 [heads] or [batch, heads] on ``device`` with finite values
    -> None or a contiguous float32 [batch, heads] (a [heads] one is expanded, stride 0 kept
    out: the kernels read row b at ``b * heads``)."""
    if alibi_slopes is None:
        return None
    check_tensor(op, "alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise DTypeError(f"{op}: alibi_slopes must be float32; got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ShapeError(f"{op}: alibi_slopes must be [num_heads] = [{heads}] or [batch, "
                         f"num_heads] = [{batch}, {heads}] (the query heads); got "
                         f"{list(alibi_slopes.shape)}")
    if alibi_slopes.device != torch.device(device):
        raise DeviceError(f"{op}: alibi_slopes must be on {torch.device(device)} with q; got "
                          f"{alibi_slopes.device}")
    if torch.compiler.is_compiling():
        # Reading the values here would break the graph (fullgraph=True fails). The compiled
        # graph checks them as it runs instead: a RuntimeError on the CPU, a device assert
        # (active in Triton's debug mode) on a GPU.
        torch._assert_async(torch.isfinite(alibi_slopes).all(),
                            f"{op}: alibi_slopes must be finite")
    elif not bool(torch.isfinite(alibi_slopes).all()):
        raise ValueError(f"{op}: alibi_slopes must be finite; got "
                         f"{alibi_slopes[~torch.isfinite(alibi_slopes)][:4].tolist()}")
    return alibi_slopes.expand(batch, heads).contiguous()


def alibi_slopes_like_bloom(heads, device="cpu"):
    """The standard ALiBi slopes of ``heads`` heads (Press et al.; BLOOM's
    ``build_alibi_tensor``): 2**(-8 i / n) for the closest power of two n <= heads, then the odd
    steps of the next power for the rest. float32 [heads]."""
    n = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-8.0 / n)
    slopes = [base ** (i + 1) for i in range(n)]
    if n < heads:
        extra = 2.0 ** (-4.0 / n)
        slopes += [extra ** (2 * i + 1) for i in range(heads - n)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)
