"""Builders of :class:`frugal.BlockMask` for the patterns attention models use.

Every builder is plain tensor arithmetic on the block grid (no compilation, no per-element
Python): a causal, windowed, document or prefix-LM mask for N = 131072 builds in milliseconds.
Masks compose: ``causal(n) & document(ids)``, ``sliding_window(n, 512) | longformer(...)``.

Alignment when Nq != Nk follows FlashAttention: ``"bottom_right"`` (the default) aligns the last
query with the last key, as in decoding or chunked prefill, so query i sits at key position
``i + Nk - Nq``; ``"top_left"`` aligns query 0 with key 0.
"""

import torch

from .block_mask import (
    INF,
    BlockMask,
    _block_size,
    _doc_ids,
    _from_rule,
    _length,
    _Rule,
)
from .errors import ShapeError

__all__ = ["causal", "sliding_window", "document", "prefix_lm", "full"]

_ALIGNS = ("bottom_right", "top_left")


def _lens(op, nq, nk):
    nq = _length(op, "nq", nq)
    nk = nq if nk is None else _length(op, "nk", nk)
    return nq, nk


def _offset(op, align, nq, nk):
    if align not in _ALIGNS:
        raise ValueError(f"{op}: align must be one of {_ALIGNS}; got {align!r}")
    return nk - nq if align == "bottom_right" else 0


def full(nq, nk=None, *, block_size=128):
    """No masking: every query attends to every key (all blocks full)."""
    op = "masks.full"
    nq, nk = _lens(op, nq, nk)
    return _from_rule((nq, nk), _block_size(block_size, op), _Rule())


def causal(nq, nk=None, *, block_size=128, align="bottom_right"):
    """Query i attends to keys k <= i + offset (offset = Nk - Nq bottom-right, 0 top-left).

    With bottom-right alignment and Nq > Nk the first Nq - Nk queries see no key: their output
    is 0 (lse -inf), as in FlashAttention.
    """
    op = "masks.causal"
    nq, nk = _lens(op, nq, nk)
    off = _offset(op, align, nq, nk)
    return _from_rule((nq, nk), _block_size(block_size, op), _Rule(lo=-INF, hi=off))


def sliding_window(nq, window, nk=None, *, causal=True, block_size=128, align="bottom_right"):
    """A local window around each query's (aligned) position p = i + offset.

    ``window`` is either an int ``w`` or a pair ``(left, right)`` (FlashAttention's
    ``window_size``): key k is allowed iff ``p - left <= k <= p + right``. An int with
    ``causal=True`` means the last ``w`` keys up to and including p (left = w - 1, right = 0:
    the convention of :func:`frugal.paged_attention`'s ``window``); an int with
    ``causal=False`` means ``|k - p| <= w``. A pair with ``causal=True`` has its right side
    clipped to 0.
    """
    op = "masks.sliding_window"
    nq, nk = _lens(op, nq, nk)
    off = _offset(op, align, nq, nk)
    if isinstance(window, bool):
        raise ShapeError(f"{op}: window must be a positive int or a pair (left, right) of ints "
                         f">= 0; got {window!r}")
    if isinstance(window, int):
        if window < 1:
            raise ShapeError(f"{op}: window must be a positive int or a pair (left, right) of "
                             f"ints >= 0; got {window!r}")
        left, right = (window - 1, 0) if causal else (window, window)
    else:
        try:
            left, right = window
        except (TypeError, ValueError):
            raise ShapeError(f"{op}: window must be a positive int or a pair (left, right) of "
                             f"ints >= 0; got {window!r}") from None
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                   for x in (left, right)):
            raise ShapeError(f"{op}: window must be a positive int or a pair (left, right) of "
                             f"ints >= 0; got {window!r}")
        if causal:
            right = 0
    return _from_rule((nq, nk), _block_size(block_size, op),
                      _Rule(lo=off - min(left, INF), hi=off + min(right, INF)))


def document(doc_ids, kv_doc_ids=None, *, block_size=128):
    """Packed variable-length sequences: query i attends to key k iff they belong to the same
    document. ``doc_ids`` int [N] or [B, N] (one id per token; contiguous runs of equal ids are
    the cheapest, any ids are correct); ``kv_doc_ids`` the keys' ids when Nq != Nk (default:
    the same). Combine with :func:`causal` for causal packed sequences::

        mask = frugal.masks.causal(n) & frugal.masks.document(ids)
    """
    op = "masks.document"
    q_doc = _doc_ids(op, "doc_ids", doc_ids)
    kv_doc = q_doc if kv_doc_ids is None else _doc_ids(op, "kv_doc_ids", kv_doc_ids)
    if kv_doc.shape[0] != q_doc.shape[0]:
        raise ShapeError(f"masks.document: doc_ids and kv_doc_ids must have the same batch dim; "
                         f"got {q_doc.shape[0]} and {kv_doc.shape[0]}")
    return _from_rule((q_doc.shape[1], kv_doc.shape[1]), _block_size(block_size, op),
                      _Rule(q_doc=q_doc, kv_doc=kv_doc))


def prefix_lm(nq, prefix_len, nk=None, *, block_size=128, align="bottom_right"):
    """Prefix-LM: every query attends to the first ``prefix_len`` keys (bidirectional prefix)
    and causally to the rest (key k allowed iff ``k < prefix_len`` or ``k <= i + offset``)."""
    op = "masks.prefix_lm"
    nq, nk = _lens(op, nq, nk)
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ShapeError(f"{op}: prefix_len must be an int >= 0; got {prefix_len!r}")
    off = _offset(op, align, nq, nk)
    return _from_rule((nq, nk), _block_size(block_size, op),
                      _Rule(lo=-INF, hi=off, prefix=prefix_len))


