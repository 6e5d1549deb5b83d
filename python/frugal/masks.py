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
    _block_range,
    _block_size,
    _cdiv,
    _doc_ids,
    _from_rule,
    _int32_doc_ids,
    _length,
    _Rule,
    _with_bits,
)
from .errors import DTypeError, ShapeError

__all__ = ["causal", "sliding_window", "document", "prefix_lm", "full", "strided", "dilated",
           "longformer", "bigbird"]

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


def _window_sides(op, window, causal):
    """(left, right) of a window given as an int or a pair; see :func:`sliding_window`."""
    bad = ShapeError(f"{op}: window must be a positive int or a pair (left, right) of ints "
                     f">= 0; got {window!r}")
    if isinstance(window, bool):
        raise bad
    if isinstance(window, int):
        if window < 1:
            raise bad
        window = min(window, INF)
        return (window - 1, 0) if causal else (window, window)
    try:
        left, right = window
    except (TypeError, ValueError):
        raise bad from None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (left, right)):
        raise bad
    return min(left, INF), 0 if causal else min(right, INF)


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
    left, right = _window_sides(op, window, causal)
    return _from_rule((nq, nk), _block_size(block_size, op),
                      _Rule(lo=off - left, hi=off + right))


def document(doc_ids, kv_doc_ids=None, *, block_size=128):
    """Packed variable-length sequences: query i attends to key k iff they belong to the same
    document. ``doc_ids`` int [N] or [B, N] (one id per token, any integer dtype and value;
    contiguous runs of equal ids are the cheapest, any ids are correct); ``kv_doc_ids`` the
    keys' ids when Nq != Nk (default: the same). Combine with :func:`causal` for causal packed sequences::

        mask = frugal.masks.causal(n) & frugal.masks.document(ids)
    """
    op = "masks.document"
    q_doc = _doc_ids(op, "doc_ids", doc_ids)
    kv_doc = q_doc if kv_doc_ids is None else _doc_ids(op, "kv_doc_ids", kv_doc_ids)
    if kv_doc.shape[0] != q_doc.shape[0]:
        raise ShapeError(f"masks.document: doc_ids and kv_doc_ids must have the same batch dim; "
                         f"got {q_doc.shape[0]} and {kv_doc.shape[0]}")
    q_doc, kv_doc = _int32_doc_ids(q_doc, kv_doc)
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




# ------------------------------------------------------------------ patterns with bitmasks
#
# The builders below classify blocks on the block grid with tensor arithmetic, then hand the
# partial blocks to ``_with_bits`` with a *key*: for each part of the pattern, its state in the
# block (0 nothing allowed, 1 everything, 2 some) and, where it is partial, the few numbers its
# element pattern there depends on (e.g. the diagonal offset q0 - k0 for a band). Blocks with
# equal keys have equal bitmasks, so the element predicate runs on one block per key.


