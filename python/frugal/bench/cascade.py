"""Shared-prefix (cascade) decode sweep: 32 sequences forked from one 4096-token prompt, each
with ``x`` own tokens (1..512, the decode step's token included), one decode step of one layer
through a :class:`frugal.StepPlan`.

Candidates, each returning ``[32, Hq, D]`` over the same cache and the same plan:

``per_sequence`` (the baseline)
    The plan's attention without its cascade: today's decode, which reads the shared prefix's
    blocks once per sequence (``paged_attention`` over the block tables).
``cascade``
    The plan as ``PagedKVCache.plan(..., cascade="auto")`` built it: the prefix's blocks read
    once for the group (the 32 sequences' queries folded into the head dim), a suffix pass per
    sequence and ``merge_attention_states``. The notes say which groups "auto" chose at each x.

Hq = 32, Hkv = 8, D = 128 (``cascade_decode``; ``cascade_decode_mha``: Hkv = 32), block_size
16, float32 on CPU (float16 on CUDA). The shared prefix is 32 MiB of K and V in float32 at
Hkv = 8, the size of this machine's L3: the per-sequence baseline's 32 re-reads of the same
blocks partly come from cache, as they would in serving.

Cascade removes bytes, not FLOPs: both candidates compute the same Q K^T and P V. Where the
per-sequence decode is mostly memory time (GPUs; MHA caches, 4x the bytes per FLOP of
Hkv = 8), the gain approaches the reads saved; on a CPU whose per-sequence decode of an
Hkv = 8 float32 cache spends a third to half of its time computing, it is bounded by that.
"""

import dataclasses
import functools

import torch

import frugal
from frugal import cascade

from .paged import BLOCK_SIZE, D, HKV, HQ, dtype_for
from .registry import Target, sweep

BATCH, PREFIX = 32, 4096
_CHOICES = {}  # x -> the groups "auto" chose, for the notes


def cascade_problem(suffix, device, *, batch=None, prefix=None, hkv=HKV, seed=0):
    """A cache holding ``batch`` (default BATCH) forks of one ``prefix``-token (default PREFIX)
    prompt, each with ``suffix - 1`` own tokens, and the decode plan of the next step (``cascade="auto"``) with its token
    written. Returns (plan, q)."""
    batch, prefix = batch or BATCH, prefix or PREFIX
    device = torch.device(device)
    dtype = dtype_for(device)
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-(prefix + suffix) // BLOCK_SIZE) - prefix // BLOCK_SIZE + 1
    cache = frugal.PagedKVCache(1, prefix // BLOCK_SIZE + batch * per_seq, BLOCK_SIZE, hkv, D,
                                dtype=dtype, device=device)

    def kv(n, rows=1):
        return (torch.randn(rows, n, hkv, D, generator=gen).to(device, dtype) for _ in "kv")

    ids = list(range(batch))
    cache.add_sequence(0)
    cache.append(0, [0], *kv(prefix))
    for i in ids[1:]:
        cache.fork(0, i)
    if suffix > 1:
        cache.append(0, ids, *kv(suffix - 1, batch))
    plan = cache.plan(ids, cascade="auto")
    plan.append(0, *(x[:, 0] for x in kv(1, batch)))
    q = torch.randn(batch, HQ, D, generator=gen).to(device, dtype)
    return plan, q


def _setup(x, device, *, hkv):
    plan, q = cascade_problem(x, device, hkv=hkv)
    _CHOICES[hkv, x] = plan.cascade.groups if plan.cascade is not None else ()
    per_sequence = dataclasses.replace(plan, cascade=None)
    return {"per_sequence": lambda: per_sequence.attention(q, 0),
            "cascade": lambda: plan.attention(q, 0)}


def _notes(hkv):
    def notes(device):
        chose = "; ".join(
            f"{x}: " + (", ".join(f"{len(m)} sequences share {p} tokens" for m, p in groups)
                        if groups else "per sequence")
            for (h, x), groups in sorted(_CHOICES.items()) if h == hkv)
        return {"dtype": str(dtype_for(device)).replace("torch.", ""),
                "auto rule": f"a group cascades when it saves >= "
                             f"{cascade.MIN_SAVED_BYTES >> 20} MiB of K/V reads per layer "
                             "((n - 1) x shared tokens)",
                "auto chose": chose,
                "baseline": "the same plan without its cascade (per-sequence decode of the "
                            "same cache)"}

    return notes


def _cascade_sweep(name, hkv, xs, description):
    """Registers the sweep at ``hkv`` kv heads: the 4x target at the smallest suffix, never
    slower (1x) at the others."""
    targets = (Target(x=xs[0], candidate="cascade", min_speedup=4.0),
               *(Target(x=x, candidate="cascade", min_speedup=1.0) for x in xs[1:]))
    sweep(
        name,
        op="paged_attention",
        x_name="suffix",
        xs=xs,
        quick=(1, 512),
        baseline="per_sequence",
        params={"B": BATCH, "prefix": PREFIX, "Hq": HQ, "Hkv": hkv, "D": D,
                "block_size": BLOCK_SIZE},
        notes=_notes(hkv),
        targets=targets,
        description=description,
    )(functools.partial(_setup, hkv=hkv))


_cascade_sweep("cascade_decode", HKV, (1, 2, 8, 32, 128, 256, 512),
               "Shared-prefix decode: 32 forks of a 4096-token prompt with 1..512 own tokens, "
               "cascade (auto) vs per-sequence decode of the same cache (Hq=32 Hkv=8 D=128)")
_cascade_sweep("cascade_decode_mha", HQ, (1, 32, 512),
               "The cascade_decode sweep with one kv head per query head (Hq=Hkv=32 D=128): 4x "
               "the K/V bytes for the same FLOPs")
