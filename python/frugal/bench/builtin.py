"""The built-in sweeps, one per op, each named after the op it times."""

import functools

import torch

import frugal
from frugal.dispatch import unavailable

from .registry import Target, sweep

_K = 4096


def _quantize_notes(device):
    probe = torch.zeros(1, 8, device=device)
    notes = {"auto": str(frugal.explain(frugal.quantize_per_token, probe))}
    if device.type == "cuda":
        for backend in ("triton", "cuda"):
            why = unavailable(backend, device)
            if why is not None:
                notes[f"{backend} not timed"] = why
    return notes


@sweep(
    "quantize_per_token",
    op="quantize",
    x_name="M",
    xs=(256, 512, 1024, 2048, 4096, 8192),
    quick=(256, 1024, 4096),
    baseline="reference",
    # Read x in fp32, write q in int8 and one fp32 scale per row.
    nbytes=lambda m: m * _K * 4 + m * _K + m * 4,
    memory_bound=True,
    params={"K": _K, "dtype": "float32"},
    notes=_quantize_notes,
    targets=(Target(x=4096, candidate="frugal", min_speedup=3.0, device="cpu"),),
)
def _quantize_per_token(m, device):
    """Per-token int8 quantization of an [M, K] float32 activation, against PyTorch ops."""
    x = torch.randn(m, _K, device=device)
    candidates = {"frugal": functools.partial(frugal.quantize_per_token, x)}
    if device.type == "cuda":
        for backend in ("triton", "cuda"):
            if unavailable(backend, device) is None:
                candidates[backend] = functools.partial(frugal.quantize_per_token, x,
                                                        backend=backend)
    candidates["reference"] = functools.partial(frugal.reference.quantize_per_token, x)
    return candidates
