"""quantize_per_token: frugal (auto backend) against the PyTorch reference on CPU, K = 4096.

Run with ``pytest benchmarks/bench_quantize.py --benchmark-only``; each M is one group, so
pytest-benchmark prints the two side by side. ``frugal bench --sweep quantize_per_token`` runs
the full sweep with throughput and scaling exponents.
"""

import pytest
import torch

import frugal

K = 4096
IMPLS = {"frugal": frugal.quantize_per_token, "reference": frugal.reference.quantize_per_token}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("m", [1024, 4096])
def test_quantize_per_token(benchmark, m, impl):
    benchmark.group = f"quantize_per_token M={m} K={K}"
    x = torch.randn(m, K)
    q, scale = benchmark(IMPLS[impl], x)
    assert q.shape == (m, K) and scale.shape == (m,)
