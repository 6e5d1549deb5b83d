"""Custom-op plumbing: schemas, fake kernels, torch.compile, and backend dispatch."""

import logging

import pytest
import torch
from conftest import HAS_CUDA, backends_for

import frugal


def op_for(backend):
    if backend == "triton":
        return torch.ops.frugal.quantize_per_token_triton.default
    return torch.ops.frugal.quantize_per_token.default


@pytest.mark.parametrize("shape", [(5, 33), (2, 3, 64), (1, 1)], ids=str)
def test_opcheck(device, shape):
    x = torch.randn(shape, device=device)
    for backend in backends_for(device):
        if backend == "torch":
            continue  # plain PyTorch ops, no custom op to check
        torch.library.opcheck(op_for(backend), (x,))


def test_torch_compile(device):
    x = torch.randn(6, 40, device=device)
    for backend in backends_for(device):
        fn = torch.compile(lambda t, b=backend: frugal.quantize_per_token(t, backend=b),
                           fullgraph=True, dynamic=True)
        for rows in (6, 9):
            t = torch.randn(rows, 40, device=device)
            q, s = fn(t)
            q_ref, s_ref = frugal.reference.quantize_per_token(t)
            assert torch.equal(q, q_ref) and torch.equal(s, s_ref), backend
    deq = torch.compile(frugal.dequantize, fullgraph=True)
    q, s = frugal.quantize_per_token(x)
    torch.testing.assert_close(deq(q, s), q.float() * s[:, None])


def test_explain_names_the_backend():
    x = torch.randn(2, 8)
    choice = frugal.explain(frugal.quantize_per_token, x)
    assert choice.backend == "cpu" and "C++ kernel" in choice.reason
    assert frugal._ext.ext().cpu_isa() in choice.reason
    assert frugal.explain(frugal.quantize_per_token, x, backend="torch").backend == "torch"
    assert frugal.explain(frugal.dequantize, *frugal.quantize_per_token(x)).backend == "torch"
    with pytest.raises(frugal.BackendError, match="backend='cuda' needs CUDA tensors"):
        frugal.explain(frugal.quantize_per_token, x, backend="cuda")
    with pytest.raises(TypeError, match="explain: op must be a public frugal op"):
        frugal.explain(torch.matmul, x, x)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a CPU-only machine gives")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(frugal.BackendError,
                       match=r"backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1"):
        frugal.quantize_per_token(torch.randn(2, 8), backend="triton")


def test_debug_log(caplog):
    frugal.set_debug(True)
    try:
        with caplog.at_level(logging.INFO, logger="frugal"):
            frugal.quantize_per_token(torch.randn(2, 8))
    finally:
        frugal.set_debug(False)
    assert "quantize_per_token: backend='cpu'" in caplog.text


def test_auto_falls_back_when_extension_missing(monkeypatch):
    monkeypatch.setattr(frugal._ext, "_C", None)
    monkeypatch.setattr(frugal._ext, "_ERROR", "frugal._C failed to import (test)")
    x = torch.randn(3, 8)
    choice = frugal.explain(frugal.quantize_per_token, x)
    assert choice.backend == "torch" and "failed to import (test)" in choice.reason
    with pytest.raises(frugal.BackendError, match=r"failed to import \(test\)"):
        frugal.quantize_per_token(x, backend="cpu")


def int8_op_cases(device):
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(-128, 128, (5, 37), generator=gen, dtype=torch.int8).to(device)
    b = torch.randint(-128, 128, (19, 37), generator=gen, dtype=torch.int8).to(device)
    sa, sb = torch.rand(5, generator=gen).to(device), torch.rand(19, generator=gen).to(device)
    bias, x = torch.randn(19, generator=gen).to(device), torch.randn(5, 37, generator=gen).to(device)
    ops = torch.ops.frugal
    cases = {"triton": [(ops.int8_mm_triton, (a, b)),
                        (ops.int8_scaled_mm_triton, (a, b, sa, sb, bias, torch.float16)),
                        (ops.int8_weight_only_mm_triton, (x, b, sb, bias))]}
    if device == "cpu":
        packed = ops.int8_pack_weight(b)
        cases["cpu"] = [(ops.int8_mm, (a, b)),
                        (ops.int8_scaled_mm, (a, b, sa, sb, bias, torch.float16)),
                        (ops.int8_pack_weight, (b,)),
                        (ops.int8_scaled_mm_packed, (a, packed, sa, sb, None, torch.float32)),
                        (ops.int8_weight_only_mm, (x, b, sb, bias))]
    return cases


def test_opcheck_int8(device):
    cases = int8_op_cases(device)
    for backend in backends_for(device):
        for op, args in cases.get(backend, []):
            torch.library.opcheck(op.default, args)


def test_int8_linear_under_torch_compile(device):
    linear = torch.nn.Linear(64, 24).to(device)
    for mode in ("dynamic", "weight_only"):
        q = frugal.Int8Linear.from_float(linear, mode=mode)
        x = torch.randn(3, 5, 64, device=device)
        torch.testing.assert_close(torch.compile(q, fullgraph=True)(x), q(x), rtol=1e-5,
                                   atol=1e-5)
