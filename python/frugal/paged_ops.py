"""Paged KV-cache ops: :func:`paged_append`, :func:`paged_attention` and
:func:`paged_prefill_attention` read and write one layer's paged cache through block tables,
as in vLLM. The manager (:class:`frugal.PagedKVCache`) sits on top of them, and its per-step
plan (:class:`frugal.paged_kv_cache.StepPlan`) is the seam between the two: it builds and
validates the tables once per step and runs the implementations declared here
(``PAGED_APPEND``, ``PAGED_ATTENTION``, ``PAGED_PREFILL`` in :mod:`frugal.registry`), which skip
the content checks.

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

Validation
----------
The public ops check every argument, table entries and lengths included: one reduction on the
tables' device and one host sync per call (the price of never reading out of bounds on tables a
user built). The implementations check nothing; :class:`~frugal.paged_kv_cache.StepPlan` runs
them with tables the manager built and validated on the host.

Backends: the CUDA C++ kernels (``csrc/cuda/paged_attention.cu``) and the Triton kernels on
CUDA tensors (``frugal.kernels.paged_attention``: GQA-packed tensor-core decode with split-KV,
flash-style chunked prefill) and the C++ kernels
(``frugal._C``) on CPU tensors, each falling back to the PyTorch reference where it cannot run.
"""

from typing import Optional, Tuple

import numpy as np
import torch

from . import _ext, dispatch, reference
from .dispatch import triton_custom_op
from .errors import (
    DeviceError,
    DTypeError,
    FrugalError,
    ShapeError,
    check_dtype,
    check_same_device,
    check_scale,
    check_tensor,
)
from .registry import Op, cpp_kernel
from .score_mods import check_alibi_slopes, check_softcap

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
CACHE_DTYPES = FLOATS + (torch.int8,)
MAX_WINDOW = 2**31 - 1  # a longer window reads what no window reads

if _ext.ext() is not None and hasattr(torch.ops.frugal, "paged_attention"):

    @torch.library.register_fake("frugal::paged_attention")
    def _paged_attention_fake(q, k_cache, v_cache, block_tables, seq_lens, scale, window,
                              k_scale, v_scale, softcap=0.0, alibi_slopes=None):
        return q.new_empty(q.shape)


if _ext.ext() is not None and hasattr(torch.ops.frugal, "paged_attention_lse"):

    @torch.library.register_fake("frugal::paged_attention_lse")
    def _paged_attention_lse_fake(q, k_cache, v_cache, block_tables, seq_lens, scale, window,
                                  k_scale, v_scale, softcap=0.0, alibi_slopes=None):
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


if _ext.ext() is not None and hasattr(torch.ops.frugal, "paged_append"):

    @torch.library.register_fake("frugal::paged_append")
    def _paged_append_fake(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
        return None


@triton_custom_op("frugal::paged_attention_triton", mutates_args=("ws_o", "ws_lse"))
def _paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            window: int, k_scale: Optional[torch.Tensor],
                            v_scale: Optional[torch.Tensor], max_seq_len: int,
                            ws_o: Optional[torch.Tensor], ws_lse: Optional[torch.Tensor],
                            softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    from frugal.kernels import paged_attention as kernel

    return kernel.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, window,
                                  k_scale, v_scale, max_seq_len=max_seq_len,
                                  workspace=None if ws_o is None else (ws_o, ws_lse),
                                  return_lse=True, softcap=softcap, alibi_slopes=alibi_slopes)


@_paged_attention_triton.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale, v_scale, max_seq_len,
      ws_o, ws_lse, softcap=0.0, alibi_slopes=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


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
                                      scale, window, k_scale, v_scale, softcap=0.0,
                                      alibi_slopes=None):
        return q.new_empty(q.shape)


