"""frugal.sparse_attention through its public API, on every backend that runs here.

Outputs are compared with a float64 dense computation of the same mask (BlockMask.to_dense),
with FlashAttention's accuracy rule: the backend's max error is at most 2x the error of plain
PyTorch attention in the same precision (plus a small floor for fp32, where both are tiny).
Outputs are poisoned before each call; sizes are not multiples of the block; gradients are
compared with float64 autograd through the reference."""

import importlib
import importlib.util

import pytest
import torch

import frugal
from frugal import masks, reference
from frugal.errors import BackendError, DeviceError, DTypeError, ShapeError

from conftest import backends_for

sa_mod = importlib.import_module("frugal.sparse_attention")  # the function shadows it
HAS_TRITON_KERNEL = importlib.util.find_spec("frugal.kernels.sparse_attention") is not None


def sparse_backends(device):
    names = []
    for name in backends_for(device):
        if name == "cpu" and not sa_mod._has_cpu_ops():
            continue
        if name == "triton" and not HAS_TRITON_KERNEL:
            continue
        if name == "cuda":
            continue
        names.append(name)
    return names


FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_qkv(B, hq, hkv, nq, nk, d, dtype, device, seed=0, layout="bhnd"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, hkv, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, hkv, nk, d, generator=g, dtype=torch.float64)
    if layout == "bnhd":  # non-contiguous views of [B, N, H, D] storage
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def check_close(out, lse, q64, k64, v64, mask, dtype, scale=None):
    ref_out, ref_lse = reference.sparse_attention(q64, k64, v64, mask, scale)
    low_out, _ = reference.sparse_attention(q64.to(dtype), k64.to(dtype), v64.to(dtype), mask,
                                            scale)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert not torch.isnan(out).any(), "NaN in the output"
    err = (out.double() - ref_out).abs().max().item()
    base = (low_out.double() - ref_out).abs().max().item()
    assert err <= 2 * base + FLOOR[dtype], f"max error {err:.3g} > 2 x {base:.3g} + floor"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse is -inf exactly on empty rows"
    assert (lse[~finite] == float("-inf")).all()
    lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    assert lse_err <= 1e-3 if dtype == torch.float32 else lse_err <= 2e-2, lse_err


MASKS = {
    "causal": lambda nq, nk, bs: masks.causal(nq, nk, block_size=bs),
    "causal_top_left": lambda nq, nk, bs: masks.causal(nq, nk, block_size=bs, align="top_left"),
    "window": lambda nq, nk, bs: masks.sliding_window(nq, 70, nk, block_size=bs),
    "window_2sided": lambda nq, nk, bs: masks.sliding_window(nq, (40, 90), nk, causal=False,
                                                             block_size=bs),
    "prefix_lm": lambda nq, nk, bs: masks.prefix_lm(nq, 77, nk, block_size=bs),
    "dense_random": lambda nq, nk, bs: frugal.BlockMask.from_dense(
        torch.rand(nq, nk, generator=torch.Generator().manual_seed(3)) < 0.2, block_size=bs),
    "window_or_prefix": lambda nq, nk, bs: (masks.sliding_window(nq, 40, nk, block_size=bs)
                                            | masks.prefix_lm(nq, 20, nk, block_size=bs)),
}


def _sizes(backend):
    # The Triton interpreter is slow: keep its problems small.
    return (1, 130, 200, 32) if backend == "triton" else (2, 300, 333, 64)


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_float64(device, poison, name, dtype):
    for backend in sparse_backends(device):
        B, nq, nk, d = _sizes(backend)
        for (qn, kn) in ((nq, nk), (nk, nq)):
            mask = MASKS[name](qn, kn, 64)
            q, k, v = make_qkv(B, 4, 2, qn, kn, d, torch.float64, device)
            out, lse = frugal.sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask,
                                               return_lse=True, backend=backend)
            check_close(out, lse, q, k, v, mask, dtype)


