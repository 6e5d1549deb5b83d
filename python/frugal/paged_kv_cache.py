"""Paged KV cache: the block manager (:class:`PagedKVCache`) and the ops that read and write a
paged cache through block tables (:func:`paged_append`, :func:`paged_attention`,
:func:`paged_prefill_attention`).

Layout
------
K and V each live in one tensor ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``;
the ops take one layer, ``[num_blocks, block_size, Hkv, D]``. Token position p of a sequence
lives at offset ``p % block_size`` of block ``table[p // block_size]``, so a table row always
indexes positions from 0. Tables are int32 ``[num_seqs, max_blocks]``; -1 marks an entry with
no block: padding past a sequence's end, or a block a sliding window has given back. An op
refuses a -1 (or any entry outside ``[0, num_blocks)``) among the entries it has to read.
A flat slot is ``block * block_size + offset``; a negative slot is padding. int8 caches keep
float32 scales ``[num_layers, num_blocks, block_size, Hkv]`` beside the data: each head vector
of each token is quantized as :func:`frugal.quantize_per_token` does (absmax / 127, round half
to even).

Backends: :func:`paged_append`, :func:`paged_attention` and :func:`paged_prefill_attention` (and
the manager's writes) run the Triton kernels on CUDA tensors (``frugal.kernels.paged_attention``:
GQA-packed tensor-core decode with split-KV, flash-style chunked prefill) and the C++ kernels
(``frugal._C``) on CPU tensors, each falling back to the PyTorch reference where it cannot run.
"""

import array
import collections
import dataclasses
import hashlib
from typing import Optional

import torch

from . import _ext, reference
from .dispatch import select, triton_custom_op, unavailable
from .errors import (
    BackendError,
    DeviceError,
    DTypeError,
    FrugalError,
    ShapeError,
    check_dtype,
    check_same_device,
    check_tensor,
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_CACHE_DTYPES = _FLOATS + (torch.int8,)
_BACKENDS = ("triton", "cpu", "torch")  # paged_append, paged_attention, paged_prefill_attention
_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
_MAX_WINDOW = 2**31 - 1  # a longer window reads what no window reads

if _ext.ext() is not None and hasattr(torch.ops.frugal, "paged_attention"):

    @torch.library.register_fake("frugal::paged_attention")
    def _paged_attention_fake(q, k_cache, v_cache, block_tables, seq_lens, scale, window,
                              k_scale, v_scale):
        return q.new_empty(q.shape)


if _ext.ext() is not None and hasattr(torch.ops.frugal, "paged_append"):

    @torch.library.register_fake("frugal::paged_append")
    def _paged_append_fake(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
        return None


@triton_custom_op("frugal::paged_attention_triton")
def _paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            window: int, k_scale: Optional[torch.Tensor],
                            v_scale: Optional[torch.Tensor]) -> torch.Tensor:
    from frugal.kernels import paged_attention as kernel

    return kernel.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, window,
                                  k_scale, v_scale)


@_paged_attention_triton.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale, v_scale):
    return q.new_empty(q.shape)


@triton_custom_op("frugal::paged_append_triton",
                  mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _paged_append_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor]) -> None:
    from frugal.kernels import paged_attention as kernel

    kernel.paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@_paged_append_triton.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    return None


if _ext.ext() is not None and hasattr(torch.ops.frugal, "paged_prefill_attention"):

    @torch.library.register_fake("frugal::paged_prefill_attention")
    def _paged_prefill_attention_fake(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
                                      scale, window, k_scale, v_scale):
        return q.new_empty(q.shape)


@triton_custom_op("frugal::paged_prefill_attention_triton")
def _paged_prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor,
                                    v_cache: torch.Tensor, block_tables: torch.Tensor,
                                    seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    max_q_len: int, scale: float, window: int,
                                    k_scale: Optional[torch.Tensor],
                                    v_scale: Optional[torch.Tensor]) -> torch.Tensor:
    from frugal.kernels import paged_attention as kernel

    return kernel.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                          cu_seqlens_q, max_q_len, scale, window, k_scale,
                                          v_scale)


@_paged_prefill_attention_triton.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale, window,
      k_scale, v_scale):
    return q.new_empty(q.shape)


class CacheFullError(FrugalError, RuntimeError):
    """An append needs more free blocks than the cache has; nothing was changed."""


class SequenceError(FrugalError, ValueError):
    """A sequence id is unknown (never added, or freed), already present, or repeated in one
    call, or token ids disagree with the ids already recorded for those positions."""


class BlockTableError(FrugalError, ValueError):
    """A block table, seq_len, q_len or slot points outside the cache or at a missing block."""


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the ops