def _int_arg(op, name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ShapeError(f"{op}: {name} must be an int >= {minimum}; got {value!r}")
    return value


def _bounds(n, block):
    """First and last in-bounds position of each block of ``n`` positions (int64 [nb])."""
    first = torch.arange(0, n, block)
    return first, torch.clamp(first + block, max=n) - 1


def _all_any(pred, block):
    """Per-block all / any of a bool [..., N] predicate -> two bool [..., ceil(N / block)]."""
    lead = pred.shape[:-1]
    lo, hi = _block_range(pred.reshape(-1, pred.shape[-1]).long(), block)
    return (lo == 1).view(*lead, -1), (hi == 1).view(*lead, -1)


def _pattern_ids(flags, block):
    """Id of each block's pattern of a bool [N] (blocks with equal flags, equal ids; a short
    last block is padded with False, which the ragged-end key of _with_bits tells apart)."""
    n = flags.shape[-1]
    padded = torch.nn.functional.pad(flags, (0, _cdiv(n, block) * block - n))
    return torch.unique(padded.view(-1, block).long(), dim=0, return_inverse=True)[1]


def _key(full, any_, *params):
    """Key columns of one part of a pattern: its state per block and, where it is partial, the
    parameters its element pattern depends on (see the comment above)."""
    state = full.long() + (any_ & ~full).long() * 2
    partial = state == 2
    return [state] + [torch.where(partial, p, 0) for p in params]


def _causal_part(nq, nk, bq, bk, off, d):
    full, any_ = _Rule(lo=-INF, hi=off).classify(nq, nk, bq, bk)
    return full, any_, _key(full, any_, d)


def _grid(nq, nk, bq, bk, off):
    """(a0, k0, d): aligned first query position of each q-block [nQB, 1], first key of each
    kv-block [1, nKB], and the diagonal offset a0 - k0 [nQB, nKB]."""
    a0 = _bounds(nq, bq)[0][:, None] + off
    k0 = _bounds(nk, bk)[0][None, :]
    return a0, k0, a0 - k0


def strided(nq, stride, nk=None, *, summary=1, causal=True, heads=None, block_size=128,
            align="bottom_right"):
    """Sparse Transformer "fixed" pattern (Child et al. 2019, eq. for A^(1), A^(2)).

    With p = i + offset the query's aligned position and ``l = stride``, ``c = summary``, key k
    is allowed iff

    - *local*: ``p // l == k // l`` (same stride-chunk), or
    - *summary*: ``k % l >= l - c`` (the last ``c`` positions of every chunk), and,
    - with ``causal=True`` (the paper's autoregressive setting), ``k <= p``.

    ``heads=H`` gives each head its own summary positions as DeepSpeed's
    ``FixedSparsityConfig(num_different_global_patterns=...)`` does: head h uses
    ``l - (j + 1) c <= k % l < l - j c`` with ``j = h % (l // c)`` (head 0 is the paper's
    pattern). Chunks start at position 0 of the keys; a short last chunk has summary positions
    only where they exist. The pattern is exact at element level; partial blocks (chunk borders
    inside a block, summary columns narrower than a block, the causal diagonal) carry bitmasks,
    shared between blocks with the same pattern. ``stride`` a multiple of the block size keeps
    the local part block-aligned and cheapest.
    """
    op = "masks.strided"
    nq, nk = _lens(op, nq, nk)
    off = _offset(op, align, nq, nk)
    bq, bk = _block_size(block_size, op)
    s = _int_arg(op, "stride", stride, 1)
    c = _int_arg(op, "summary", summary, 1)
    if c > s:
        raise ShapeError(f"{op}: summary must be <= stride ({s}); got {c}")
    hm = 1 if heads is None else _length(op, "heads", heads)
    patterns = s // c
    j = (torch.arange(hm) % patterns)[:, None]
    km = torch.arange(nk) % s
    col_all, col_any = _all_any((km >= s - (j + 1) * c) & (km < s - j * c), bk)  # [hm, nKB]
    col_all, col_any = col_all[None, :, None, :], col_any[None, :, None, :]

    a0, k0, d = _grid(nq, nk, bq, bk, off)
    a1 = _bounds(nq, bq)[1][:, None] + off
    k1 = _bounds(nk, bk)[1][None, :]
    ca0, ca1, ck0, ck1 = a0 // s, a1 // s, k0 // s, k1 // s
    loc_full = (ca0 == ca1) & (ck0 == ck1) & (ca0 == ck0)
    loc_any = (ca0 <= ck1) & (ck0 <= ca1)
    full = loc_full | col_all
    any_ = loc_any | col_any
    key = (_key(loc_full, loc_any, a0 % s, k0 % s, ca0 - ck0)
           + _key(col_all, col_any, (k0 % s)[None, None], j[None, :, :, None]))
    if causal:
        cf, ca, ck = _causal_part(nq, nk, bq, bk, off, d)
        full, any_, key = full & cf, any_ & ca, key + ck

    def mod(b, h, q, k):
        p = q + off
        jj = h % patterns
        kr = k % s
        ok = (torch.div(p, s, rounding_mode="floor") == k // s) | (
            (kr >= s - (jj + 1) * c) & (kr < s - jj * c))
        return ok & (k <= p) if causal else ok

    shape = (1, hm) + full.shape[-2:]
    full = full.expand(shape).contiguous()
    return _with_bits((nq, nk), (bq, bk), full, (any_ & ~full).expand(shape).contiguous(), mod,
                      key)


def dilated(nq, window, dilation, nk=None, *, causal=True, block_size=128,
            align="bottom_right"):
    """Dilated sliding window (Longformer's dilated attention): the window of
    :func:`sliding_window` with gaps, keeping every ``dilation``-th key counted from the query.

    With p = i + offset and ``(left, right)`` the window's sides as in :func:`sliding_window`
    (an int ``w`` is ``(w - 1, 0)`` causal and ``(w, w)`` otherwise), key k is allowed iff
    ``p - left * dilation <= k <= p + right * dilation`` and ``(p - k) % dilation == 0``: each
    query sees as many keys as the undilated window, spread over ``dilation`` times the span.
    ``dilation=1`` is :func:`sliding_window`. Every visited block is partial (bitmasks, shared
    between blocks on the same diagonal).
    """
    op = "masks.dilated"
    nq, nk = _lens(op, nq, nk)
    off = _offset(op, align, nq, nk)
    bq, bk = _block_size(block_size, op)
    left, right = _window_sides(op, window, causal)
    dil = _int_arg(op, "dilation", dilation, 1)
    if dil == 1:
        return sliding_window(nq, window, nk, causal=causal, block_size=(bq, bk), align=align)
    lo, hi = off - min(left * dil, INF), off + min(right * dil, INF)
    _, any_ = _Rule(lo=lo, hi=hi).classify(nq, nk, bq, bk)

    def mod(b, h, q, k):
        p = q + off
        return (k >= p + lo - off) & (k <= p + hi - off) & ((p - k) % dil == 0)

    d = _grid(nq, nk, bq, bk, off)[2]
    return _with_bits((nq, nk), (bq, bk), torch.zeros_like(any_), any_.contiguous(), mod,
                      [d[None, None]])


def _global_positions(op, tokens, n):
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise DTypeError(f"{op}: global_tokens must hold integer positions; got "
                             f"{tokens.dtype}")
        if tokens.dim() > 1:
            raise ShapeError(f"{op}: global_tokens must be 1-d; got shape "
                             f"{tuple(tokens.shape)}")
        tokens = tokens.reshape(-1).long().cpu()
    else:
        try:
            items = list(tokens)
        except TypeError:
            raise TypeError(f"{op}: global_tokens must be a list or 1-d tensor of key "
                            f"positions; got {type(tokens).__name__}") from None
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            raise DTypeError(f"{op}: global_tokens must hold int positions; got {items!r}")
        tokens = torch.tensor(items, dtype=torch.int64)
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= n):
        raise ShapeError(f"{op}: global_tokens must be key positions in [0, {n}); got values "
                         f"from {int(tokens.min())} to {int(tokens.max())}")
    flags = torch.zeros(n, dtype=torch.bool)
    flags[tokens] = True
    return flags


