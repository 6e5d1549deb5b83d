"""Paged decode attention (Hq=32, Hkv=8, D=128, block_size 16, fp32 on CPU, fp16 on CUDA):
frugal.paged_attention against SDPA over a contiguous cache (query heads folded per kv head,
and enable_gqa=True) and gather-then-SDPA, on CUDA when present, else the CPU.

Run with ``pytest benchmarks/bench_paged_attention.py --benchmark-only``; each shape (B,
context, window) is one group, so pytest-benchmark prints the candidates side by side. The
candidates and their inputs are those of ``frugal bench --sweep paged_attention`` (and
``paged_attention_b1``, ``_b32``, ``_window``), which runs the full context sweep with GB/s
against the copy bandwidth, scaling exponents and the targets;
``benchmarks/bench_paged_attention_cpu.py`` times the C++ kernel alone, interleaved.
"""

import functools

import pytest
import torch

from frugal.bench.paged import HQ, decode_candidates

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, context, window); the windowed shape is timed against SDPA over the window's positions.
SHAPES = [(1, 4096, None), (8, 4096, None), (32, 2048, None), (8, 32768, 4096)]
CASES = [(shape, impl) for shape in SHAPES
         for impl in (("paged", "sdpa", "sdpa_gqa", "gather_sdpa") if shape[2] is None
                      else ("paged", "sdpa"))]


@functools.lru_cache(maxsize=1)
def candidates(batch, context, window):
    # One shape's inputs at a time: the cases of a shape run one after another.
    return decode_candidates(batch, context, DEVICE, window,
                             [impl for shape, impl in CASES if shape == (batch, context, window)])


@pytest.mark.parametrize("shape, impl", CASES,
                         ids=[f"B{b}-{c}" + (f"-window{w}" if w else "") + f"-{impl}"
                              for (b, c, w), impl in CASES])
def test_paged_attention(benchmark, shape, impl):
    batch, context, window = shape
    benchmark.group = (f"paged decode B={batch} context={context}"
                       + (f" window={window}" if window else ""))
    out = benchmark(candidates(batch, context, window)[impl])
    assert out.shape == (batch, HQ, 128)
