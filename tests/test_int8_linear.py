import pytest
import torch
from torch import nn

import frugal


def mlp(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(),
                         nn.Linear(256, 64, bias=False))


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_mlp_within_two_percent(device, mode):
    gen = torch.Generator().manual_seed(3)
    model = mlp(gen).to(device)
    x = torch.randn(4, 9, 256, generator=gen).to(device)
    ref = model(x)
    report = frugal.quantize_model(model, mode=mode)
    assert report.swapped == ["0", "2", "4"] and report.skipped == {}
    assert all(isinstance(model[i], frugal.Int8Linear) for i in (0, 2, 4))
    y = model(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert rel_err(y, ref) < 0.02


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_backends_agree(backend):
    gen = torch.Generator().manual_seed(8)
    linear = nn.Linear(100, 37)
    x = torch.randn(5, 100, generator=gen)
    want = frugal.Int8Linear.from_float(linear, backend="torch")(x)
    got = frugal.Int8Linear.from_float(linear, backend=backend)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dynamic_cpu_forward_is_quantize_then_matmul(dtype):
    # On CPU the forward is one fused op; it gives the bits of the two public functions.
    gen = torch.Generator().manual_seed(5)
    linear = nn.Linear(70, 33).to(dtype)
    layer = frugal.Int8Linear.from_float(linear, backend="cpu")
    base = torch.randn(2, 140, 9, generator=gen).to(dtype)
    for x in [base[:, ::2, :3].transpose(1, 2), base[0, :70].t(), base.reshape(-1, 70)[:1]]:
        xq, xs = frugal.quantize_per_token(x, backend="cpu")
        want = frugal.int8_matmul(xq, layer.weight_int8, xs, layer.weight_scale, layer.bias,
                                  dtype, backend="cpu")
        got = layer(x)
        assert got.shape == (*x.shape[:-1], 33) and got.dtype == dtype
        assert torch.equal(got, want), tuple(x.shape)


def test_state_dict_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(4)
    model = mlp(gen)
    frugal.quantize_model(model)
    x = torch.randn(7, 256, generator=gen)
    y = model(x)
    path = tmp_path / "q.pt"
    torch.save(model.state_dict(), path)
    other = mlp(torch.Generator().manual_seed(99))
    frugal.quantize_model(other)
    assert not torch.equal(other(x), y)
    other.load_state_dict(torch.load(path))
    assert torch.equal(other(x), y)
    assert set(model.state_dict()) == {"0.weight_int8", "0.weight_scale", "0.bias",
                                       "2.weight_int8", "2.weight_scale", "2.bias",
                                       "4.weight_int8", "4.weight_scale"}


def test_quantize_model_skip():
    model = nn.ModuleDict({"body": nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
                           "lm_head": nn.Linear(8, 3)})
    report = frugal.quantize_model(model, skip=["lm_head", "body.2"])
    assert report.swapped == ["body.0"]
    assert report.skipped == {"body.2": "matched skip", "lm_head": "matched skip"}
    assert isinstance(model["lm_head"], nn.Linear) and isinstance(model["body"][2], nn.Linear)
    report = frugal.quantize_model(model, skip=lambda name, m: m.out_features == 3)
    assert report.swapped == ["body.2"] and "lm_head" in report.skipped
    assert "swapped 1" in str(report)


def test_errors():
    with pytest.raises(TypeError, match="linear must be an nn.Linear; got Conv1d"):
        frugal.Int8Linear.from_float(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        frugal.Int8Linear(4, 4, mode="int4")
    with pytest.raises(frugal.ShapeError, match=r"in_features must be in \[1, 131071\]"):
        frugal.Int8Linear(131072, 4)
    layer = frugal.Int8Linear(8, 4)
    with pytest.raises(frugal.ShapeError, match=r"x.shape\[-1\] must be in_features=8; got shape \(2, 9\)"):
        layer(torch.randn(2, 9))
    with pytest.raises(frugal.DTypeError, match=r"Int8Linear: x must be .*; got torch.int8"):
        layer(torch.ones(2, 8, dtype=torch.int8))


def _vm_flags(addr):
    """The VmFlags of the mapping holding ``addr`` (/proc/self/smaps), or None."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return None


def test_large_weights_are_marked_for_huge_pages():
    """Int8Linear's weight as the forward streams it (packed for W8A8, rows for weight-only),
    when 8 MiB or more, is marked for 2 MiB pages (madvise: 'hg' in its mapping's VmFlags).
    Values unchanged. (A small buffer's mapping may carry the flag from an earlier large one
    that glibc's heap reused; memory.h's threshold is tested with advise_huge_pages.)"""
    import os

    from frugal import _ext

    ext = _ext.ext()
    probe = torch.empty(16 << 20, dtype=torch.int8)
    if ext is None or not os.path.exists("/proc/self/smaps") or not ext.advise_huge_pages(
            probe.data_ptr(), probe.numel()):
        pytest.skip("no madvise(MADV_HUGEPAGE) here")
    lin = torch.nn.Linear(4096, 2304, bias=False)  # 9 MiB of int8
    for mode in ("dynamic", "weight_only"):
        q = frugal.Int8Linear.from_float(lin, mode=mode)
        held = q._packed if mode == "dynamic" else q._rows
        mid = held.data_ptr() + held.numel() // 2
        assert "hg" in _vm_flags(mid), mode
        x = torch.randn(3, 4096)
        ref = frugal.Int8Linear.from_float(lin, mode=mode, backend="torch")(x)
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
