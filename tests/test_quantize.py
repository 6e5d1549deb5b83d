import math

import pytest
import torch
from conftest import backends_for

import frugal
from frugal import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 1), (5, 37), (3, 4, 37), (33, 129), (17, 1000), (4, 4097), (2, 70001)]


def random_rows(shape, dtype, device, gen, lo=-30, hi=30):
    """Normal values scaled per row by 10**u, u uniform in [lo, hi] (clipped to the dtype)."""
    info = torch.finfo(dtype)
    lo = max(lo, math.log10(info.tiny) + 3)
    hi = min(hi, math.log10(info.max) - 3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mag = torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(lo, hi, generator=gen)
    return (x * 10.0**mag).to(dtype).to(device)


def assert_same(got, want):
    q, s = got
    q_ref, s_ref = want
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(q.cpu(), q_ref.cpu()), (q - q_ref).abs().max()
    torch.testing.assert_close(s.cpu(), s_ref.cpu(), rtol=0, atol=0, equal_nan=True)


def check_semantics(x, q, s):
    """The reference against its definition, computed in float64."""
    x64 = x.double().cpu().reshape(-1, x.shape[-1])
    q64 = q.double().cpu().reshape(x64.shape)
    s64 = s.double().cpu().reshape(-1)
    amax = x64.abs().amax(-1)
    assert torch.equal(s64, (amax / 127).float().double())  # absmax / 127, rounded to fp32
    ratio = x64 / s64[:, None]
    # round half to even of x / scale (fp32 division may move a value by 1 ulp of 127).
    assert (q64 - ratio).abs().max() <= 0.5 + 1e-5
    assert q64.abs().max() <= 127


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, poison, dtype, shape):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x = random_rows(shape, dtype, device, gen)
    want = reference.quantize_per_token(x.cpu())
    check_semantics(x, *want)
    for backend in backends_for(device):
        # bf16 too under the interpreter: the kernel only loads bf16 and converts it to fp32,
        # which the interpreter does right (its bf16 arithmetic is what is broken).
        assert_same(frugal.quantize_per_token(x, backend=backend), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_isa_paths_agree(cpu_isa, poison, dtype):
    gen = torch.Generator().manual_seed(7)
    for shape in [(1, 1), (9, 15), (9, 16), (9, 17), (3, 31), (3, 33), (5, 1000), (2, 4099)]:
        x = random_rows(shape, dtype, "cpu", gen)
        x[0, 0] = 0.0
        assert_same(frugal.quantize_per_token(x, backend="cpu"), reference.quantize_per_token(x))


def test_round_half_to_even(device):
    # Rows whose absmax is 127, so x / scale = x exactly: the halves must go to even.
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, -126.5, 127.0])
    x = halves.repeat(3, 1).to(device)
    want = torch.tensor([0, 2, 2, 0, -2, -2, 126, -126, 127], dtype=torch.int8)
    for backend in backends_for(device):
        q, s = frugal.quantize_per_token(x, backend=backend)
        assert torch.equal(s.cpu(), torch.ones(3)), backend
        assert torch.equal(q.cpu(), want.repeat(3, 1)), backend


def test_non_contiguous(device, poison):
    gen = torch.Generator().manual_seed(3)
    base = random_rows((40, 130), torch.float32, device, gen, -3, 3)
    for x in [base.t(), base[:, ::2], base[::3], base[::2, 1:-1], base.t()[5:9]]:
        assert not x.is_contiguous()
        want = reference.quantize_per_token(x.contiguous())
        for backend in backends_for(device):
            assert_same(frugal.quantize_per_token(x, backend=backend), want)