def empty_cache(shape, dtype, device):
    """An uninitialized tensor for KV-cache storage.

    On the CPU, with the extension built, a cache of 8 MiB or more is marked for transparent
    huge pages (Linux ``madvise``; honoured when
    ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` or ``always``) before its
    first touch, so that decode, which reads the cache in scattered blocks, walks 2 MiB pages
    instead of 4 KiB ones. Elsewhere it is plain :func:`torch.empty`. The hint changes no value.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    ext = _ext.ext()
    if t.device.type == "cpu" and ext is not None and hasattr(ext, "advise_huge_pages"):
        ext.advise_huge_pages(t.data_ptr(), t.numel() * t.element_size())
    return t


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_block_size(bs):
    return _is_int(bs) and 1 <= bs <= 256 and bs & (bs - 1) == 0


def _check_window(op, window):
    if window is not None and not (_is_int(window) and window >= 1):
        raise ValueError(f"{op}: window must be None or an int >= 1; got {window!r}")


def _check_scale(op, scale):
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)):
        raise TypeError(f"{op}: scale must be None or a number; got {scale!r}")


def _check_caches(op, k_cache, v_cache, k_scale, v_scale):
    check_dtype(op, "k_cache", k_cache, _CACHE_DTYPES)
    check_tensor(op, "v_cache", v_cache)
    if k_cache.dim() != 4:
        raise ShapeError(f"{op}: k_cache must be 4-d [num_blocks, block_size, num_kv_heads, "
                         f"head_dim]; got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ShapeError(f"{op}: v_cache must have k_cache's shape {tuple(k_cache.shape)}; got "
                         f"{tuple(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise DTypeError(f"{op}: v_cache must have k_cache's dtype {k_cache.dtype}; got "
                         f"{v_cache.dtype}")
    if not _is_block_size(k_cache.shape[1]):
        raise ShapeError(f"{op}: block_size (k_cache.shape[1]) must be a power of two from 1 to "
                         f"256; got {k_cache.shape[1]}")
    tensors = {"k_cache": k_cache, "v_cache": v_cache}
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if k_cache.dtype != torch.int8:
            if s is not None:
                raise DTypeError(f"{op}: {name} is only for int8 caches; k_cache is "
                                 f"{k_cache.dtype}")
            continue
        if s is None:
            raise DTypeError(f"{op}: int8 caches need {name} (float32 [num_blocks, block_size, "
                             f"num_kv_heads]); got None")
        check_dtype(op, name, s, (torch.float32,))
        if s.shape != k_cache.shape[:3]:
            raise ShapeError(f"{op}: {name} must have shape {tuple(k_cache.shape[:3])} "
                             f"(k_cache.shape[:3]); got {tuple(s.shape)}")
        tensors[name] = s
    check_same_device(op, **tensors)


def _check_heads(op, name, x, k_cache):
    hq, d = x.shape[-2:]
    hkv, d_cache = k_cache.shape[2:]
    if d != d_cache:
        raise ShapeError(f"{op}: {name}'s head_dim (last dim) must be k_cache's {d_cache}; got {d}")
    if hq % hkv != 0:
        raise ShapeError(f"{op}: {name}'s head count {hq} must be a multiple of k_cache's "
                         f"num_kv_heads {hkv}")


def _check_query(op, q, k_cache, dims, layout):
    check_dtype(op, "q", q, _FLOATS)
    if q.dim() not in dims:
        raise ShapeError(f"{op}: q must be {layout}; got shape {tuple(q.shape)}")
    if k_cache.dtype != torch.int8 and q.dtype != k_cache.dtype:
        raise DTypeError(f"{op}: q must have the cache dtype {k_cache.dtype}; got {q.dtype}")
    _check_heads(op, "q", q, k_cache)
    if q.device != k_cache.device:
        raise DeviceError(f"{op}: q must be on k_cache's device ({k_cache.device}); got {q.device}")


def _check_int_vector(op, name, t, rows, device):
    check_dtype(op, name, t, (torch.int32,))
    if t.shape != (rows,):
        raise ShapeError(f"{op}: {name} must have shape ({rows},); got {tuple(t.shape)}")
    if t.device != device:
        raise DeviceError(f"{op}: {name} must be on k_cache's device ({device}); got {t.device}")


def _check_tables(op, block_tables, seq_lens, rows, k_cache):
    check_dtype(op, "block_tables", block_tables, (torch.int32,))
    if block_tables.dim() != 2 or block_tables.shape[0] != rows:
        raise ShapeError(f"{op}: block_tables must be [{rows}, max_blocks] (one row per "
                         f"sequence); got shape {tuple(block_tables.shape)}")
    if block_tables.device != k_cache.device:
        raise DeviceError(f"{op}: block_tables must be on k_cache's device ({k_cache.device}); "
                          f"got {block_tables.device}")
    _check_int_vector(op, "seq_lens", seq_lens, rows, k_cache.device)


def _check_table_contents(op, block_tables, seq_lens, k_cache, window, q_lens=None, q_rows=None):
    """Every entry in [-1, num_blocks), every entry the op reads >= 0, seq_lens within the rows,
    q_lens within seq_lens and summing to q's rows: one reduction, one host sync."""
    num_blocks, bs = k_cache.shape[:2]
    width = block_tables.shape[1]
    lens = seq_lens.long()
    n = 1 if q_lens is None else q_lens.long()
    lo = torch.zeros_like(lens) if window is None else (lens - n - window + 1).clamp(min=0)
    starts = torch.arange(width, device=lens.device) * bs
    read = (starts < lens[:, None]) & (starts + bs > lo[:, None])
    bad_entry = (block_tables < -1) | (block_tables >= num_blocks) | (read & (block_tables < 0))
    bad_len = (lens < 0) | (lens > width * bs)
    bad_q = torch.zeros((), dtype=torch.bool, device=lens.device)
    if q_lens is not None:
        bad_len = bad_len | (n < 0) | (n > lens)
        bad_q = n.sum() != q_rows
    if not bool(bad_entry.any() | bad_len.any() | bad_q):
        return
    if bad_len.any():
        b = int(bad_len.nonzero()[0, 0])
        seq_len = int(lens[b])
        if q_lens is not None and not 0 <= int(n[b]) <= max(seq_len, 0):
            raise BlockTableError(f"{op}: q_lens[{b}] must be in [0, seq_lens[{b}]] = "
                                  f"[0, {seq_len}]; got {int(n[b])}")
        raise BlockTableError(f"{op}: seq_lens[{b}] must be in [0, {width * bs}] (block_tables "
                              f"rows hold {width} blocks of {bs} tokens); got {seq_len}")
    if bool(bad_q):
        raise ShapeError(f"{op}: q_lens must sum to q's {q_rows} rows; got {int(n.sum())}")
    b, j = (int(i) for i in bad_entry.nonzero()[0])
    entry = int(block_tables[b, j])
    if entry < -1 or entry >= num_blocks:
        raise BlockTableError(f"{op}: block_tables[{b}, {j}] must be in [0, {num_blocks}) "
                              f"(num_blocks), or -1 for no block; got {entry}")
    raise BlockTableError(f"{op}: block_tables[{b}, {j}] is -1 (no block) but sequence {b} reads "
                          f"positions {j * bs}..{j * bs + bs - 1} (seq_len {int(lens[b])}, "
                          f"window {window})")


# ---------------------------------------------------------------------------------------------
# Backend selection


def _cpu_kernel_missing(cpp_op):
    """Why frugal._C cannot run ``frugal::<cpp_op>`` on CPU tensors, beyond what
    :func:`frugal.dispatch.unavailable` says (the schema exists before its CPU kernel does)."""
    if _ext.ext() is None:
        return None  # dispatch.unavailable names the missing extension
    if not (hasattr(torch.ops.frugal, cpp_op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"frugal::{cpp_op}", "CPU")):
        return (f"backend='cpu': frugal._C has no CPU kernel for frugal::{cpp_op} yet (rebuild "
                f"the extension: pip install -e .)")
    return None