if _ext.ext() is not None and hasattr(torch.ops.frugal, "paged_prefill_attention_lse"):

    @torch.library.register_fake("frugal::paged_prefill_attention_lse")
    def _paged_prefill_attention_lse_fake(q, k_cache, v_cache, block_tables, seq_lens,
                                          cu_seqlens_q, scale, window, k_scale, v_scale,
                                          softcap=0.0, alibi_slopes=None):
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@triton_custom_op("frugal::paged_prefill_attention_triton")
def _paged_prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor,
                                    v_cache: torch.Tensor, block_tables: torch.Tensor,
                                    seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    max_q_len: int, scale: float, window: int,
                                    k_scale: Optional[torch.Tensor],
                                    v_scale: Optional[torch.Tensor], softcap: float = 0.0,
                                    alibi_slopes: Optional[torch.Tensor] = None
                                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    from frugal.kernels import paged_attention as kernel

    return kernel.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                          cu_seqlens_q, max_q_len, scale, window, k_scale,
                                          v_scale, return_lse=True, softcap=softcap,
                                          alibi_slopes=alibi_slopes)


@_paged_prefill_attention_triton.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale, window,
      k_scale, v_scale, softcap=0.0, alibi_slopes=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)




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


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def is_block_size(bs):
    return is_int(bs) and 1 <= bs <= 256 and bs & (bs - 1) == 0


def check_window(op, window):
    if window is not None and not (is_int(window) and window >= 1):
        raise ValueError(f"{op}: window must be None or an int >= 1; got {window!r}")


def _check_caches(op, k_cache, v_cache, k_scale, v_scale):
    check_dtype(op, "k_cache", k_cache, CACHE_DTYPES)
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
    if k_cache.shape[2] < 1 or k_cache.shape[3] < 1:
        raise ShapeError(f"{op}: k_cache must have at least one kv head and head_dim >= 1 "
                         f"([num_blocks, block_size, num_kv_heads, head_dim]); got shape "
                         f"{tuple(k_cache.shape)}")
    if not is_block_size(k_cache.shape[1]):
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
    check_dtype(op, "q", q, FLOATS)
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


_C_TABLES_BAD = getattr(_ext.ext(), "paged_tables_bad", None)


def _cpu_tables_bad(block_tables, seq_lens, num_blocks, bs, window, q_lens, q_rows):
    """_check_table_contents's test on CPU tables: True when something is wrong (the torch path
    then finds and names it). In C++ (csrc/cpu/paged_checks.cpp, about 1 us) when built, else
    numpy (about 10 us, where a dozen small torch ops take ~80 us)."""
    if _C_TABLES_BAD is not None and block_tables.numel() > 0 and seq_lens.numel() > 0 and (
            q_lens is None or q_lens.numel() > 0):
        rows, width = block_tables.shape
        s0, s1 = block_tables.stride()
        return _C_TABLES_BAD(
            block_tables.data_ptr(), rows, width, s0, s1, seq_lens.data_ptr(),
            seq_lens.stride(0), 0 if q_lens is None else q_lens.data_ptr(),
            0 if q_lens is None else q_lens.stride(0), q_rows or 0, num_blocks, bs,
            0 if window is None else window)
    t = block_tables.numpy()
    lens = seq_lens.numpy().astype(np.int64)
    n = np.int64(1) if q_lens is None else q_lens.numpy().astype(np.int64)
    width = t.shape[1]
    starts = np.arange(width, dtype=np.int64) * bs
    read = starts < lens[:, None]
    if window is not None:
        read &= starts + bs > np.maximum(lens - n - window + 1, 0)[:, None]
    if ((t < -1) | (t >= num_blocks) | (read & (t < 0))).any():
        return True
    if ((lens < 0) | (lens > width * bs)).any():
        return True
    return q_lens is not None and bool(((n < 0) | (n > lens)).any() or n.sum() != q_rows)


def _check_table_contents(op, block_tables, seq_lens, k_cache, window, q_lens=None, q_rows=None):
    """Every entry in [-1, num_blocks), every entry the op reads >= 0, seq_lens within the rows,
    q_lens within seq_lens and summing to q's rows: one reduction, one host sync."""
    if block_tables.device.type == "meta":
        raise DeviceError(f"{op}: block_tables on the meta device hold no entries to check; the "
                          f"op validates its tables (for shape propagation, run a "
                          f"PagedKVCache.plan step under FakeTensorMode)")
    num_blocks, bs = k_cache.shape[:2]
    width = block_tables.shape[1]
    window = None if window is None else min(window, MAX_WINDOW)  # longer: no window
    if block_tables.device.type == "cpu" and not _cpu_tables_bad(
            block_tables, seq_lens, num_blocks, bs, window, q_lens, q_rows):
        return  # the torch ops below cost ~10x the decode of a short sequence on a CPU
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
# Implementations (frugal.registry): arguments already checked, no content checks, no host
# sync. StepPlan calls them directly with tables the manager built.
#
# Order on CUDA tensors: the CUDA C++ kernels first for append and decode, Triton first for
# prefill. Neither has run on a GPU yet; the CUDA decode and append run their own device code
# through the emulator in the tests (fragment layouts included) where the Triton ones run in the
# interpreter, and the CUDA prefill fills half of each mma tile (slower on long chunks).
# `frugal tune` replaces this order with what it measured and verified on the device.

