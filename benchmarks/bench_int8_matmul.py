"""int8 matmul at K = N = 4096: Int8Linear (W8A8 and weight-only) against fp32 and bf16
torch.matmul and torch._int_mm, on the current default device (CPU here).

Run with ``pytest benchmarks/bench_int8_matmul.py --benchmark-only``; each M is one group, so
pytest-benchmark prints the candidates side by side. ``frugal bench --sweep int8_matmul`` runs
the full sweep (M = 1 ... 2048, and N = 11008) with GOP/s, scaling exponents and the targets;
``benchmarks/bench_int8_matmul_cpu.py`` times the C++ kernels alone, interleaved.
"""

import pytest
import torch

import frugal

N = K = 4096


def candidates(m):
    gen = torch.Generator().manual_seed(m)
    linear = torch.nn.Linear(K, N)
    x = torch.randn(m, K, generator=gen)
    w8a8 = frugal.Int8Linear.from_float(linear, mode="dynamic")
    weight_only = frugal.Int8Linear.from_float(linear, mode="weight_only")
    w, xb, wb = linear.weight.detach(), x.bfloat16(), linear.weight.detach().bfloat16()
    a = torch.randint(-127, 128, (m, K), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    return {
        "w8a8": lambda: w8a8(x),
        "weight_only": lambda: weight_only(x),
        "fp32": lambda: torch.matmul(x, w.t()),
        "bf16": lambda: torch.matmul(xb, wb.t()),
        "int_mm": lambda: torch._int_mm(a, b.t()),
    }


@pytest.mark.parametrize("impl", ["w8a8", "weight_only", "fp32", "bf16", "int_mm"])
@pytest.mark.parametrize("m", [1, 16, 256])
def test_int8_matmul(benchmark, m, impl):
    benchmark.group = f"int8 matmul M={m} N={N} K={K}"
    y = benchmark(candidates(m)[impl])
    assert y.shape == (m, N)
