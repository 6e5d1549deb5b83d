"""The built-in sweeps, one per op, each named after the op it times."""

import functools
import warnings

import torch

import frugal
from frugal.dispatch import unavailable

from .registry import Target, sweep
from .timing import rotation_bytes

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


def _rotating(make, copies):
    """Calls ``make(i)``'s callable for i = 0, 1, ... copies-1 in turn: each copy holds its own
    inputs, so that together they exceed the last-level cache and every call reads memory."""
    fns = [make(i) for i in range(copies)]
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % copies
        return fns[state["i"]]()

    return call


def int_mm_dynamic_linear(x, w_t, w_scale, bias):
    """Int8Linear's W8A8 forward as a user would write it on ``torch._int_mm``: per-token
    quantization of x, the int32 GEMM with the int8 weight ``w_t`` [K, N], then the scales and
    the bias in fp32."""
    x_s = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    xq = (x / x_s).round_().clamp_(-127, 127).to(torch.int8)
    return torch.addcmul(bias, torch._int_mm(xq, w_t).float(), x_s * w_scale)


def quantize_dynamic_linear(linear):
    """torch.ao's dynamic int8 quantization of ``linear`` (fbgemm / oneDNN kernels), without
    torch.ao.quantization's deprecation notices."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)


def int8_linear_errors(n, k, m=16, seed=0):
    """{path: relative error (Frobenius norm) against float64} of the paths the int8 sweeps
    time, on one random nn.Linear (weights N(0, 1/k), bias N(0, 1)) and x N(0, 1) [m, k]:
    what each one's speed buys. torch.ao's quantize_dynamic quantizes x per tensor, and on
    x86 to 7 bits (reduce_range, which keeps its u8 x s8 pair sums from saturating int16)."""
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=gen))
    x = torch.randn(m, k, generator=gen)
    with torch.no_grad():
        return _errors(lin, x)


def _errors(lin, x):
    want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    q = frugal.Int8Linear.from_float(lin, mode="dynamic")
    got = {"w8a8": q(x),
           "weight_only": frugal.Int8Linear.from_float(lin, mode="weight_only")(x),
           "int_mm_dyn": int_mm_dynamic_linear(x, q.weight_int8.t(), q.weight_scale,
                                               lin.bias.detach()),
           "qdynamic": quantize_dynamic_linear(lin)(x),
           "bf16": torch.nn.functional.linear(x.bfloat16(), lin.weight.bfloat16(),
                                              lin.bias.bfloat16())}
    return {name: float((y.double() - want).norm() / want.norm()) for name, y in got.items()}


def _int8_matmul_sweep(name, n, k, xs, quick):
    # On CPU the int8 weight (16 MiB at 4096 x 4096) would stay in the 32 MiB L3 between calls
    # and flatter int8 at small M; rotating copies make every call read it from memory.
    def copies(nbytes):
        return max(1, -(-rotation_bytes() // nbytes))

    def notes(device):
        x = torch.zeros(1, k, device=device)
        linear = frugal.Int8Linear(k, 8, device=device)
        xq, xs = frugal.quantize_per_token(x)
        out = {"auto": str(frugal.explain(frugal.int8_matmul, xq, linear.weight_int8, xs,
                                          linear.weight_scale)),
               "bytes": "GB/s counts the int8 path's traffic: N*K + M*K + 2*M*N"}
        if device.type == "cpu":
            errors = int8_linear_errors(n, k)
            out["relative error vs float64 (M=16)"] = ", ".join(
                f"{name} {err:.1e}" for name, err in errors.items()) + (
                "; quantize_dynamic quantizes x per tensor, to 7 bits on x86 (reduce_range)")
        return out

    targets = []
    for m in xs:
        if m <= 16:
            targets.append(Target(x=m, candidate="w8a8", min_speedup=3.0, versus="fp32"))
        elif m >= 256:
            targets.append(Target(x=m, candidate="w8a8", min_speedup=2.5, versus="fp32"))
            targets.append(Target(x=m, candidate="w8a8", min_speedup=1.0, versus="int_mm"))
        # Int8Linear against every path a user would pick instead (issue 16.1), at every M.
        for other in ("bf16", "int_mm_dyn", "qdynamic"):
            targets.append(Target(x=m, candidate="w8a8", min_speedup=1.0, versus=other))

    @sweep(
        name,
        op="int8_matmul",
        x_name="M",
        xs=xs,
        quick=quick,
        baseline="fp32",
        compare=("bf16", "int_mm", "int_mm_dyn", "qdynamic"),
        flops=lambda m: 2 * m * n * k,
        nbytes=lambda m: n * k + m * k + 2 * m * n,
        params={"N": n, "K": k},
        notes=notes,
        targets=tuple(targets),
        description=f"Int8Linear W8A8 / weight-only and the int8 GEMM, N={n} K={k}, vs fp32 "
                    "and bf16 matmul, torch._int_mm (bare, and with per-token quantization and "
                    "the dequant + bias epilogue) and torch.ao quantize_dynamic",
    )
    def setup(m, device):
        # w8a8: Int8Linear forward (per-token quantization + int8 GEMM with fused epilogue);
        # int8_matmul: the GEMM on quantized inputs; weight_only: Int8Linear(weight_only).

        def linear(i, mode):
            gen = torch.Generator().manual_seed(i)
            lin = torch.nn.Linear(k, n, bias=True)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
            q = frugal.Int8Linear.from_float(lin.to(device), mode=mode)
            x = torch.randn(m, k, generator=gen).to(device)
            return lambda: q(x)

        def gemm(i):
            gen = torch.Generator().manual_seed(i)
            aq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(device)
            bq = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
            a_s, b_s = torch.rand(m, device=device), torch.rand(n, device=device)
            return lambda: frugal.int8_matmul(aq, bq, a_s, b_s, out_dtype=torch.float32)

        def dense(i, dtype):
            gen = torch.Generator().manual_seed(i)
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            w = torch.randn(n, k, generator=gen).to(device, dtype)
            return lambda: torch.matmul(x, w.t())

        def int_mm(i):
            gen = torch.Generator().manual_seed(i)
            a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(device)
            b = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
            return lambda: torch._int_mm(a, b.t())

        def int_mm_dyn(i):
            gen = torch.Generator().manual_seed(i)
            x = torch.randn(m, k, generator=gen).to(device)
            wq = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
            w_s = (torch.rand(n, generator=gen) / 127).to(device)
            bias = torch.randn(n, generator=gen).to(device)
            return lambda: int_mm_dynamic_linear(x, wq.t(), w_s, bias)

        def qdynamic(i):
            gen = torch.Generator().manual_seed(i)
            lin = torch.nn.Linear(k, n, bias=True)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
            q = quantize_dynamic_linear(lin)
            x = torch.randn(m, k, generator=gen)
            return lambda: q(x)

        int8_copies = copies(n * k) if device.type == "cpu" else 1
        fp_copies = copies(4 * n * k) if device.type == "cpu" else 1
        candidates = {
            "w8a8": _rotating(lambda i: linear(i, "dynamic"), int8_copies),
            "weight_only": _rotating(lambda i: linear(i, "weight_only"), int8_copies),
            "int8_matmul": _rotating(gemm, int8_copies),
            "fp32": _rotating(lambda i: dense(i, torch.float32), fp_copies),
            "bf16": _rotating(lambda i: dense(i, torch.bfloat16), copies(2 * n * k)),
        }
        # torch._int_mm on CUDA needs M > 16 and K, N multiples of 8.
        if device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
            candidates["int_mm"] = _rotating(int_mm, int8_copies)
            candidates["int_mm_dyn"] = _rotating(int_mm_dyn, int8_copies)
        if device.type == "cpu":
            candidates["qdynamic"] = _rotating(qdynamic, int8_copies)
        return candidates

    return setup


_int8_matmul_sweep("int8_matmul", 4096, 4096, (1, 4, 16, 64, 256, 1024, 2048), (1, 16, 256))
_int8_matmul_sweep("int8_matmul_n11008", 11008, 4096, (1, 16, 256, 1024), (1, 256))