def _why_not(device, cpp_op, k_cache, v_cache, k_scale, v_scale):
    """{backend: why it cannot run this call}, for the reasons particular to the paged ops."""
    why = {}
    if device.type == "cpu":
        why["cpu"] = _cpu_kernel_missing(cpp_op)
    if unavailable("triton", device) is None:
        from frugal.kernels import paged_attention as kernel

        reason = kernel.unsupported(k_cache, v_cache, k_scale, v_scale)
        why["triton"] = None if reason is None else f"backend='triton': {reason}"
    return {name: reason for name, reason in why.items() if reason is not None}


def _select_paged(op, device, backend, explain, why):
    """:func:`frugal.dispatch.select` over _BACKENDS, minus the backends ``why`` rules out for
    this call: an explicit one raises BackendError with the reason, auto skips it."""
    if backend in why and unavailable(backend, device) is None:
        raise BackendError(f"{op}: {why[backend]}")
    order = {dev: tuple(name for name in names if name not in why)
             for dev, names in _ORDER.items()}
    choice = select(op, device, backend, order, _BACKENDS, explain)
    if explain and backend == "auto":
        ahead = _ORDER.get(device.type, ())
        ahead = ahead[:ahead.index(choice.backend)] if choice.backend in ahead else ahead
        notes = [f"{name}: {why[name]}" for name in ahead if name in why]
        if notes:
            choice = dataclasses.replace(choice, reason=f"{choice.reason}; skipped "
                                                        + "; ".join(notes))
    return choice


def _run_append(name, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    if name == "triton":
        torch.ops.frugal.paged_append_triton(k, v, k_cache, v_cache, slot_mapping, k_scale,
                                             v_scale)
    elif name == "cpu":
        torch.ops.frugal.paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        reference.paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


# ---------------------------------------------------------------------------------------------
# Ops


def _check_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    op = "paged_append"
    _check_caches(op, k_cache, v_cache, k_scale, v_scale)
    check_dtype(op, "k", k, _FLOATS)
    check_tensor(op, "v", v)
    if k.shape != v.shape:
        raise ShapeError(f"{op}: v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    if v.dtype != k.dtype:
        raise DTypeError(f"{op}: v must have k's dtype {k.dtype}; got {v.dtype}")
    if k.dim() != 3 or k.shape[1:] != k_cache.shape[2:]:
        raise ShapeError(f"{op}: k must be [num_tokens, {k_cache.shape[2]}, {k_cache.shape[3]}] "
                         f"([num_tokens, num_kv_heads, head_dim] of k_cache); got "
                         f"{tuple(k.shape)}")
    if k_cache.dtype != torch.int8 and k.dtype != k_cache.dtype:
        raise DTypeError(f"{op}: k must have the cache dtype {k_cache.dtype}; got {k.dtype}")
    check_dtype(op, "slot_mapping", slot_mapping, (torch.int32, torch.int64))
    if slot_mapping.shape != (k.shape[0],):
        raise ShapeError(f"{op}: slot_mapping must have shape ({k.shape[0]},) (one slot per "
                         f"token); got {tuple(slot_mapping.shape)}")
    check_same_device(op, k_cache=k_cache, k=k, v=v, slot_mapping=slot_mapping)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    slots = slot_mapping.long().sort().values
    out_of_range = slots >= num_slots
    repeated = (slots[1:] == slots[:-1]) & (slots[1:] >= 0)
    if not bool(out_of_range.any() | repeated.any()):
        return
    if out_of_range.any():
        raise BlockTableError(f"{op}: slot_mapping entries must be < {num_slots} (num_blocks * "
                              f"block_size), or negative for padding; got {int(slots[-1])}")
    raise BlockTableError(f"{op}: slot_mapping must not repeat a slot; slot "
                          f"{int(slots[1:][repeated][0])} appears more than once")


def _select_paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None, *,
                         backend="auto", explain=False):
    _check_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    why = _why_not(k_cache.device, "paged_append", k_cache, v_cache, k_scale, v_scale)
    return _select_paged("paged_append", k_cache.device, backend, explain, why)


def paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None, *,
                 backend="auto"):
    """Writes new keys and values into a paged cache, in place.

    Parameters
    ----------
    k, v : Tensor [N, Hkv, D], the cache dtype (any float dtype for int8 caches), any strides.
    k_cache, v_cache : Tensor [num_blocks, block_size, Hkv, D], float32, float16, bfloat16 or
        int8; block_size a power of two from 1 to 256.
    slot_mapping : Tensor [N] int32 or int64. Token i goes to offset ``slot % block_size`` of
        block ``slot // block_size``; a negative slot is padding and is skipped. Slots must be
        below ``num_blocks * block_size`` and must not repeat.
    k_scale, v_scale : Tensor [num_blocks, block_size, Hkv] float32, for int8 caches only: each
        head vector is stored as :func:`frugal.quantize_per_token` quantizes it, its scale here.
    backend : "auto" | "triton" | "cpu" | "torch". auto: Triton on CUDA tensors, C++ on CPU
        tensors, else PyTorch. Triton needs head_dim a multiple of 16 up to 256 and caches with
        unit stride in head_dim; every backend writes the same bytes (and int8 scales).

    Raises BlockTableError for slots out of range or repeated, before anything is written.
    """
    name = _select_paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                backend=backend)
    _run_append(name, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


paged_append._frugal_select = _select_paged_append


def _check_attention(op, q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale,
                     v_scale, q_lens=None):
    _check_caches(op, k_cache, v_cache, k_scale, v_scale)
    _check_scale(op, scale)
    _check_window(op, window)
    if op == "paged_attention":
        _check_query(op, q, k_cache, (3,), "3-d [batch, num_heads, head_dim]")
        rows = q.shape[0]
    else:
        _check_query(op, q, k_cache, (3, 4), "[batch, chunk, num_heads, head_dim] or packed "
                     "[num_tokens, num_heads, head_dim] with q_lens")
        if q.dim() == 4:
            if q_lens is not None:
                raise ShapeError(f"{op}: q_lens is only for packed 3-d q; q is 4-d "
                                 f"{tuple(q.shape)}")
            rows = q.shape[0]
        else:
            if q_lens is None:
                raise ShapeError(f"{op}: packed 3-d q {tuple(q.shape)} needs q_lens (int32 "
                                 f"[batch])")
            check_dtype(op, "q_lens", q_lens, (torch.int32,))
            if q_lens.dim() != 1:
                raise ShapeError(f"{op}: q_lens must be 1-d [batch]; got shape "
                                 f"{tuple(q_lens.shape)}")
            rows = q_lens.shape[0]
            _check_int_vector(op, "q_lens", q_lens, rows, k_cache.device)
    _check_tables(op, block_tables, seq_lens, rows, k_cache)
    if q.dim() == 4:
        q_lens = torch.full((rows,), q.shape[1], dtype=torch.int32, device=q.device)
    _check_table_contents(op, block_tables, seq_lens, k_cache, window, q_lens,
                          q.shape[0] * q.shape[1] if q.dim() == 4 else q.shape[0])


def _select_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None, window=None,
                            k_scale=None, v_scale=None, *, backend="auto", explain=False):
    _check_attention("paged_attention", q, k_cache, v_cache, block_tables, seq_lens, scale,
                     window, k_scale, v_scale)
    why = _why_not(q.device, "paged_attention", k_cache, v_cache, k_scale, v_scale)
    return _select_paged("paged_attention", q.device, backend, explain, why)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None, window=None,
                    k_scale=None, v_scale=None, *, backend="auto"):
    """Decode attention: one query per sequence over its paged keys and values.

    Parameters
    ----------
    q : Tensor [B, Hq, D], float32, float16 or bfloat16 (the cache dtype unless the cache is
        int8), any strides. Query b sits at position ``seq_lens[b] - 1``.
    k_cache, v_cache : Tensor [num_blocks, block_size, Hkv, D]; Hq must be a multiple of Hkv
        (query head h reads kv head ``h // (Hq // Hkv)``).
    block_tables : Tensor [B, max_blocks] int32. Entries in [0, num_blocks), or -1 for no block;
        every entry covering a position the query reads must be a block.
    seq_lens : Tensor [B] int32, each in [0, max_blocks * block_size]. Length 0 gives zeros.
    scale : float, default ``D ** -0.5``.
    window : int or None. Query at position p reads keys at positions ``p - window < j <= p``.
    k_scale, v_scale : Tensor [num_blocks, block_size, Hkv] float32, for int8 caches only.
    backend : "auto" | "triton" | "cpu" | "torch". auto: Triton on CUDA tensors, C++ on CPU
        tensors, else PyTorch. Triton needs head_dim a multiple of 16 up to 256 and caches with
        unit stride in head_dim.

    Returns
    -------
    Tensor [B, Hq, D] in q's dtype (softmax and sums in float32).

    Table entries and lengths are checked on the host before anything runs (one sync):
    BlockTableError, never an out-of-bounds read.
    """
    name = _select_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, window,
                                   k_scale, v_scale, backend=backend)
    if name == "torch":
        return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                         window, k_scale, v_scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    window = 0 if window is None else min(window, _MAX_WINDOW)
    op = torch.ops.frugal.paged_attention_triton if name == "triton" else \
        torch.ops.frugal.paged_attention
    return op(q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale, v_scale)


