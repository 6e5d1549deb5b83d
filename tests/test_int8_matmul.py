"""The public int8 matmul API on every backend: exact int32 results, fused-epilogue outputs
within the output dtype's rounding, leading batch dims, non-contiguous inputs, bad input."""

import pytest
import torch
from conftest import backends_for

import frugal
from frugal import reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def int8_backends(device):
    return [b for b in backends_for(device) if b != "cuda"]


def rand_int8(shape, gen, device):
    t = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    t.view(-1)[:2] = torch.tensor([-128, 127], dtype=torch.int8)[: t.numel()]
    return t.to(device)


def epilogue_ref64(a, b, a_scale, b_scale, bias):
    """The epilogue in float64, and the magnitude its fp32 rounding errors scale with."""
    acc = a.reshape(-1, a.shape[-1]).double() @ b.double().t()
    p = acc * a_scale.double().reshape(-1, 1) * b_scale.double().reshape(1, -1)
    y, mag = p, p.abs()
    if bias is not None:
        y, mag = p + bias.double(), mag + bias.double().abs()
    shape = (*a.shape[:-1], b.shape[0])
    return y.reshape(shape), mag.reshape(shape)


def assert_rounding_close(y, ref64, mag, dtype):
    # A few fp32 roundings in the epilogue (relative to the terms' magnitude: the bias may
    # cancel the product), then one rounding to dtype (relative to the result).
    err = (y.double().cpu() - ref64.cpu()).abs()
    bound = (torch.finfo(dtype).eps * ref64.abs() + 4 * torch.finfo(torch.float32).eps * mag)
    assert (err <= bound.cpu() + 1e-30).all(), (err - bound.cpu()).max()


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 33, 67), (5, 7, 300), (17, 16, 64),
                                   (40, 130, 129)])
def test_int8_mm_exact(device, poison, M, N, K):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    a, b = rand_int8((M, K), gen, device), rand_int8((N, K), gen, device)
    want = reference.int8_mm(a.cpu(), b.cpu())
    for backend in int8_backends(device):
        got = frugal.int8_mm(a, b, backend=backend)
        assert got.dtype == torch.int32 and torch.equal(got.cpu(), want), backend