@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_head_dims_gqa_noncontiguous(device, poison, d):
    for backend in sparse_backends(device):
        nq = 70 if backend == "triton" else 260
        for hq, hkv in ((4, 4), (4, 1), (8, 2)):
            mask = masks.sliding_window(nq, 100, block_size=(64, 128))
            q, k, v = make_qkv(1, hq, hkv, nq, nq, d, torch.float64, device, layout="bnhd")
            dt = torch.float32
            out, lse = frugal.sparse_attention(q.to(dt), k.to(dt), v.to(dt), mask,
                                               scale=0.3, return_lse=True, backend=backend)
            check_close(out, lse, q, k, v, mask, dt, scale=0.3)


def test_document_mask_per_batch(device, poison):
    for backend in sparse_backends(device):
        n = 150 if backend == "triton" else 400
        g = torch.Generator().manual_seed(1)
        ids = torch.sort(torch.randint(0, 6, (2, n), generator=g)).values
        mask = masks.causal(n, block_size=64) & masks.document(ids, block_size=64)
        q, k, v = make_qkv(2, 2, 2, n, n, 32, torch.float64, device)
        out, lse = frugal.sparse_attention(q.float(), k.float(), v.float(), mask,
                                           return_lse=True, backend=backend)
        check_close(out, lse, q, k, v, mask, torch.float32)


def test_per_head_mask_broadcast(device, poison):
    for backend in sparse_backends(device):
        n = 100 if backend == "triton" else 200
        dense = torch.rand(1, 4, n, n, generator=torch.Generator().manual_seed(5)) < 0.1
        mask = frugal.BlockMask.from_dense(dense, block_size=64)
        q, k, v = make_qkv(3, 4, 2, n, n, 32, torch.float64, device)
        out, lse = frugal.sparse_attention(q.float(), k.float(), v.float(), mask,
                                           return_lse=True, backend=backend)
        check_close(out, lse, q, k, v, mask, torch.float32)


def test_empty_rows_give_zeros_and_no_gradient(device):
    for backend in sparse_backends(device):
        nq, nk = 200, 90  # bottom-right causal: the first 110 queries see no key
        mask = masks.causal(nq, nk, block_size=64)
        q, k, v = make_qkv(1, 2, 2, nq, nk, 32, torch.float32, device)
        q.requires_grad_(True)
        out, lse = frugal.sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
        assert not torch.isnan(out).any()
        assert (out[:, :, :110] == 0).all()
        assert (lse[:, :, :110] == float("-inf")).all()
        assert torch.isfinite(lse[:, :, 110:]).all()
        out.sum().backward()
        assert not torch.isnan(q.grad).any()
        assert (q.grad[:, :, :110] == 0).all()


@pytest.mark.parametrize("name", ["causal", "window", "dense_random", "prefix_lm"])
def test_gradients_match_float64_autograd(device, name):
    for backend in sparse_backends(device):
        nq, nk = (100, 140) if backend == "triton" else (200, 260)
        mask = MASKS[name](nq, nk, 64)
        q, k, v = make_qkv(1, 4, 2, nq, nk, 32, torch.float64, device, seed=7)
        g = torch.randn(1, 4, nq, 32, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(8)).to(device)
        q64, k64, v64 = (t.clone().requires_grad_(True) for t in (q, k, v))
        ref, _ = reference.sparse_attention(q64, k64, v64, mask)
        ref.backward(g)
        q32, k32, v32 = (t.float().requires_grad_(True) for t in (q, k, v))
        out = frugal.sparse_attention(q32, k32, v32, mask, backend=backend)
        out.backward(g.float())
        for name_, mine, want in (("dq", q32.grad, q64.grad), ("dk", k32.grad, k64.grad),
                                  ("dv", v32.grad, v64.grad)):
            assert mine.shape == want.shape and mine.dtype == torch.float32
            err = (mine.double() - want).abs().max().item()
            assert err <= 1e-4 * max(1.0, want.abs().max().item()), f"{backend} {name_}: {err}"