def longformer(nq, window, global_tokens, nk=None, *, causal=False, block_size=128,
               align="bottom_right"):
    """Longformer: a sliding window plus global tokens.

    ``window`` as in :func:`sliding_window` (an int ``w`` with ``causal=False`` allows
    ``|k - p| <= w``, i.e. Longformer's window of ``2 w + 1``). ``global_tokens`` (list or 1-d
    int tensor of key positions in [0, Nk)) attend to every key and are attended by every
    query. With p = i + offset, key k is allowed iff ``p - left <= k <= p + right`` or ``k`` is
    global or ``p`` is global; with ``causal=True`` also ``k <= p``.
    """
    op = "masks.longformer"
    nq, nk = _lens(op, nq, nk)
    off = _offset(op, align, nq, nk)
    bq, bk = _block_size(block_size, op)
    left, right = _window_sides(op, window, causal)
    gk = _global_positions(op, global_tokens, nk)
    p = torch.arange(nq) + off
    gq = torch.zeros(nq, dtype=torch.bool)
    inside = (p >= 0) & (p < nk)
    gq[inside] = gk[p[inside]]

    wf, wa = _Rule(lo=off - left, hi=off + right).classify(nq, nk, bq, bk)
    row_all, row_any = (x[:, None] for x in _all_any(gq, bq))
    col_all, col_any = (x[None, :] for x in _all_any(gk, bk))
    d = _grid(nq, nk, bq, bk, off)[2]
    full = wf | row_all | col_all
    any_ = wa | row_any | col_any
    key = (_key(wf, wa, d) + _key(row_all, row_any, _pattern_ids(gq, bq)[:, None])
           + _key(col_all, col_any, _pattern_ids(gk, bk)[None, :]))
    if causal:
        cf, ca, ck = _causal_part(nq, nk, bq, bk, off, d)
        full, any_, key = full & cf, any_ & ca, key + ck

    def mod(b, h, q, k):
        pos = q + off
        ok = ((k >= pos - left) & (k <= pos + right)) | gq.to(q.device)[q] | gk.to(k.device)[k]
        return ok & (k <= pos) if causal else ok

    return _with_bits((nq, nk), (bq, bk), full.contiguous(), (any_ & ~full).contiguous(), mod,
                      key)