def test_int8_mm_non_contiguous(device, poison):
    gen = torch.Generator().manual_seed(5)
    a = rand_int8((70, 40), gen, device).t()  # [40, 70] with K strided
    b = rand_int8((90, 70), gen, device)[::2]  # [45, 70] with a row stride of 2K
    want = reference.int8_mm(a.cpu(), b.cpu())
    for backend in int8_backends(device):
        assert torch.equal(frugal.int8_mm(a, b, backend=backend).cpu(), want), backend


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scalar_scales", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_matmul_epilogue(device, poison, out_dtype, scalar_scales, with_bias):
    gen = torch.Generator().manual_seed(17)
    lead, K, N = (3, 5), 100, 33
    aq, bq = rand_int8((*lead, K), gen, device), rand_int8((N, K), gen, device)
    if scalar_scales:
        a_scale, b_scale = torch.tensor(0.013, device=device), torch.tensor([0.02], device=device)
    else:
        a_scale = (torch.rand(lead, generator=gen) + 0.01).to(device) / 100
        b_scale = (torch.rand(N, generator=gen) + 0.01).to(device) / 100
    bias = torch.randn(N, generator=gen).to(out_dtype).to(device) if with_bias else None
    ref64, mag = epilogue_ref64(aq, bq, a_scale, b_scale, bias)
    for backend in int8_backends(device):
        if backend == "triton" and device == "cpu" and out_dtype == torch.bfloat16:
            continue  # the interpreter's bf16 arithmetic is broken; compiled by `frugal check`
        y = frugal.int8_matmul(aq, bq, a_scale, b_scale, bias, out_dtype, backend=backend)
        assert y.shape == (*lead, N) and y.dtype == out_dtype, backend
        assert_rounding_close(y, ref64, mag, out_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_weight_only(device, poison, dtype):
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(2, 3, 200, generator=gen).to(dtype).to(device)
    bq = rand_int8((45, 200), gen, device)
    b_scale = (torch.rand(45, generator=gen) / 50).to(device)
    bias = torch.randn(45, generator=gen).to(dtype).to(device)
    ref64 = (x.double() @ bq.double().t()) * b_scale.double() + bias.double()
    # Error of float accumulation over K terms, then one rounding to dtype.
    scale = (x.double().abs() @ bq.double().abs().t()) * b_scale.double() + bias.double().abs()
    tol = (torch.finfo(dtype).eps * 2 + 200 * torch.finfo(torch.float32).eps) * scale.cpu()
    for backend in int8_backends(device):
        y = frugal.int8_weight_only_matmul(x, bq, b_scale, bias, backend=backend)
        assert y.dtype == dtype and y.shape == (2, 3, 45), backend
        assert ((y.double().cpu() - ref64.cpu()).abs() <= tol).all(), backend


def test_quantize_then_matmul_close_to_float(device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=gen).to(device)
    w = torch.randn(96, 256, generator=gen).to(device)
    xq, xs = frugal.quantize_per_token(x)
    wq, ws = frugal.quantize_per_channel(w)
    y = frugal.int8_matmul(xq, wq, xs, ws, out_dtype=torch.float32)
    ref = x @ w.t()
    assert (y - ref).norm() / ref.norm() < 0.02


def test_empty_results(device):
    b = torch.zeros(6, 8, dtype=torch.int8, device=device)
    for backend in int8_backends(device):
        y = frugal.int8_matmul(torch.zeros(0, 8, dtype=torch.int8, device=device), b,
                               torch.ones(0, device=device), torch.ones(6, device=device),
                               backend=backend)
        assert y.shape == (0, 6) and y.dtype == torch.float16
        assert frugal.int8_mm(torch.zeros(0, 8, dtype=torch.int8, device=device), b,
                              backend=backend).shape == (0, 6)


def test_bad_input():
    a = torch.zeros(4, 8, dtype=torch.int8)
    b = torch.zeros(6, 8, dtype=torch.int8)
    s_a, s_b = torch.ones(4), torch.ones(6)
    with pytest.raises(frugal.DTypeError, match="aq must be int8; got torch.float32"):
        frugal.int8_matmul(a.float(), b, s_a, s_b)
    with pytest.raises(frugal.ShapeError, match=r"bq.shape\[1\] \(K\) must equal aq.shape\[-1\] = 8; got 9"):
        frugal.int8_matmul(a, torch.zeros(6, 9, dtype=torch.int8), s_a, s_b)
    with pytest.raises(frugal.ShapeError, match=r"a_scale must have shape \(4,\).*got shape \(3,\)"):
        frugal.int8_matmul(a, b, torch.ones(3), s_b)
    with pytest.raises(frugal.DTypeError, match="b_scale must be float32; got torch.float16"):
        frugal.int8_matmul(a, b, s_a, s_b.half())
    with pytest.raises(frugal.ShapeError, match="bq must be 2-D .*got a 1-d tensor"):
        frugal.int8_matmul(a, torch.zeros(8, dtype=torch.int8), s_a, s_b)
    with pytest.raises(frugal.ShapeError, match="bq must be 2-D .*got a 3-d tensor"):
        frugal.int8_matmul(a, torch.zeros(1, 6, 8, dtype=torch.int8), s_a, s_b)
    with pytest.raises(frugal.ShapeError, match=r"bias must have shape \(6,\)"):
        frugal.int8_matmul(a, b, s_a, s_b, bias=torch.zeros(5))
    with pytest.raises(frugal.DTypeError, match="out_dtype must be .*got torch.int8"):
        frugal.int8_matmul(a, b, s_a, s_b, out_dtype=torch.int8)
    big = torch.zeros(1, frugal.INT8_MAX_K + 1, dtype=torch.int8)
    with pytest.raises(frugal.ShapeError, match=r"K must be <= 131071 .*got K=131072"):
        frugal.int8_mm(big, big)
    with pytest.raises(frugal.DTypeError, match="b must be int8; got torch.float32"):
        frugal.int8_mm(a, b.float())
    with pytest.raises(frugal.BackendError, match="backend='cuda' needs CUDA tensors; got "
                                                  "device cpu"):
        frugal.int8_mm(a, b, backend="cuda")
    with pytest.raises(frugal.BackendError, match="backend must be one of"):
        frugal.int8_mm(a, b, backend="cutlass")
    with pytest.raises(frugal.ShapeError, match="w must be 2-D"):
        frugal.quantize_per_channel(torch.randn(2, 3, 4))
    with pytest.raises(frugal.DTypeError, match="x must be float32, float16 or bfloat16"):
        frugal.int8_weight_only_matmul(a, b, s_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CPU and a CUDA device")
def test_devices_that_differ():
    a = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(frugal.DeviceError, match="b must be on the same device as a"):
        frugal.int8_mm(a, a.cuda())
