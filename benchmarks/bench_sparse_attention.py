"""Block-sparse attention at B=1, H=8, D=64 fp32: frugal.sparse_attention with a sliding
window (512, 1024), causal expressed as a block mask, and BigBird, against torch SDPA causal and
SDPA with the equivalent dense bool mask, on the current default device (CPU here).

Run with ``pytest benchmarks/bench_sparse_attention.py --benchmark-only``; each N is one group,
so pytest-benchmark prints the candidates side by side. ``frugal bench --sweep sparse_attention``
runs the full sweep (N = 1k ... 16k) with GFLOP/s over computed blocks, scaling exponents and
the targets; ``--sweep sparse_attention_break_even`` finds the density above which dense SDPA
wins.
"""

import pytest
import torch
import torch.nn.functional as F

import frugal
from frugal import masks

B, H, D = 1, 8, 64


def mask_for(name, n):
    if name == "window512":
        return masks.sliding_window(n, 512)
    if name == "window1024":
        return masks.sliding_window(n, 1024)
    if name == "bigbird":
        return masks.bigbird(n, window=3, num_global=1, num_random=3, seed=0)
    return masks.causal(n)


def qkv(n):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(B, H, n, D, generator=g) for _ in range(3)]


PATTERNS = ["window512", "window1024", "causal", "bigbird"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n", [2048, 8192])
def test_frugal(benchmark, n, pattern):
    benchmark.group = f"sparse attention N={n}"
    q, k, v = qkv(n)
    mask = mask_for(pattern, n)
    mask.layout(B, H, q.device)  # built once, like a mask reused across layers
    out = benchmark(frugal.sparse_attention, q, k, v, mask)
    assert out.shape == q.shape


@pytest.mark.parametrize("n", [2048, 8192])
def test_sdpa_causal(benchmark, n):
    benchmark.group = f"sparse attention N={n}"
    q, k, v = qkv(n)
    out = benchmark(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    assert out.shape == q.shape


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n", [2048])
def test_sdpa_dense_mask(benchmark, n, pattern):
    benchmark.group = f"sparse attention N={n}"
    q, k, v = qkv(n)
    dense = mask_for(pattern, n).to_dense()
    out = benchmark(F.scaled_dot_product_attention, q, k, v, attn_mask=dense)
    assert out.shape == q.shape
