"""Paged decode attention sweeps: ``frugal.paged_attention`` against dense PyTorch over context
length, at B = 1, 8 and 32 sequences, and with a 4096-token sliding window.

One decode step: q ``[B, Hq, D]`` (one new token per sequence) attends to ``context`` cached
tokens per sequence; Hq = 32, Hkv = 8, D = 128, block_size 16, float32 on CPU (float16 on
CUDA). The paged cache's block tables are randomly permuted, as a cache is after many
appends and frees. Candidates, each returning ``[B, Hq, D]``:

``paged``
    ``frugal.paged_attention`` (backend auto: the C++ kernel on CPU, Triton on CUDA).
``sdpa`` (the baseline)
    ``F.scaled_dot_product_attention`` over a contiguous cache ``[B, Hkv, L, D]`` holding the
    same K and V, with the G = Hq / Hkv query heads that share a kv head folded into the query
    length (q viewed as ``[B, Hkv, G, D]``): the same result, and the fastest way to run GQA
    decode through SDPA that we found on this CPU (about 2x ``enable_gqa=True``).
``sdpa_gqa``
    The same SDPA call with ``enable_gqa=True`` and q ``[B, Hq, 1, D]``, the documented way.
    (K/V repeated to Hq heads with ``repeat_interleave`` was slower than ``enable_gqa`` on this
    CPU, 41.5 vs 25.1 ms at B=8, context 4096, fp32, in one measurement, and holds 4x the
    memory, so it is not timed.)
``gather_sdpa``
    K and V gathered through the block tables (``index_select``) into a contiguous-by-sequence
    tensor, then the folded-query SDPA: what a paged cache costs without a paged kernel.

GB/s counts the K and V bytes a decode step reads (``2 * B * L * Hkv * D * itemsize``), for
every candidate. The inputs of one x are held in rotating copies totalling at least 64 MiB, so
the 32 MiB L3 cannot serve repeated calls. Candidates whose inputs and temporaries would pass
``MEMORY_CAP`` bytes at some x are not timed there (each sweep's notes say which); the B = 32
sweep stops at 8192 tokens for the same reason (at 32k its K and V alone are 8.6 GB).
"""

import functools

import torch
import torch.nn.functional as F

import frugal
from frugal.paged_kv_cache import kv_footprint
from frugal.paged_ops import empty_cache

from .builtin import _rotating
from .registry import Target, sweep
from .timing import read_bandwidth, rotation_bytes

HQ, HKV, D, BLOCK_SIZE = 32, 8, 128, 16
WINDOW = 4096
MEMORY_CAP = 6e9  # bytes of K/V inputs and temporaries per x, all candidates together

# Memory a candidate needs beyond the paged cache, in units of the K and V bytes one decode
# step reads: the contiguous cache (sdpa, sdpa_gqa), that and the gathered copy (gather_sdpa).
_EXTRA_KV = {"paged": 0, "sdpa": 1, "sdpa_gqa": 1, "gather_sdpa": 2}
CANDIDATES = tuple(_EXTRA_KV)