paged_attention._frugal_select = _select_paged_attention


def _select_paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens=None,
                                    scale=None, window=None, k_scale=None, v_scale=None, *,
                                    backend="auto", explain=False):
    _check_attention("paged_prefill_attention", q, k_cache, v_cache, block_tables, seq_lens,
                     scale, window, k_scale, v_scale, q_lens)
    why = _why_not(q.device, "paged_prefill_attention", k_cache, v_cache, k_scale, v_scale)
    if "triton" not in why and unavailable("triton", q.device) is None:
        from frugal.kernels import paged_attention as kernel

        reason = kernel.prefill_unsupported(q.dtype, q.shape[-1])
        if reason is not None:
            why["triton"] = f"backend='triton': {reason}"
    return _select_paged("paged_prefill_attention", q.device, backend, explain, why)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens=None, scale=None,
                            window=None, k_scale=None, v_scale=None, *, backend="auto"):
    """Chunked prefill: each sequence's new chunk of queries attends to its cached prefix
    (paged) and causally within the chunk. The chunk's keys and values must already be in the
    cache (append first), and ``seq_lens`` counts them.

    Parameters
    ----------
    q : Tensor [B, T, Hq, D] (T queries per sequence), or packed [N, Hq, D] with ``q_lens``;
        any strides. The n_b queries of sequence b sit at positions
        ``[seq_lens[b] - n_b, seq_lens[b])``.
    q_lens : Tensor [B] int32, packed q only: sequence b owns the next q_lens[b] rows of q;
        each in [0, seq_lens[b]], summing to N.
    k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale, v_scale, backend :
        as :func:`paged_attention`. The query at position p reads keys ``p - window < j <= p``.
        backend auto: the Triton kernel on CUDA tensors (flash-style: q tiles of BLOCK_M
        (token, query head) rows of one kv head, ``tl.dot`` over the paged blocks up to each
        tile's causal limit), the C++ kernel on CPU tensors, else PyTorch; Triton has the same
        head_dim and stride needs as for :func:`paged_attention`, and head_dim <= 128 for
        float32 q.

    Returns
    -------
    Tensor of q's shape and dtype (softmax and sums in float32). Decode is the case of one
    query per sequence.

    The kernels take q packed as [N, Hq, D] with ``cu_seqlens_q`` int32 [B + 1] (the vLLM /
    FlashAttention varlen layout); 4-d q is reshaped to it, packed q's q_lens are summed into it.
    """
    name = _select_paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens,
                                           scale, window, k_scale, v_scale, backend=backend)
    if name == "torch":
        return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                 q_lens, scale, window, k_scale, v_scale)
    hq, d = q.shape[-2:]
    if q.dim() == 4:
        rows = q.reshape(-1, hq, d)
        cu_seqlens_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device) * q.shape[1]
        max_q_len = q.shape[1]
    else:
        rows = q
        cu_seqlens_q = torch.nn.functional.pad(torch.cumsum(q_lens, 0, dtype=torch.int32), (1, 0))
        max_q_len = int(q_lens.max()) if q_lens.numel() else 0  # the Triton grid (one sync)
    scale = d**-0.5 if scale is None else float(scale)
    window = 0 if window is None else min(window, _MAX_WINDOW)
    if name == "triton":
        out = torch.ops.frugal.paged_prefill_attention_triton(
            rows, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale,
            window, k_scale, v_scale)
    else:
        out = torch.ops.frugal.paged_prefill_attention(rows, k_cache, v_cache, block_tables,
                                                       seq_lens, cu_seqlens_q, scale, window,
                                                       k_scale, v_scale)
    return out.reshape(q.shape)