def bigbird(nq, window=3, num_global=1, num_random=3, nk=None, *, seed=0, heads=None,
            block_size=128, align="bottom_right"):
    """BigBird ITC (Zaheer et al. 2020), defined on the block grid like BigBird itself and
    DeepSpeed's ``BigBirdSparsityConfig``: every selected block is full, the rest skipped.

    With a0 / a1 the first / last aligned query position (i + offset) of q-block ``qb``,
    kv-block ``kb`` is selected iff

    - *window*: ``a0 // BK - window // 2 <= kb <= a1 // BK + window // 2`` (``window`` an odd
      number of blocks; with BQ = BK and aligned lengths, the ``window`` blocks centred on the
      diagonal: BigBird's 3 is one block either side),
    - *global*: ``kb < num_global`` (global keys) or ``a0 < num_global * BK`` (the global
      tokens' own queries attend everywhere),
    - *random*: one of ``num_random`` kv-blocks drawn per q-block, uniformly without replacement
      among the blocks not selected above (fewer if fewer remain), from a
      ``torch.Generator`` seeded with ``seed``: the same arguments give the same mask. With
      ``heads=H`` every head draws its own random blocks (the mask's head dim is H).
    """
    op = "masks.bigbird"
    nq, nk = _lens(op, nq, nk)
    off = _offset(op, align, nq, nk)
    bq, bk = _block_size(block_size, op)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ShapeError(f"{op}: window must be a positive odd number of blocks; got {window!r}")
    g = _int_arg(op, "num_global", num_global, 0)
    r = _int_arg(op, "num_random", num_random, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int; got {seed!r}")
    hm = 1 if heads is None else _length(op, "heads", heads)
    q0, q1 = _bounds(nq, bq)
    a0, a1 = (q0 + off)[:, None], (q1 + off)[:, None]
    kb = torch.arange(_cdiv(nk, bk))[None, :]
    w2 = window // 2
    sel = (kb >= torch.div(a0, bk, rounding_mode="floor") - w2) & (
        kb <= torch.div(a1, bk, rounding_mode="floor") + w2)
    sel = sel | (kb < g) | (a0 < g * bk)
    sel = sel[None].expand(hm, *sel.shape)
    if r > 0:
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(sel.shape, generator=gen).masked_fill_(sel, 2.0)
        vals, idx = torch.topk(u, min(r, sel.shape[-1]), dim=-1, largest=False)
        sel = sel | torch.zeros_like(sel).scatter_(-1, idx, vals < 2.0)
    full = sel[None].contiguous()
    return BlockMask((nq, nk), (bq, bk), full, torch.zeros_like(full))