def dtype_for(device):
    """float16 on CUDA, float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def kv_bytes(batch, context, device, window=None):
    """K and V bytes one decode step reads: ``batch`` sequences of ``context`` tokens (the
    last ``window`` of them when windowed)."""
    held = context if window is None else min(context, window)
    return 2 * batch * held * HKV * D * dtype_for(device).itemsize


class DecodeProblem:
    """One decode step over a paged cache and, on request, a contiguous cache of the same K/V.

    ``batch`` sequences of ``context`` tokens each sit in a paged cache
    ``[num_blocks, block_size, hkv, d]`` through randomly permuted block tables. With a
    ``window``, the blocks wholly before the last ``window`` positions are not allocated and
    their table entries are -1 (as after :meth:`frugal.PagedKVCache.trim`), and the contiguous
    cache ``[batch, hkv, min(context, window), d]`` holds the window's positions only.

    Parameters
    ----------
    batch, context : int
    device : str or torch.device
    window : int, optional
    dense : bool
        Build the contiguous cache (``k_dense``, ``v_dense``) for the SDPA candidates.
    hq, hkv, d, block_size : int
    dtype : torch.dtype, optional
        Defaults to :func:`dtype_for` the device.
    seed : int
    """

    def __init__(self, batch, context, device, *, window=None, dense=True, hq=HQ, hkv=HKV, d=D,
                 block_size=BLOCK_SIZE, dtype=None, seed=0):
        if hq % hkv:
            raise ValueError(f"DecodeProblem: hq must be a multiple of hkv {hkv}; got {hq}")
        device = torch.device(device)
        dtype = dtype or dtype_for(device)
        gen = torch.Generator(device).manual_seed(seed)
        self.batch, self.context, self.window = batch, context, window
        self.hq, self.hkv, self.d, self.scale = hq, hkv, d, d**-0.5
        # Positions [lo, context) are attended to; blocks before `first` hold none of them.
        self.lo = 0 if window is None else max(0, context - window)
        first = self.lo // block_size
        width = -(-context // block_size)
        per_seq = width - first
        num_blocks = batch * per_seq
        shape = (num_blocks, block_size, hkv, d)
        # Allocated as PagedKVCache allocates its storage (huge pages on the CPU).
        self.k_cache = empty_cache(shape, dtype, device).normal_(generator=gen)
        self.v_cache = empty_cache(shape, dtype, device).normal_(generator=gen)
        perm = torch.randperm(num_blocks, generator=gen, device=device)
        self.tables = torch.full((batch, width), -1, dtype=torch.int32, device=device)
        self.tables[:, first:] = perm.reshape(batch, per_seq).int()
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.q = torch.randn(batch, hq, d, generator=gen, device=device, dtype=dtype)
        # Flat indices of the blocks holding attended positions, and where those start.
        self._blocks = self.tables[:, first:].reshape(-1)
        self._start = self.lo - first * block_size
        self.k_dense = self.v_dense = None
        if dense:
            self.k_dense, self.v_dense = self._contiguous(self.k_cache), self._contiguous(
                self.v_cache)

    def _contiguous(self, cache):
        # One sequence at a time: the temporary is one sequence's blocks, not the whole cache.
        n = self.context - self.lo
        # The same allocation as the paged cache, so the baselines read the same kind of pages.
        out = empty_cache((self.batch, self.hkv, n, self.d), cache.dtype, cache.device)
        blocks = self._blocks.reshape(self.batch, -1).long()
        for b in range(self.batch):
            rows = cache[blocks[b]].reshape(-1, self.hkv, self.d)[self._start:self._start + n]
            out[b].copy_(rows.transpose(0, 1))
        return out

    def _folded_q(self):
        # q head h uses kv head h // G: [B, Hq, D] -> [B, Hkv, G, D] is that grouping.
        return self.q.view(self.batch, self.hkv, self.hq // self.hkv, self.d)

    def paged(self):
        """``frugal.paged_attention`` through the block tables."""
        return frugal.paged_attention(self.q, self.k_cache, self.v_cache, self.tables,
                                      self.seq_lens, self.scale, window=self.window)

    def sdpa(self):
        """SDPA over the contiguous cache, G query heads per kv head folded into the query
        length."""
        out = F.scaled_dot_product_attention(self._folded_q(), self.k_dense, self.v_dense,
                                             scale=self.scale)
        return out.view(self.batch, self.hq, self.d)

    def sdpa_gqa(self):
        """SDPA over the contiguous cache with ``enable_gqa=True``."""
        out = F.scaled_dot_product_attention(self.q[:, :, None], self.k_dense, self.v_dense,
                                             scale=self.scale, enable_gqa=True)
        return out.view(self.batch, self.hq, self.d)

    def gather_sdpa(self):
        """K and V gathered through the tables, then the folded-query SDPA."""
        n = self.context - self.lo

        def gather(cache):
            rows = cache.index_select(0, self._blocks).view(self.batch, -1, self.hkv, self.d)
            return rows[:, self._start:self._start + n].transpose(1, 2)

        out = F.scaled_dot_product_attention(self._folded_q(), gather(self.k_cache),
                                             gather(self.v_cache), scale=self.scale)
        return out.view(self.batch, self.hq, self.d)


def fits(candidate, batch, context, device, window=None):
    """Whether ``candidate``'s inputs and temporaries at this size stay within MEMORY_CAP."""
    return (1 + _EXTRA_KV[candidate]) * kv_bytes(batch, context, device, window) <= MEMORY_CAP


