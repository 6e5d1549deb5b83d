"""Merging partial attention states: :func:`merge_attention_states` combines the (out, lse) of
attention over two disjoint key sets into attention over their union (FlashInfer's
``merge_state``), as split prefixes and shared-prefix (cascade) decode need. The paged ops
return such pairs with ``return_lse=True``."""

import torch

from . import _ext, reference
from .errors import DTypeError, ShapeError, check_dtype, check_same_device
from .registry import Op

_OP = "merge_attention_states"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

if _ext.ext() is not None and hasattr(torch.ops.frugal, "merge_attention_states_"):

    @torch.library.register_fake("frugal::merge_attention_states_")
    def _merge_attention_states_fake(out, lse, out_b, lse_b, rows, rows_b):
        return None


# A few fused elementwise ops over [..., D]: PyTorch runs them at memory speed on every device.
MERGE_ATTENTION_STATES = Op(_OP)
MERGE_ATTENTION_STATES.implement("torch")(reference.merge_attention_states)


def _check(out_a, lse_a, out_b, lse_b):
    check_dtype(_OP, "out_a", out_a, _FLOATS)
    check_dtype(_OP, "lse_a", lse_a, (torch.float32,))
    check_dtype(_OP, "out_b", out_b, _FLOATS)
    check_dtype(_OP, "lse_b", lse_b, (torch.float32,))
    if out_a.dim() < 1:
        raise ShapeError(f"{_OP}: out_a must have at least 1 dim [..., head_dim]; got a 0-d "
                         f"tensor")
    if out_b.dtype != out_a.dtype:
        raise DTypeError(f"{_OP}: out_b must have out_a's dtype {out_a.dtype}; got "
                         f"{out_b.dtype}")
    if out_b.shape != out_a.shape:
        raise ShapeError(f"{_OP}: out_b must have out_a's shape {tuple(out_a.shape)}; got "
                         f"{tuple(out_b.shape)}")
    rows = tuple(out_a.shape[:-1])
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(lse.shape) != rows:
            raise ShapeError(f"{_OP}: {name} must have shape {rows} (out_a.shape[:-1], one per "
                             f"row); got {tuple(lse.shape)}")
    check_same_device(_OP, out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)


def _select(out_a, lse_a, out_b, lse_b, *, backend="auto", explain=False):
    _check(out_a, lse_a, out_b, lse_b)
    return MERGE_ATTENTION_STATES.select(out_a.device, backend, out_a, lse_a, out_b, lse_b,
                                         explain=explain)


def merge_attention_states(out_a, lse_a, out_b, lse_b, *, backend="auto"):
    """Attention over the union of two disjoint key sets, from the attention over each.

    Parameters
    ----------
    out_a, out_b : Tensor [..., D], float32, float16 or bfloat16 (one dtype), any strides: the
        normalized attention outputs of the same queries over key sets A and B.
    lse_a, lse_b : Tensor [...] float32 (``out_a.shape[:-1]``): the natural log of the sum of
        exp of each row's scaled scores over A and over B, as ``frugal.paged_attention(...,
        return_lse=True)`` and ``sparse_attention`` return it; -inf for an empty set.
    backend : "auto" | "torch" (a few fused elementwise ops; no custom kernel is needed).

    Returns
    -------
    (out, lse) : out in out_a's dtype, lse float32, both computed in float32:
    ``lse = log(e^lse_a + e^lse_b)`` and ``out = (e^lse_a out_a + e^lse_b out_b) / e^lse``,
    relative to ``max(lse_a, lse_b)`` so nothing overflows. A part with lse -inf is empty: it
    weighs exactly 0 and its out is not read, so merging with an empty part returns the other
    part unchanged (bit for bit); two empty parts give out 0 and lse -inf. A NaN lse makes the
    row's out and lse NaN; so does +inf (the ops give NaN, not +inf, for a +inf score); a NaN
    in a non-empty part's out reaches the merged out.

    Example: decode over a prefix's blocks and a suffix's blocks apart, then merge::

        o1, l1 = frugal.paged_attention(q, kc, vc, prefix_tables, prefix_lens, return_lse=True)
        o2, l2 = frugal.paged_attention(q, kc, vc, suffix_tables, suffix_lens, return_lse=True)
        out, lse = frugal.merge_attention_states(o1, l1, o2, l2)
    """
    return _select(out_a, lse_a, out_b, lse_b, backend=backend).run(out_a, lse_a, out_b, lse_b)


merge_attention_states._frugal_select = _select