PAGED_APPEND = Op("paged_append")
PAGED_ATTENTION = Op("paged_attention")
PAGED_PREFILL = Op("paged_prefill_attention",
                   order={"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")})


def _triton_why_not(k_cache, v_cache, k_scale, v_scale, q_dtype=None, prefill=False):
    from frugal.kernels import paged_attention as kernel

    reason = kernel.unsupported(k_cache, v_cache, k_scale, v_scale, q_dtype)
    if reason is None and prefill:
        reason = kernel.prefill_unsupported(q_dtype, k_cache.shape[3], k_cache.dtype)
    return reason


def _cuda_why_not(k_cache, v_cache):
    D = k_cache.shape[3]
    if not (8 <= D <= 256 and D % 8 == 0):
        return f"the CUDA kernels need head_dim a multiple of 8 from 8 to 256; got {D}"
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        return "the CUDA kernels need caches with unit stride in head_dim"
    return None


@PAGED_APPEND.implement("triton", why_not=lambda k, v, kc, vc, s, ks, vs: _triton_why_not(
    kc, vc, ks, vs))
def _append_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    torch.ops.frugal.paged_append_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@PAGED_APPEND.implement("cuda", devices=("cuda",), requires=cpp_kernel("paged_append", "CUDA"),
                        why_not=lambda k, v, kc, vc, *_: _cuda_why_not(kc, vc))
@PAGED_APPEND.implement("cpu", devices=("cpu",), requires=cpp_kernel("paged_append", "CPU"))
def _append_cpp(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    torch.ops.frugal.paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


PAGED_APPEND.implement("torch")(reference.paged_append)


# Decode: (q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale, v_scale,
# max_seq_len, workspace) with scale a float, window an int (0: none), max_seq_len a host-known
# bound of seq_lens (-1: unknown, the table width bounds the split plan), workspace the Triton
# split-KV buffers (ws_o, ws_lse) to reuse or None. Every implementation takes return_lse
# (keyword): True returns (out, lse float32 [B, Hq]), as decode and prefill both do; and the
# score modifiers (keywords, as check_score_mods makes them): softcap a float (0.0: none),
# alibi_slopes None or contiguous float32 [B, Hq].

@PAGED_ATTENTION.implement("triton", why_not=lambda q, kc, vc, t, n, sc, w, ks, vs, *_:
                           _triton_why_not(kc, vc, ks, vs, q.dtype))
def _decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale, v_scale,
                   max_seq_len=-1, workspace=None, *, return_lse=False, softcap=0.0,
                   alibi_slopes=None):
    ws_o, ws_lse = workspace if workspace is not None else (None, None)
    out, lse = torch.ops.frugal.paged_attention_triton(q, k_cache, v_cache, block_tables,
                                                       seq_lens, scale, window, k_scale, v_scale,
                                                       max_seq_len, ws_o, ws_lse, softcap,
                                                       alibi_slopes)
    return (out, lse) if return_lse else out


@PAGED_ATTENTION.implement("cuda", devices=("cuda",),
                           requires=cpp_kernel("paged_attention", "CUDA"),
                           why_not=lambda q, kc, vc, *_: _cuda_why_not(kc, vc))
@PAGED_ATTENTION.implement("cpu", devices=("cpu",), requires=cpp_kernel("paged_attention", "CPU"))
def _decode_cpp(q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale, v_scale,
                max_seq_len=-1, workspace=None, *, return_lse=False, softcap=0.0,
                alibi_slopes=None):
    op = torch.ops.frugal.paged_attention_lse if return_lse else torch.ops.frugal.paged_attention
    return op(q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale, v_scale,
              softcap, alibi_slopes)


