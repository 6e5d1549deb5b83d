"""Sweeps for block-sparse attention: cost against sequence length for sliding windows, causal
as a block mask and BigBird, against dense PyTorch SDPA; and the break-even density above which
dense SDPA wins."""

import functools

import torch
import torch.nn.functional as F

import frugal
from frugal import masks

from .registry import SlopeTarget, Target, sweep

_B, _H, _D = 1, 8, 64
_BIGBIRD = {"window": 3, "num_global": 1, "num_random": 3}  # blocks: BigBird's ITC defaults


def _patterns(n):
    """The masks the sweep times at length n."""
    pats = {
        "window512": masks.sliding_window(n, 512),
        "window1024": masks.sliding_window(n, 1024),
        "causal": masks.causal(n),
    }
    if hasattr(masks, "bigbird"):
        pats["bigbird"] = masks.bigbird(n, seed=0, **_BIGBIRD)
    return pats


@functools.lru_cache(maxsize=8)
def _densities(n):
    return {name: m.density() for name, m in _patterns(n).items()}


def _flops(n):
    """FLOPs each candidate computes at length n: 4 * B * H * D per (q, k) pair it visits
    (Q K^T and P V); the frugal rows count only the blocks their mask lists."""
    pair = 4 * _B * _H * _D
    out = {f"frugal_{name}": pair * n * n * d for name, d in _densities(n).items()}
    out["sdpa_causal"] = pair * n * (n + 1) / 2
    for name in _densities(n):
        out[f"sdpa_mask_{name}"] = pair * n * n  # a bool mask makes SDPA dense
    return out


def _inputs(n, device, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(_B, _H, n, _D, generator=g).to(device=device, dtype=dtype)
               for _ in range(3))
    return q, k, v


# SDPA with a dense bool mask costs O(N^2) time and its mask O(N^2) bytes: timed up to here.
_MAX_MASKED_SDPA = {"cpu": 4096, "cuda": 32768}


def _setup(n, device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = _inputs(n, device, dtype)
    cands = {"sdpa_causal": functools.partial(F.scaled_dot_product_attention, q, k, v,
                                              is_causal=True)}
    for name, mask in _patterns(n).items():
        mask.layout(_B, _H, device)  # built once, outside the timing, like any reused mask
        cands[f"frugal_{name}"] = functools.partial(frugal.sparse_attention, q, k, v, mask)
    if n <= _MAX_MASKED_SDPA[device.type]:
        for name, mask in _patterns(n).items():
            dense = mask.to_dense(device)
            cands[f"sdpa_mask_{name}"] = functools.partial(
                F.scaled_dot_product_attention, q, k, v, attn_mask=dense)
    return cands


def _notes(device):
    q = torch.zeros(1, 1, 128, _D, device=device)
    notes = {"auto": str(frugal.explain(frugal.sparse_attention, q, q, q, masks.causal(128))),
             "flops": "GFLOP/s counts 4*B*H*D per (q, k) pair computed: the listed blocks for "
                      "frugal, the lower triangle for sdpa_causal, all of N^2 for sdpa_mask",
             "sdpa_mask": f"SDPA with the equivalent dense bool mask, timed up to "
                          f"N={_MAX_MASKED_SDPA[device.type]} (its cost and mask are O(N^2))",
             "bigbird": f"{_BIGBIRD}, block 128, seed 0" if hasattr(masks, "bigbird")
             else "not built"}
    n = 16384
    notes["density at N=16384"] = ", ".join(f"{k} {v:.2%}" for k, v in _densities(n).items())
    return notes


@sweep(
    "sparse_attention",
    op="attention",
    x_name="N",
    xs=(1024, 2048, 4096, 8192, 16384),
    quick=(1024, 2048, 4096),
    baseline="sdpa_causal",
    flops=_flops,
    params={"B": _B, "H": _H, "D": _D, "dtype": "float32 (bf16 on cuda)", "block": 128},
    notes=_notes,
    targets=(
        Target(x=16384, candidate="frugal_window512", min_speedup=10.0, device="cpu"),
        # "within 1.3x of SDPA causal": the sparse machinery's cost when little is skipped.
        Target(x=16384, candidate="frugal_causal", min_speedup=1 / 1.3, device="cpu"),
        Target(x=4096, candidate="frugal_causal", min_speedup=1 / 1.3, device="cpu"),
    ),
    slope_targets=(
        SlopeTarget(candidate="frugal_window512", max_slope=1.15, device="cpu"),
        # At N=1024 a 1024-token window is the whole causal mask (quadratic): fit from N=2w.
        SlopeTarget(candidate="frugal_window1024", max_slope=1.15, device="cpu", min_x=2048),
        SlopeTarget(candidate="sdpa_causal", min_slope=1.7, device="cpu"),
    ),
)
def _sparse_attention(n, device):
    """Block-sparse attention (window 512/1024, causal, BigBird) vs SDPA causal and masked."""
    return _setup(n, device)


# --------------------------------------------------------------------------- break-even

_BE_N = 4096


def _be_mask(w):
    # A two-sided window of w keys each side: density grows from ~2w/N to 1.
    return masks.sliding_window(_BE_N, (w, w), causal=False)


def _be_flops(w):
    pair = 4 * _B * _H * _D
    return {"frugal": pair * _BE_N * _BE_N * _be_mask(w).density(),
            "sdpa_dense": pair * _BE_N * _BE_N}


def _be_setup(w, device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = _inputs(_BE_N, device, dtype)
    mask = _be_mask(w)
    mask.layout(_B, _H, device)
    return {"sdpa_dense": functools.partial(F.scaled_dot_product_attention, q, k, v),
            "frugal": functools.partial(frugal.sparse_attention, q, k, v, mask)}


def _be_summary(rows):
    """Interpolates the density at which frugal's time equals dense SDPA's."""
    dense = {r.x: r.ms for r in rows if r.candidate == "sdpa_dense"}
    pts = sorted((_be_mask(r.x).density(), r.ms / dense[r.x]) for r in rows
                 if r.candidate == "frugal")
    out = {"densities": ", ".join(f"w={w}: {_be_mask(w).density():.1%}"
                                  for w in sorted(dense))}
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 <= 1.0 <= r1:
            d = d0 + (1.0 - r0) * (d1 - d0) / (r1 - r0) if r1 != r0 else d0
            out["break-even density"] = (f"{d:.1%}: above it dense SDPA (no mask) is faster "
                                         f"than frugal on this device")
            return out
    if pts and pts[-1][1] < 1.0:
        out["break-even density"] = (f"above {pts[-1][0]:.1%} (frugal was faster at every "
                                     f"density measured)")
    elif pts:
        out["break-even density"] = (f"below {pts[0][0]:.1%} (dense SDPA was faster at every "
                                     f"density measured)")
    return out


@sweep(
    "sparse_attention_break_even",
    op="attention",
    x_name="window",
    xs=(128, 256, 512, 1024, 1536, 2048, 3072, 4096),
    quick=(256, 1024, 4096),
    baseline="sdpa_dense",
    flops=_be_flops,
    params={"N": _BE_N, "B": _B, "H": _H, "D": _D, "mask": "two-sided window (w, w)"},
    summary=_be_summary,
)
def _sparse_break_even(w, device):
    """Block-sparse attention vs dense SDPA as the window (density) grows: the break-even."""
    return _be_setup(w, device)