def test_auto_and_explain(device):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 32, torch.float32, device)
    mask = masks.causal(64, block_size=64)
    choice = frugal.explain(frugal.sparse_attention, q, k, v, mask)
    assert choice.backend == sparse_backends(device)[0]
    out = frugal.sparse_attention(q, k, v, mask)
    want, _ = reference.sparse_attention(q.double(), k.double(), v.double(), mask)
    assert (out.double() - want).abs().max() < 1e-4


def test_bad_input():
    n = 100
    q, k, v = make_qkv(2, 4, 2, n, n, 64, torch.float32, "cpu")
    mask = masks.causal(n, block_size=64)
    sa = frugal.sparse_attention
    with pytest.raises(ShapeError, match=r"mask was built for \(Nq, Nk\) = \(101, 101\); q and k have Nq=100"):
        sa(q, k, v, masks.causal(101, block_size=64))
    with pytest.raises(ShapeError, match="multiple of the number of k/v heads.*Hq=4 and Hkv=3"):
        sa(q, torch.randn(2, 3, n, 64), torch.randn(2, 3, n, 64), mask)
    with pytest.raises(ShapeError, match=r"head_dim must be a multiple of 8 in \[8, 256\]; "
                                         r"got 44"):
        sa(q[..., :44], k[..., :44], v[..., :44], mask)
    with pytest.raises(ShapeError, match=r"head_dim must be a multiple of 8 in \[8, 256\]; "
                                         r"got 264"):
        sa(*(torch.randn(2, h, n, 264) for h in (4, 2, 2)), mask)
    with pytest.raises(DTypeError, match="same dtype"):
        sa(q, k.half(), v, mask)
    with pytest.raises(DTypeError, match="q must be float32, float16 or bfloat16"):
        sa(q.double(), k, v, mask)
    with pytest.raises(DeviceError, match="k must be on the same device"):
        sa(q, k.to("meta"), v, mask)
    with pytest.raises(TypeError, match="mask must be a frugal.BlockMask"):
        sa(q, k, v, torch.ones(n, n, dtype=torch.bool))
    with pytest.raises(ShapeError, match="k and v must have the same shape"):
        sa(q, k, v[:, :, :50], mask)
    with pytest.raises(ShapeError, match="4-d"):
        sa(q[0], k, v, mask)
    per_batch = frugal.BlockMask.from_dense(torch.ones(3, 1, n, n, dtype=torch.bool),
                                            block_size=64)
    with pytest.raises(ShapeError, match="mask batch dim must be 1 or B=2; got 3"):
        sa(q, k, v, per_batch)
    for bad in (float("nan"), float("inf"), -float("inf"), 1e300):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            sa(q, k, v, mask, scale=bad)
    with pytest.raises(TypeError, match="scale must be None or a number"):
        sa(q, k, v, mask, scale="0.1")
    with pytest.raises(BackendError, match="backend must be one of"):
        sa(q, k, v, mask, backend="flash")
    with pytest.raises(BackendError):
        sa(q, k, v, mask, backend="cuda")


def test_zero_batch():
    q = torch.randn(0, 2, 64, 32)
    out, lse = frugal.sparse_attention(q, q, q, masks.causal(64, block_size=64),
                                       return_lse=True)
    assert out.shape == q.shape and lse.shape == (0, 2, 64)


def test_torch_compile_fullgraph_forward_and_backward():
    mask = masks.sliding_window(300, 100, block_size=64) & masks.document(
        torch.arange(300) // 120, block_size=64)
    q, k, v = make_qkv(1, 4, 2, 300, 300, 64, torch.float32, "cpu", seed=11)
    backend = sparse_backends("cpu")[0]

    def loss(q, k, v):
        return (frugal.sparse_attention(q, k, v, mask, backend=backend) ** 2).sum()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
        value = fn(qs, ks, vs)
        value.backward()
        grads.append((value.detach(), qs.grad, ks.grad, vs.grad))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
