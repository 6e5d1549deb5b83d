"""int8 matmul C++ CPU kernels against torch on the same shapes, in the same run.

    .venv/bin/python benchmarks/bench_int8_matmul_cpu.py [--threads 2] [--rounds 7] [--m 1 4 16]
        [--nk 4096 4096] [--stat median|min]

Every op of one shape is timed in turn inside each round (interleaved, so a slow spell on a
shared machine hits all of them); a round's time is the best of a few back-to-back calls, and
the table shows the median (or the best) over rounds. Ratios are speed-ups: the baseline's time
over the op's time. "x best torch" is over the fastest of the paths a user would pick instead of
Int8Linear (issue 16.1): bf16 matmul, torch._int_mm with per-token quantization and the
dequant + bias epilogue, and torch.ao quantize_dynamic.
"""

import argparse
import statistics
import time

import frugal  # noqa: F401  (loads frugal._C and its ops)
import torch
from frugal.bench.builtin import int_mm_dynamic_linear, quantize_dynamic_linear

SHAPES = [(4096, 4096), (11008, 4096)]
MS = [1, 4, 16, 256, 1024, 2048]


def _once(fn, calls):
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(fns, rounds, stat):
    """Seconds per call of each fn, timed interleaved: median or min over rounds."""
    for fn in fns.values():  # warm-up, and a call count that takes ~20 ms per round
        fn()
    calls = {k: max(1, min(20, int(0.02 / max(_once(fn, 1), 1e-6)))) for k, fn in fns.items()}
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_once(fn, calls[k]))
    pick = statistics.median if stat == "median" else min
    return {k: pick(v) for k, v in times.items()}


def bench_shape(M, N, K, rounds, stat):
    ops = torch.ops.frugal
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    a_scale = torch.rand(M, generator=g) + 0.5
    b_scale = torch.rand(N, generator=g) / 100
    bias = torch.randn(N, generator=g)
    packed = ops.int8_pack_weight(b)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    bt = b.t()
    xb, wb = x.bfloat16(), w.bfloat16()
    qdyn = quantize_dynamic_linear(torch.nn.Linear(K, N))
    users = {"bf16 matmul": lambda: torch.matmul(xb, wb.t()),
             "_int_mm + quant/epilogue": lambda: int_mm_dynamic_linear(x, bt, b_scale, bias),
             "quantize_dynamic": lambda: qdyn(x)}
    fns = {**users,
        "fp32 matmul": lambda: torch.matmul(x, w.t()),
        "torch._int_mm": lambda: torch._int_mm(a, bt),
        "int8_scaled_mm_packed": lambda: ops.int8_scaled_mm_packed(
            a, packed, a_scale, b_scale, bias, torch.float16
        ),
        # Int8Linear's W8A8 forward: fp32 x quantized per token inside the GEMM, fp32 out.
        "int8_dynamic_linear_packed": lambda: ops.int8_dynamic_linear_packed(
            x, packed, b_scale, bias
        ),
        "int8_scaled_mm": lambda: ops.int8_scaled_mm(a, b, a_scale, b_scale, bias, torch.float16),
        "int8_mm": lambda: ops.int8_mm(a, b),
    }
    if M <= 16:
        fns["int8_weight_only_mm"] = lambda: ops.int8_weight_only_mm(x, b, b_scale, bias)
    times = measure(fns, rounds, stat)
    best_user = min(times[k] for k in users)
    rows = []
    for name, t in times.items():
        weight_bytes = N * K * (4 if name == "fp32 matmul" else 1)
        rows.append(
            (
                M,
                N,
                K,
                name,
                t * 1e3,
                2 * M * N * K / t / 1e9,
                weight_bytes / t / 1e9,
                times["fp32 matmul"] / t,
                times["torch._int_mm"] / t,
                best_user / t,
            )
        )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--m", type=int, nargs="+", default=MS)
    p.add_argument("--nk", type=int, nargs=2, action="append", metavar=("N", "K"))
    p.add_argument("--stat", choices=["median", "min"], default="median")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"frugal ISA {frugal._C.cpu_isa()}, {args.stat} of {args.rounds} rounds"
    )
    header = ("M", "N", "K", "op", "ms", "GOP/s", "weight GB/s", "x fp32", "x _int_mm",
              "x best torch")
    print(
        f"{header[0]:>5} {header[1]:>6} {header[2]:>5}  {header[3]:<26} {header[4]:>9} "
        f"{header[5]:>8} {header[6]:>11} {header[7]:>7} {header[8]:>9} {header[9]:>12}"
    )
    for N, K in args.nk or SHAPES:
        for M in args.m:
            for r in bench_shape(M, N, K, args.rounds, args.stat):
                print(
                    f"{r[0]:>5} {r[1]:>6} {r[2]:>5}  {r[3]:<26} {r[4]:>9.3f} {r[5]:>8.1f} "
                    f"{r[6]:>11.1f} {r[7]:>7.2f} {r[8]:>9.2f} {r[9]:>12.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