@PAGED_ATTENTION.implement("torch")
def _decode_torch(q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale, v_scale,
                  max_seq_len=-1, workspace=None, *, return_lse=False, softcap=0.0,
                  alibi_slopes=None):
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                     window or None, k_scale, v_scale, return_lse=return_lse,
                                     softcap=softcap or None, alibi_slopes=alibi_slopes)


# Prefill: (q packed [N, Hq, D], k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
# max_q_len, scale, window, k_scale, v_scale), max_q_len known on the host.

@PAGED_PREFILL.implement("triton", why_not=lambda q, kc, vc, t, n, cu, mq, sc, w, ks, vs:
                         _triton_why_not(kc, vc, ks, vs, q.dtype, prefill=True))
def _prefill_triton(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale,
                    window, k_scale, v_scale, *, return_lse=False, softcap=0.0,
                    alibi_slopes=None):
    out, lse = torch.ops.frugal.paged_prefill_attention_triton(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale, window,
        k_scale, v_scale, softcap, alibi_slopes)
    return (out, lse) if return_lse else out


@PAGED_PREFILL.implement("cuda", devices=("cuda",),
                         requires=cpp_kernel("paged_prefill_attention", "CUDA"),
                         why_not=lambda q, kc, vc, *_: _cuda_why_not(kc, vc))
@PAGED_PREFILL.implement("cpu", devices=("cpu",),
                         requires=cpp_kernel("paged_prefill_attention", "CPU"))
def _prefill_cpp(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale,
                 window, k_scale, v_scale, *, return_lse=False, softcap=0.0, alibi_slopes=None):
    op = (torch.ops.frugal.paged_prefill_attention_lse if return_lse
          else torch.ops.frugal.paged_prefill_attention)
    return op(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, window, k_scale,
              v_scale, softcap, alibi_slopes)


@PAGED_PREFILL.implement("torch")
def _prefill_torch(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale,
                   window, k_scale, v_scale, *, return_lse=False, softcap=0.0,
                   alibi_slopes=None):
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.int32)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens,
                                             scale, window or None, k_scale, v_scale,
                                             return_lse=return_lse, softcap=softcap or None,
                                             alibi_slopes=alibi_slopes)