paged_prefill_attention._frugal_select = _select_paged_prefill_attention


# ---------------------------------------------------------------------------------------------
# Memory accounting


@dataclasses.dataclass(frozen=True)
class CacheUsage:
    """What a :class:`PagedKVCache` holds (:meth:`PagedKVCache.usage`).

    ``blocks_used`` are referenced by a sequence; ``blocks_free`` can be allocated, and
    ``blocks_cached`` of them still hold a prefix-cache block that a new sequence may reuse
    until an allocation takes it. ``tokens`` counts the token slots of used blocks that hold a
    token of some sequence (a shared block counts once); ``utilization`` is the share of used
    bytes those tokens need (1.0 when nothing is used).
    """

    blocks_total: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    bytes_total: int
    bytes_used: int
    tokens: int
    token_bytes: int
    utilization: float


@dataclasses.dataclass(frozen=True)
class KVFootprint:
    """KV slots a batch of sequences needs, paged vs a dense max-length cache
    (:func:`kv_footprint`). ``*_overhead`` is slots held per token needed, minus 1."""

    tokens: int
    paged_slots: int
    dense_slots: int
    paged_overhead: float
    dense_overhead: float


def kv_footprint(lengths, block_size=16):
    """Token slots that a paged cache (whole blocks of ``block_size`` per sequence) and a dense
    cache (every sequence padded to the longest) hold for sequences of ``lengths``.

    Example: lengths uniform in [256, 4096] with block_size 16 give a paged overhead under 1%
    (at most block_size - 1 slots per sequence) against 80 to 90% for the dense cache.
    """
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"kv_footprint: lengths must be >= 0; got {lengths}")
    if not _is_block_size(block_size):
        raise ValueError(f"kv_footprint: block_size must be a power of two from 1 to 256; got "
                         f"{block_size!r}")
    tokens = sum(lengths)
    paged = sum(-(-n // block_size) * block_size for n in lengths)
    dense = len(lengths) * max(lengths, default=0)
    over = (lambda slots: slots / tokens - 1.0) if tokens else (lambda slots: 0.0)
    return KVFootprint(tokens, paged, dense, over(paged), over(dense))


# ---------------------------------------------------------------------------------------------
# The manager


def _chain_hash(parent, ids):
    """Hash of a full block: its parent block's hash (b"" for the first block) and its ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array.array("q", ids).tobytes())
    return h.digest()


class _Sequence:
    """Host-side state of one sequence.

    blocks: table row (block ids, -1 where a window gave the block back).
    lens: tokens written, per layer.
    token_ids: ids of positions 0, 1, ... as far as they are known without a gap.
    hashes: chained hash of each leading full block whose ids are known and whose every layer
    is written.
    """

    __slots__ = ("blocks", "lens", "token_ids", "hashes")

    def __init__(self, blocks, lens, token_ids, hashes):
        self.blocks, self.lens, self.token_ids, self.hashes = blocks, lens, token_ids, hashes


class PagedKVCache:
    """A paged KV cache for ``num_layers`` layers and the manager of its blocks.

    Parameters
    ----------
    num_layers, num_blocks, num_kv_heads, head_dim : int >= 1.
    block_size : int, a power of two from 1 to 256 (tokens per block).
    dtype : float16, bfloat16, float32, or int8 (per-token, per-head float32 scales beside).
    device : where the cache tensors live.
    window : int or None. With a window, each append first gives back the blocks of its
        sequences that lie wholly before ``min(lens) - window`` (see :meth:`trim`), and
        :meth:`attention` uses the window by default.

    Attributes
    ----------
    k_cache, v_cache : Tensor [num_layers, num_blocks, block_size, num_kv_heads, head_dim].
    k_scale, v_scale : Tensor [num_layers, num_blocks, block_size, num_kv_heads] float32 for
        int8 caches, else None.

    Notes
    -----
    Sequences are named by any hashable id. Every layer keeps its own length, so a model
    appends and attends layer by layer (``append(0, ...)``, ``attention(q, 0, ...)``,
    ``append(1, ...)``, ...); the first layer to reach a position allocates its block and the
    other layers write into the same block. Block tables are shared by all layers.

    Blocks are reference counted. :meth:`fork` shares every block of the parent; a write into a
    block that another sequence also references copies it first, in every layer
    (copy-on-write). :meth:`free` drops references; a block whose count reaches 0 is free.

    Prefix caching works on full blocks identified by a chained hash of their token ids (the
    parent block's hash and the block's own ids), so two blocks match only if the whole prefix
    up to their end matches. A block is registered once its ids are known and every layer has
    written it; ids are known from :meth:`add_sequence` (the prompt) or from ``token_ids`` of
    the append that first writes a position, and only without a gap from position 0. Reuse
    happens in :meth:`add_sequence` only: a new sequence starts with the longest run of
    registered blocks matching its prompt, leaving at least one prompt token to compute.
    Registered blocks that no sequence references stay reusable (``usage().blocks_cached``)
    until an allocation takes them, least recently released first, after the never-registered
    free blocks.

    Every method checks all of its arguments and plans its allocations before changing
    anything: on an error, including :class:`CacheFullError`, every sequence, table, count and
    cache tensor is as it was.
    """

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                 dtype=torch.float16, device="cpu", window=None):
        op = "PagedKVCache"
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not (_is_int(value) and value >= 1):
                raise ValueError(f"{op}: {name} must be an int >= 1; got {value!r}")
        if not _is_block_size(block_size):
            raise ValueError(f"{op}: block_size must be a power of two from 1 to 256; got "
                             f"{block_size!r}")
        if dtype not in _CACHE_DTYPES:
            raise DTypeError(f"{op}: dtype must be float32, float16, bfloat16 or int8; got "
                             f"{dtype}")
        _check_window(op, window)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.window = window
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = empty_cache(shape, dtype, device).zero_()
        self.v_cache = empty_cache(shape, dtype, device).zero_()
        self.device = self.k_cache.device
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
        self._seqs = {}
        self._ref = [0] * num_blocks
        self._free = collections.deque(range(num_blocks))
        self._cached = collections.OrderedDict()  # registered blocks with count 0, LRU first
        self._block_hash = {}
        self._hash_block = {}

    # -- sequences --------------------------------------------------------------------------

    def __contains__(self, seq_id):
        return seq_id in self._seqs

    def _seq(self, op, seq_id):
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise SequenceError(f"{op}: sequence {seq_id!r} is not in the cache (never added, "
                                f"or freed)") from None

    def _seq_list(self, op, seq_ids):
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        if not isinstance(seq_ids, (list, tuple, range)):
            raise TypeError(f"{op}: seq_ids must be a list or tuple of sequence ids; got "
                            f"{type(seq_ids).__name__}")
        seqs = [self._seq(op, s) for s in seq_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise SequenceError(f"{op}: seq_ids must not repeat a sequence; got {list(seq_ids)}")
        return list(seq_ids), seqs

    def _new_id(self, op, seq_id):
        try:
            present = seq_id in self._seqs
        except TypeError:
            raise SequenceError(f"{op}: a sequence id must be hashable; got {seq_id!r}") from None
        if present:
            raise SequenceError(f"{op}: sequence {seq_id!r} is already in the cache")

    def _token_list(self, op, token_ids, count):
        ids = torch.as_tensor(token_ids)
        if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex
                            or ids.dtype == torch.bool):
            raise DTypeError(f"{op}: token_ids must be integers; got {ids.dtype}")
        if count is not None and ids.numel() != count:
            raise ShapeError(f"{op}: token_ids must hold {count} ids (one per new token); got "
                             f"{ids.numel()}")
        return ids.reshape(-1).tolist()

    def add_sequence(self, seq_id, token_ids=None):
        """Adds an empty sequence, or one that starts with its prompt's cached prefix.

        Parameters
        ----------
        seq_id : hashable, not already in the cache.
        token_ids : 1-d ints (list or tensor), the prompt, or None. With ids, the sequence
            shares the longest run of registered full blocks that match the prompt (all but its
            last token), and the ids of every prompt position are recorded, so appends of the
            prompt may omit them.

        Returns
        -------
        int : tokens already in the cache (a multiple of block_size, less than the prompt's
            length): append keys and values from that position on.
        """
        op = "add_sequence"
        self._new_id(op, seq_id)
        ids = [] if token_ids is None else self._token_list(op, token_ids, None)
        bs = self.block_size
        blocks, hashes, parent = [], [], b""
        for j in range((len(ids) - 1) // bs if ids else 0):
            h = _chain_hash(parent, ids[j * bs:(j + 1) * bs])
            block = self._hash_block.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        for block in blocks:
            if self._ref[block] == 0:
                del self._cached[block]
            self._ref[block] += 1
        n = len(blocks) * bs
        self._seqs[seq_id] = _Sequence(blocks, [n] * self.num_layers, ids, hashes)
        return n

    def fork(self, parent, child):
        """Adds sequence ``child`` sharing every block of ``parent`` (its tokens, token ids and
        per-layer lengths). Either may be appended to afterwards; a write into a shared block
        copies it first."""
        op = "fork"
        p = self._seq(op, parent)
        self._new_id(op, child)
        for block in p.blocks:
            if block >= 0:
                self._ref[block] += 1
        self._seqs[child] = _Sequence(list(p.blocks), list(p.lens), list(p.token_ids),
                                      list(p.hashes))

    def free(self, seq_id):
        """Removes a sequence and drops its references; blocks no one references are free."""
        seq = self._seq("free", seq_id)
        for block in seq.blocks:
            if block >= 0:
                self._release(block)
        del self._seqs[seq_id]

    def trim(self, seq_id, window):
        """Gives back the blocks of ``seq_id`` whose every position is before
        ``min(lens) - window``: no query at a written position, attending to its last
        ``window`` tokens, reads them. Their table entries become -1; positions keep their
        entries. Returns the number of entries dropped."""
        op = "trim"
        seq = self._seq(op, seq_id)
        _check_window(op, window)
        dropped = self._trimmable(seq, window)
        for j in dropped:
            self._release(seq.blocks[j])
            seq.blocks[j] = -1
        return len(dropped)

    def _trimmable(self, seq, window):
        full = max(0, min(seq.lens) - window) // self.block_size
        return [j for j in range(min(full, len(seq.blocks))) if seq.blocks[j] >= 0]

    # -- blocks -----------------------------------------------------------------------------

    def _release(self, block):
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if block in self._block_hash:
                self._cached[block] = None
            else:
                self._free.append(block)

    def _take(self):
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._cached.popitem(last=False)
            del self._hash_block[self._block_hash.pop(block)]
        self._ref[block] = 1
        return block

    # -- writing ----------------------------------------------------------------------------

    def _parse_append(self, op, layer, seq_ids, k, v, num_tokens, token_ids):
        if not (_is_int(layer) and 0 <= layer < self.num_layers):
            raise ValueError(f"{op}: layer must be an int in [0, {self.num_layers}); got "
                             f"{layer!r}")
        seq_ids, seqs = self._seq_list(op, seq_ids)
        check_dtype(op, "k", k, _FLOATS)
        check_tensor(op, "v", v)
        if k.shape != v.shape:
            raise ShapeError(f"{op}: v must have k's shape {tuple(k.shape)}; got "
                             f"{tuple(v.shape)}")
        if v.dtype != k.dtype:
            raise DTypeError(f"{op}: v must have k's dtype {k.dtype}; got {v.dtype}")
        if self.dtype != torch.int8 and k.dtype != self.dtype:
            raise DTypeError(f"{op}: k must have the cache dtype {self.dtype}; got {k.dtype}")
        for name, t in (("k", k), ("v", v)):
            if t.device != self.device:
                raise DeviceError(f"{op}: {name} must be on the cache's device ({self.device}); "
                                  f"got {t.device}")
        heads = (self.num_kv_heads, self.head_dim)
        s = len(seqs)
        if k.dim() == 4 and k.shape[0] == s and k.shape[2:] == heads and num_tokens is None:
            counts = [k.shape[1]] * s
        elif k.dim() == 3 and k.shape[1:] == heads:
            counts = [1] * s if num_tokens is None else num_tokens
            if not (isinstance(counts, (list, tuple)) and all(map(_is_int, counts))
                    and len(counts) == s and sum(counts) == k.shape[0]):
                raise ShapeError(f"{op}: num_tokens must list one int per sequence ({s}) summing "
                                 f"to k's {k.shape[0]} rows; got {num_tokens!r}")
        else:
            raise ShapeError(f"{op}: k must be [{s}, T, {heads[0]}, {heads[1]}] (T tokens per "
                             f"sequence) or packed [num_tokens, {heads[0]}, {heads[1]}]; got "
                             f"{tuple(k.shape)}"
                             + (" with num_tokens" if num_tokens is not None else ""))
        if any(t < 1 for t in counts):
            raise ShapeError(f"{op}: every sequence must get at least one token; got {counts}")
        ids = None if token_ids is None else self._token_list(op, token_ids, sum(counts))
        return seq_ids, seqs, counts, ids

    def _check_known_ids(self, op, layer, seq_ids, seqs, counts, ids):
        """Ids given for positions whose ids are known must match them."""
        offset = 0
        for seq_id, seq, t in zip(seq_ids, seqs, counts):
            start = seq.lens[layer]
            known = seq.token_ids[start:start + t]
            if known != ids[offset:offset + len(known)]:
                raise SequenceError(f"{op}: token_ids of sequence {seq_id!r} at positions "
                                    f"{start}..{start + t - 1} differ from its recorded ids "
                                    f"{known}")
            offset += t

    def append(self, layer, seq_ids, k, v, num_tokens=None, token_ids=None, *, backend="auto"):
        """Appends keys and values of one layer for one or many sequences.

        Parameters
        ----------
        layer : int in [0, num_layers).
        seq_ids : list of distinct sequence ids in the cache.
        k, v : Tensor [S, T, Hkv, D] (T >= 1 tokens for each of the S sequences), or packed
            [N, Hkv, D]: ``num_tokens[i]`` rows for ``seq_ids[i]`` in order (one each when
            num_tokens is None). The cache dtype, or any float dtype for int8 caches.
        num_tokens : list of ints >= 1, packed k only.
        token_ids : ints, one per new token (shape [S, T] or [N]), or None. Recorded for the
            positions this call is the first to write, for prefix caching; where ids are
            already known they must match.
        backend : "auto" | "triton" | "cpu" | "torch", the :func:`paged_append` backend.

        With a cache window, first gives back the sequences' blocks that lie wholly outside it
        (:meth:`trim`). Then allocates the blocks the new tokens need and copies shared blocks
        written into, all planned first: raises CacheFullError, with nothing changed, when too
        few blocks are free (counting those the window would give back). The new tokens of
        ``layer`` sit at positions ``[lens[layer], lens[layer] + T)``.
        """
        op = "append"
        seq_ids, seqs, counts, ids = self._parse_append(op, layer, seq_ids, k, v, num_tokens,
                                                        token_ids)
        if ids is not None:
            self._check_known_ids(op, layer, seq_ids, seqs, counts, ids)
        name = self._append_backend(backend)
        trims, copies, grows = self._plan(op, layer, seqs, counts)

        for seq, dropped in zip(seqs, trims):
            for j in dropped:
                self._release(seq.blocks[j])
                seq.blocks[j] = -1
        src, dst = [], []
        for seq, j in copies:
            src.append(seq.blocks[j])
            self._release(seq.blocks[j])
            seq.blocks[j] = self._take()
            dst.append(seq.blocks[j])
        for seq, grow in zip(seqs, grows):
            seq.blocks.extend(self._take() for _ in range(grow))
        if src:
            src_t = torch.tensor(src, device=self.device)
            dst_t = torch.tensor(dst, device=self.device)
            for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale):
                if t is not None:
                    t.index_copy_(1, dst_t, t.index_select(1, src_t))

        starts = [seq.lens[layer] for seq in seqs]
        self._write(layer, seqs, starts, counts, k, v, name)
        offset = 0
        for seq, start, t in zip(seqs, starts, counts):
            frontier = max(seq.lens)
            seq.lens[layer] = start + t
            known = len(seq.token_ids)
            if ids is not None and max(start, frontier) <= known < start + t:
                seq.token_ids.extend(ids[offset + known - start:offset + t])
            offset += t
            self._register(seq)

    def _plan(self, op, layer, seqs, counts):
        """Blocks each sequence gives back (window), copy-on-write copies and new blocks, and
        CacheFullError if the free blocks (with those given back) do not cover them."""
        bs = self.block_size
        delta = collections.Counter()
        released = 0
        trims = []
        for seq in seqs:
            dropped = [] if self.window is None else self._trimmable(seq, self.window)
            for j in dropped:
                delta[seq.blocks[j]] -= 1
                released += self._ref[seq.blocks[j]] + delta[seq.blocks[j]] == 0
            trims.append(dropped)
        copies, grows = [], []
        for seq, t in zip(seqs, counts):
            start, end = seq.lens[layer], seq.lens[layer] + t
            last = -(-end // bs)
            for j in range(start // bs, min(last, len(seq.blocks))):
                block = seq.blocks[j]
                if self._ref[block] + delta[block] > 1:
                    copies.append((seq, j))
                    delta[block] -= 1
            grows.append(max(0, last - len(seq.blocks)))
        need = len(copies) + sum(grows)
        have = len(self._free) + len(self._cached) + released
        if need > have:
            by_window = ("" if self.window is None
                         else f" ({released} of them given back by the window)")
            raise CacheFullError(
                f"{op}: needs {need} free blocks ({sum(grows)} new, {len(copies)} copy-on-write "
                f"copies) but {have} of {self.num_blocks} are free{by_window}; every sequence is "
                f"unchanged")
        return trims, copies, grows

    def _append_backend(self, backend):
        """The :func:`paged_append` backend of this cache's writes (BackendError if it cannot
        run); the layout is the same for every layer."""
        k_scale, v_scale = self._scales(0)
        why = _why_not(self.device, "paged_append", self.k_cache[0], self.v_cache[0], k_scale,
                       v_scale)
        return _select_paged("paged_append", self.device, backend, False, why)

    def _write(self, layer, seqs, starts, counts, k, v, backend):
        bs = self.block_size
        width = max(len(seq.blocks) for seq in seqs)
        table = torch.tensor([seq.blocks + [-1] * (width - len(seq.blocks)) for seq in seqs],
                             dtype=torch.int64)
        counts_t = torch.tensor(counts)
        row = torch.repeat_interleave(torch.arange(len(seqs)), counts_t)
        first = torch.cumsum(counts_t, 0) - counts_t
        pos = torch.tensor(starts)[row] + torch.arange(len(row)) - first[row]
        slots = (table[row, pos // bs] * bs + pos % bs).to(device=self.device, dtype=torch.int32)
        heads = (self.num_kv_heads, self.head_dim)
        _run_append(backend, k.reshape(-1, *heads), v.reshape(-1, *heads), self.k_cache[layer],
                    self.v_cache[layer], slots, *self._scales(layer))

    def _scales(self, layer):
        if self.k_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def _register(self, seq):
        """Hashes the sequence's newly complete full blocks and registers blocks not yet
        cached under their hash."""
        bs = self.block_size
        full = min(min(seq.lens), len(seq.token_ids)) // bs
        for j in range(len(seq.hashes), full):
            parent = seq.hashes[-1] if seq.hashes else b""
            h = _chain_hash(parent, seq.token_ids[j * bs:(j + 1) * bs])
            seq.hashes.append(h)
            block = seq.blocks[j]
            if block >= 0 and h not in self._hash_block and block not in self._block_hash:
                self._hash_block[h] = block
                self._block_hash[block] = h

    # -- reading ----------------------------------------------------------------------------

    def block_tables(self, seq_ids):
        """int32 [len(seq_ids), max_blocks] on the cache's device: the sequences' table rows,
        padded with -1 to the longest (entries a window gave back are -1 too)."""
        _, seqs = self._seq_list("block_tables", seq_ids)
        width = max((len(seq.blocks) for seq in seqs), default=0)
        rows = [seq.blocks + [-1] * (width - len(seq.blocks)) for seq in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(seqs), width)

    def seq_lens(self, seq_ids, layer=None):
        """int32 [len(seq_ids)] on the cache's device: tokens written in ``layer``, or in every
        layer (the least per-layer length) when layer is None."""
        op = "seq_lens"
        _, seqs = self._seq_list(op, seq_ids)
        if layer is not None and not (_is_int(layer) and 0 <= layer < self.num_layers):
            raise ValueError(f"{op}: layer must be None or an int in [0, {self.num_layers}); "
                             f"got {layer!r}")
        lens = [min(seq.lens) if layer is None else seq.lens[layer] for seq in seqs]
        return torch.tensor(lens, dtype=torch.int32, device=self.device)

    def _layer_args(self, op, layer, seq_ids):
        if not (_is_int(layer) and 0 <= layer < self.num_layers):
            raise ValueError(f"{op}: layer must be an int in [0, {self.num_layers}); got "
                             f"{layer!r}")
        self._seq_list(op, seq_ids)
        return (self.k_cache[layer], self.v_cache[layer], self.block_tables(seq_ids),
                self.seq_lens(seq_ids, layer), self._scales(layer))

    def attention(self, q, layer, seq_ids, window=None, scale=None, *, backend="auto"):
        """Decode attention of ``q`` [len(seq_ids), Hq, D] over the sequences' tokens in
        ``layer`` (:func:`paged_attention`); window defaults to the cache's window."""
        k, v, tables, lens, (ks, vs) = self._layer_args("attention", layer, seq_ids)
        window = self.window if window is None else window
        return paged_attention(q, k, v, tables, lens, scale, window, ks, vs, backend=backend)

    def prefill_attention(self, q, layer, seq_ids, q_lens=None, window=None, scale=None, *,
                          backend="auto"):
        """Chunked-prefill attention (:func:`paged_prefill_attention`) of the sequences' latest
        chunk, already appended in ``layer``: q [len(seq_ids), T, Hq, D], or packed [N, Hq, D]
        with q_lens (list or int32 tensor); window defaults to the cache's window."""
        k, v, tables, lens, (ks, vs) = self._layer_args("prefill_attention", layer, seq_ids)
        if isinstance(q_lens, (list, tuple)):
            q_lens = torch.tensor(q_lens, dtype=torch.int32, device=self.device)
        window = self.window if window is None else window
        return paged_prefill_attention(q, k, v, tables, lens, q_lens, scale, window, ks, vs,
                                       backend=backend)

    def usage(self):
        """A :class:`CacheUsage`: blocks used, free and cached, bytes, tokens held."""
        bs = self.block_size
        filled = {}
        for seq in self._seqs.values():
            n = max(seq.lens)
            for j, block in enumerate(seq.blocks):
                if block >= 0:
                    filled[block] = max(filled.get(block, 0), min(bs, n - j * bs))
        token_bytes = 2 * self.num_layers * self.num_kv_heads * (
            self.head_dim * self.k_cache.element_size() + (4 if self.k_scale is not None else 0))
        used = len(filled)
        tokens = sum(filled.values())
        return CacheUsage(
            blocks_total=self.num_blocks,
            blocks_used=used,
            blocks_free=self.num_blocks - used,
            blocks_cached=len(self._cached),
            bytes_total=self.num_blocks * bs * token_bytes,
            bytes_used=used * bs * token_bytes,
            tokens=tokens,
            token_bytes=tokens * token_bytes,
            utilization=tokens / (used * bs) if used else 1.0,
        )