def decode_candidates(batch, context, device, window=None, names=CANDIDATES):
    """The candidates ``names`` (those that fit in MEMORY_CAP) at one size: name -> callable,
    each rotating over copies of its inputs that together exceed the last-level cache on CPU.
    """
    device = torch.device(device)
    names = [n for n in names if fits(n, batch, context, device, window)]
    dense = any(_EXTRA_KV[n] for n in names)
    one = kv_bytes(batch, context, device, window) * (2 if dense else 1)
    copies = max(1, -(-rotation_bytes() // one)) if device.type == "cpu" else 1
    problems = [DecodeProblem(batch, context, device, window=window, dense=dense, seed=i)
                for i in range(copies)]
    return {n: _rotating(lambda i, n=n: getattr(problems[i], n), copies) for n in names}


def _skipped(batch, xs, window, names):
    """Notes line: the candidates MEMORY_CAP keeps from running at some of ``xs`` (on CPU)."""
    lines = [f"{n} at {', '.join(str(x) for x in xs if not fits(n, batch, x, 'cpu', window))}"
             for n in names if not all(fits(n, batch, x, "cpu", window) for x in xs)]
    return {"not timed": f"over the {MEMORY_CAP / 1e9:g} GB memory cap (fp32): "
                         + "; ".join(lines)} if lines else {}


def mixed_batch_footprint(batch=32, max_len=32768, block_size=BLOCK_SIZE, seed=0):
    """Notes line: KV bytes a paged cache and a dense max-length cache hold for ``batch``
    sequences of lengths uniform in [1, max_len] (one layer, Hkv=8, D=128, fp32), against the
    bytes the tokens need; the issue's target is at most 5% over the need, paged."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    fp = kv_footprint(lengths, block_size)
    per_slot = 2 * HKV * D * 4
    verdict = "PASS" if fp.paged_overhead <= 0.05 else "FAIL"
    return (f"{batch} sequences of 1..{max_len} tokens (seed {seed}), block_size {block_size}: "
            f"tokens need {fp.tokens * per_slot / 1e9:.3f} GB; paged holds "
            f"{fp.paged_slots * per_slot / 1e9:.3f} GB (+{100 * fp.paged_overhead:.2f}%), dense "
            f"max-length {fp.dense_slots * per_slot / 1e9:.3f} GB "
            f"(+{100 * fp.dense_overhead:.0f}%); target paged <= +5%: {verdict}")


def _notes(batch, xs, window, names, memory):
    def notes(device):
        problem = DecodeProblem(1, 16, device, window=window, dense=False)
        out = {"auto": str(frugal.explain(frugal.paged_attention, problem.q, problem.k_cache,
                                          problem.v_cache, problem.tables, problem.seq_lens,
                                          window=window)),
               "dtype": str(dtype_for(device)).replace("torch.", ""),
               "GB/s": "counts the K and V bytes one decode step reads, for every candidate",
               "sdpa": "contiguous cache; the G query heads of a kv head folded into the query "
                       "length" + ("; sdpa_gqa: enable_gqa=True" if "sdpa_gqa" in names else ""),
               **_skipped(batch, xs, window, names)}
        if memory:
            out["KV memory"] = mixed_batch_footprint()
        return out

    return notes


def _read_fraction(rows, device):
    """The paged rows' GB/s against the machine's pure read bandwidth, measured now: the copy
    bandwidth the targets use counts reads and writes, and swings with the host's load."""
    gbps = read_bandwidth(device)
    paged = ", ".join(f"{r.x}: {100 * r.gbps / gbps:.0f}%" for r in rows
                      if r.candidate == "paged" and r.gbps)
    return {"read bandwidth": f"{gbps:.1f} GB/s (float32 sum over 256 MiB, measured after the "
                              f"timings); paged reaches, by context, {paged} of it"}


def _decode_sweep(name, batch, xs, quick, targets=(), window=None, names=CANDIDATES,
                  memory=False):
    params = {"B": batch, "Hq": HQ, "Hkv": HKV, "D": D, "block_size": BLOCK_SIZE}
    if window is not None:
        params["window"] = window
    what = f"with a {window}-token window " if window else ""
    sweep(
        name,
        op="paged_attention",
        x_name="context",
        xs=xs,
        quick=quick,
        baseline="sdpa",
        compare=tuple(n for n in names if n not in ("paged", "sdpa")),
        nbytes=lambda x, device: kv_bytes(batch, x, device, window),
        memory_bound=True,
        params=params,
        notes=_notes(batch, xs, window, names, memory),
        summary=_read_fraction if memory else None,
        targets=tuple(targets),
        description=f"Paged decode attention, B={batch} {what}(Hq=32 Hkv=8 D=128), vs SDPA on "
                    "a contiguous cache" + (" and gather-then-SDPA" if "gather_sdpa" in names
                                            else ""),
    )(functools.partial(_setup, batch=batch, window=window, names=names))


def _setup(x, device, *, batch, window, names):
    return decode_candidates(batch, x, device, window, names)


_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)

_decode_sweep("paged_attention", 8, _CONTEXTS, (512, 4096), memory=True, targets=(
    Target(x=4096, candidate="paged", min_speedup=1.5),
    Target(x=4096, candidate="paged", min_speedup=1.5, versus="sdpa_gqa"),
    Target(x=4096, candidate="paged", min_speedup=2.0, versus="gather_sdpa"),
    Target(x=4096, candidate="paged", min_copy_fraction=0.5),
))
_decode_sweep("paged_attention_b1", 1, _CONTEXTS, (512, 8192))
# At 16k the B=32 caches alone are 4.3 GB and the contiguous copy as much again.
_decode_sweep("paged_attention_b32", 32, _CONTEXTS[:5], (512, 1024))
# Windowed: the paged cache holds the window's blocks only; the baseline is SDPA over a
# contiguous cache of the window's positions. Cost per token is bounded: 32k within 1.2x of 4k.
_decode_sweep("paged_attention_window", 8, (4096, 8192, 16384, 32768), (4096, 32768),
              window=WINDOW, names=("paged", "sdpa"), targets=(
                  Target(x=32768, candidate="paged", min_speedup=1 / 1.2, versus="paged",
                         versus_x=4096),
              ))