def normalize(q, scale, window):
    """(scale, window) as the implementations take them: D**-0.5 for None, 0 for no window."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return scale, 0 if not window else min(window, MAX_WINDOW)


def check_score_mods(op, q, softcap, alibi_slopes, batch):
    """The implementations' keywords for the score modifiers (:mod:`frugal.score_mods`),
    checked: softcap a float (0.0: none), alibi_slopes None or float32 [batch, Hq]."""
    return dict(softcap=check_softcap(op, softcap),
                alibi_slopes=check_alibi_slopes(op, alibi_slopes, batch, q.shape[-2], q.device))


# ---------------------------------------------------------------------------------------------
# Ops


def _check_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    op = "paged_append"
    _check_caches(op, k_cache, v_cache, k_scale, v_scale)
    check_dtype(op, "k", k, FLOATS)
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
    return PAGED_APPEND.select(k_cache.device, backend, k, v, k_cache, v_cache, slot_mapping,
                               k_scale, v_scale, explain=explain)


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
        tensors, else PyTorch. Triton needs head_dim a multiple of 8 up to 256 and caches with
        unit stride in head_dim; every backend writes the same bytes (and int8 scales).

    Raises BlockTableError for slots out of range or repeated, before anything is written.
    """
    impl = _select_paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                backend=backend)
    impl.run(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


paged_append._frugal_select = _select_paged_append


def _check_attention(op, q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale,
                     v_scale, q_lens=None):
    _check_caches(op, k_cache, v_cache, k_scale, v_scale)
    check_scale(op, scale)
    check_window(op, window)
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
                            k_scale=None, v_scale=None, *, backend="auto", return_lse=False,
                            softcap=None, alibi_slopes=None, explain=False):
    _check_attention("paged_attention", q, k_cache, v_cache, block_tables, seq_lens, scale,
                     window, k_scale, v_scale)
    check_score_mods("paged_attention", q, softcap, alibi_slopes, q.shape[0])
    return PAGED_ATTENTION.select(q.device, backend, q, k_cache, v_cache, block_tables, seq_lens,
                                  *normalize(q, scale, window), k_scale, v_scale,
                                  explain=explain)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None, window=None,
                    k_scale=None, v_scale=None, *, backend="auto", return_lse=False,
                    softcap=None, alibi_slopes=None):
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
        tensors, else PyTorch. Triton needs head_dim a multiple of 8 up to 256 and caches with
        unit stride in head_dim.
    return_lse : bool. Also return the log-sum-exp of each row (every backend computes it).
    softcap : float > 0 or None. Caps each score s = ``scale * q . k`` to ``c * tanh(s / c)``
        (Gemma-2), as :mod:`frugal.score_mods` defines.
    alibi_slopes : Tensor float32 [Hq] or [B, Hq] on q's device, or None. Subtracts
        ``slope * (q_pos - k_pos)`` from each score (ALiBi; q_pos = ``seq_lens[b] - 1``), after
        the softcap.

    Returns
    -------
    Tensor [B, Hq, D] in q's dtype (softmax and sums in float32); with ``return_lse``, the pair
    (out, lse) with lse float32 [B, Hq]: the natural log of the sum of exp of the row's scaled
    (and modified) scores over the keys it reads, -inf for a sequence of length 0 (whose
    out is 0), NaN where out is NaN. :func:`frugal.merge_attention_states` combines such pairs.

    Table entries and lengths are checked on the host before anything runs (one sync):
    BlockTableError, never an out-of-bounds read.
    """
    if backend in ("auto", "cpu") and _plain_cpu(q, k_cache, v_cache, block_tables, seq_lens,
                                                 k_scale, v_scale):
        return _decode_cpu_checked_in_cpp(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                          window, k_scale, v_scale, backend, return_lse,
                                          softcap, alibi_slopes)
    impl = _select_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, window,
                                   k_scale, v_scale, backend=backend)
    mods = check_score_mods("paged_attention", q, softcap, alibi_slopes, q.shape[0])
    return impl.run(q, k_cache, v_cache, block_tables, seq_lens, *normalize(q, scale, window),
                    k_scale, v_scale, return_lse=bool(return_lse), **mods)


paged_attention._frugal_select = _select_paged_attention

_Tensor = torch.Tensor


def _plain_cpu(*tensors):
    """True when every one of ``tensors`` is a plain CPU tensor or None (no subclass: fake,
    functional or traced tensors take the checked path; nor a meta one, whose op would run
    without reading anything), outside torch.compile, with the C++ decode built and no debug
    log to write."""
    if not _CPP_DECODE[0] or dispatch.debugging() or torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and (type(t) is not _Tensor or not t.is_cpu):
            return False
    return tensors[0] is not None


_CPP_DECODE = [_ext.ext() is not None and hasattr(torch.ops.frugal, "paged_attention")]


def _decode_cpu_checked_in_cpp(q, k_cache, v_cache, block_tables, seq_lens, scale, window,
                               k_scale, v_scale, backend, return_lse, softcap, alibi_slopes):
    """paged_attention on CPU tensors with the Python checks of its arguments left to the C++
    op, which checks every one of them itself (shapes, dtypes, devices, every table entry and
    length, before it reads a block): about 8 us of a 28 us call that decodes 16 tokens. The
    few rules of the Python API that the op does not share (q in the cache dtype, the scale,
    the window, the modifiers) are checked here. When the op raises, the Python checks run to
    raise the typed error that names the argument (DTypeError, BlockTableError, ...); the op's
    own error when they find nothing. The op reads only the table entries it needs; the API's
    rule that every entry is in [-1, num_blocks) is checked here (_check_table_contents, in
    C++ for CPU tables)."""
    op = "paged_attention"
    check_scale(op, scale)
    check_window(op, window)
    try:
        if k_cache.dtype != torch.int8 and q.dtype != k_cache.dtype:
            raise DTypeError(f"{op}: q must have the cache dtype {k_cache.dtype}; got {q.dtype}")
        mods = check_score_mods(op, q, softcap, alibi_slopes, q.shape[0])
        args = (q, k_cache, v_cache, block_tables, seq_lens, *normalize(q, scale, window),
                k_scale, v_scale)
        # The op checks the entries it reads; the API refuses any entry outside [-1, blocks).
        # (_check_table_contents reads seq_lens[b] for every row b of int32 tables: shapes
        # first.)
        if (block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32
                or block_tables.dim() != 2 or seq_lens.shape != block_tables.shape[:1]):
            raise ShapeError(f"{op}: bad block_tables or seq_lens")  # the checks below say how
        _check_table_contents(op, block_tables, seq_lens, k_cache, window)
        impl = PAGED_ATTENTION.select(q.device, backend, *args)
        if impl.backend == "cpu":
            return impl.run(*args, return_lse=bool(return_lse), **mods)
        failure = None  # a tuned file's choice: that backend gets checked arguments
    except Exception as exc:  # noqa: BLE001 (re-raised below unless a typed error says more)
        failure = exc
    _check_attention(op, q, k_cache, v_cache, block_tables, seq_lens, scale, window, k_scale,
                     v_scale)  # raises the typed error of a refused call
    if failure is not None:
        raise failure
    return impl.run(*args, return_lse=bool(return_lse), **mods)


def _select_paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens=None,
                                    scale=None, window=None, k_scale=None, v_scale=None, *,
                                    backend="auto", return_lse=False, softcap=None,
                                    alibi_slopes=None, explain=False):
    _check_attention("paged_prefill_attention", q, k_cache, v_cache, block_tables, seq_lens,
                     scale, window, k_scale, v_scale, q_lens)
    check_score_mods("paged_prefill_attention", q, softcap, alibi_slopes, seq_lens.shape[0])
    return PAGED_PREFILL.select(q.device, backend, *_prefill_args(
        q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale, window, k_scale, v_scale),
        explain=explain)


def _prefill_args(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale, window, k_scale,
                  v_scale):
    """The implementations' arguments: q packed [N, Hq, D] with cu_seqlens_q int32 [B + 1] (the
    vLLM / FlashAttention varlen layout) and max_q_len on the host."""
    hq, d = q.shape[-2:]
    if q.dim() == 4:
        rows = q.reshape(-1, hq, d)
        cu_seqlens_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device) * q.shape[1]
        max_q_len = q.shape[1]
    else:
        rows = q
        cu_seqlens_q = torch.nn.functional.pad(torch.cumsum(q_lens, 0, dtype=torch.int32), (1, 0))
        # The Triton grid needs it on the host: one sync (the checks made one already).
        max_q_len = int(q_lens.max()) if q_lens.numel() else 0
    return (rows, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len,
            *normalize(q, scale, window), k_scale, v_scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens=None, scale=None,
                            window=None, k_scale=None, v_scale=None, *, backend="auto",
                            return_lse=False, softcap=None, alibi_slopes=None):
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

    return_lse : bool. Also return the log-sum-exp of each query row.
    softcap, alibi_slopes : as :func:`paged_attention` (slopes [Hq] or [B, Hq]); the query at
        position p has ALiBi distance ``p - k_pos`` to the keys it reads.

    Returns
    -------
    Tensor of q's shape and dtype (softmax and sums in float32). Decode is the case of one
    query per sequence. With ``return_lse``, the pair (out, lse), lse float32 of q's shape
    without head_dim ([B, T, Hq] or [N, Hq]), defined as for :func:`paged_attention` (every
    query sees at least its own key, so it is finite for finite inputs).

    The kernels take q packed as [N, Hq, D] with ``cu_seqlens_q`` int32 [B + 1] (the vLLM /
    FlashAttention varlen layout); 4-d q is reshaped to it, packed q's q_lens are summed into it.
    """
    impl = _select_paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens,
                                           scale, window, k_scale, v_scale, backend=backend)
    mods = check_score_mods("paged_prefill_attention", q, softcap, alibi_slopes,
                            seq_lens.shape[0])
    args = _prefill_args(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale, window,
                         k_scale, v_scale)
    if not return_lse:
        return impl.run(*args, **mods).reshape(q.shape)
    out, lse = impl.run(*args, return_lse=True, **mods)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


paged_prefill_attention._frugal_select = _select_paged_prefill_attention