def test_zero_inf_nan_rows(device, poison):
    x = torch.randn(6, 50, device=device)
    x[0] = 0.0
    x[1, 7] = float("inf")
    x[2, 0] = float("-inf")
    x[3, 49] = float("nan")
    x[4] = -0.0
    for backend in backends_for(device):
        q, s = frugal.quantize_per_token(x, backend=backend)
        q, s = q.cpu(), s.cpu()
        assert s[0] == 0 and s[4] == 0, backend
        assert torch.isnan(s[1:4]).all(), backend
        assert torch.isfinite(s[5]) and s[5] > 0, backend
        assert not q[:5].any(), backend
        assert q[5].abs().max() == 127, backend
        deq = frugal.dequantize(q, s)
        assert torch.isnan(deq[1:4]).all() and not deq[0].any()


def test_empty(device):
    for backend in backends_for(device):
        q, s = frugal.quantize_per_token(torch.randn(0, 16, device=device), backend=backend)
        assert q.shape == (0, 16) and s.shape == (0,), backend
        q, s = frugal.quantize_per_token(torch.randn(5, 0, device=device), backend=backend)
        assert q.shape == (5, 0) and torch.equal(s.cpu(), torch.zeros(5)), backend
        q, s = frugal.quantize_per_token(torch.randn(3, 0, 4, device=device), backend=backend)
        assert q.shape == (3, 0, 4) and s.shape == (3, 0), backend


def test_one_dim_input(device):
    x = torch.randn(33, device=device)
    want = reference.quantize_per_token(x.cpu())
    assert want[1].shape == ()
    for backend in backends_for(device):
        assert_same(frugal.quantize_per_token(x, backend=backend), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dequantize_round_trip(device, dtype):
    gen = torch.Generator().manual_seed(11)
    x = random_rows((19, 300), dtype, device, gen, -4, 4)
    q, s = frugal.quantize_per_token(x)
    for out_dtype in DTYPES:
        y = frugal.dequantize(q, s, out_dtype)
        assert y.dtype == out_dtype and y.shape == x.shape
        err = (y.double() - x.double()).abs().amax(-1)
        out_eps = torch.finfo(out_dtype).eps
        bound = s.double() * 0.5 + x.double().abs().amax(-1) * (out_eps + 1e-6)
        assert (err <= bound).all()
    one = frugal.dequantize(q, s[0].clone())  # 0-d: one scale for every row
    torch.testing.assert_close(one, q.float() * s[0])


def test_bad_input_errors():
    x = torch.randn(4, 8)
    before = x.clone()
    with pytest.raises(frugal.DTypeError, match=r"x must be float32, float16 or bfloat16; got torch.int32"):
        frugal.quantize_per_token(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(frugal.DTypeError, match="got torch.float64"):
        frugal.quantize_per_token(x.double())
    with pytest.raises(frugal.ShapeError, match=r"x must have at least 1 dim.*got a 0-d tensor"):
        frugal.quantize_per_token(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x must be a torch.Tensor; got list"):
        frugal.quantize_per_token([1.0, 2.0])
    with pytest.raises(frugal.BackendError, match=r"backend='cuda' needs CUDA tensors; got device cpu"):
        frugal.quantize_per_token(x, backend="cuda")
    with pytest.raises(frugal.BackendError, match=r"backend must be one of .*got 'fast'"):
        frugal.quantize_per_token(x, backend="fast")
    assert torch.equal(x, before)


def test_dequantize_errors():
    q = torch.zeros(4, 8, dtype=torch.int8)
    s = torch.ones(4)
    with pytest.raises(frugal.DTypeError, match="q must be int8; got torch.float32"):
        frugal.dequantize(q.float(), s)
    with pytest.raises(frugal.DTypeError, match="scale must be float32; got torch.float16"):
        frugal.dequantize(q, s.half())
    with pytest.raises(frugal.ShapeError, match=r"scale must have shape \(4,\).*got \(5,\)"):
        frugal.dequantize(q, torch.ones(5))
    with pytest.raises(frugal.DTypeError, match="out_dtype must be .*got torch.int32"):
        frugal.dequantize(q, s, torch.int32)
    with pytest.raises(frugal.BackendError, match="not implemented for this op"):
        frugal.dequantize(q, s, backend="cpu")
