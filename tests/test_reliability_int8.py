"""Int8Linear's weight never goes stale, and int8 error paths.

The forward must compute with exactly the weight that ``weight_int8`` and ``state_dict()``
report, whatever the caller did to ``weight_int8`` (in-place writes through ``.data``,
``.numpy()``, ``copy_``; assignment; ``load_state_dict``): checked against a float64
reference built from what the module reports. K = 0 gives zeros plus the bias on every backend;
a 0-d input is a ShapeError naming x.
"""

import copy

import pytest
import torch
from torch import nn

import frugal
from frugal import reference

from conftest import backends_for

N, K = 70, 136


def float64_forward(m, x):
    """The module's math in float64 from the weight it reports (checked to match its
    state_dict)."""
    w = m.weight_int8
    assert torch.equal(m.state_dict()["weight_int8"], w)
    wq, ws = w.double(), m.weight_scale.double()
    bias = 0.0 if m.bias is None else m.bias.double()
    if m.mode == "weight_only":
        return x.double() @ (wq * ws[:, None]).t() + bias
    xq, xs = reference.quantize_per_token(x)
    return (xq.double() @ wq.t()) * xs.double()[:, None] * ws + bias


def random_layer(gen, mode):
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=gen))
        lin.bias.copy_(torch.randn(N, generator=gen))
    return frugal.Int8Linear.from_float(lin, mode=mode)


def random_int8(gen, *shape):
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


WRITES = {
    "data.copy_": lambda m, w: m.weight_int8.data.copy_(w),
    "numpy": lambda m, w: m.weight_int8.numpy().__setitem__(slice(None), w.numpy()),
    "copy_": lambda m, w: m.weight_int8.copy_(w),
    "assign": lambda m, w: setattr(m, "weight_int8", w),
    "load_state_dict": lambda m, w: m.load_state_dict({**m.state_dict(), "weight_int8": w}),
}


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("write", list(WRITES))
def test_forward_uses_the_weight_the_module_reports(poison, mode, write):
    gen = torch.Generator().manual_seed(21)
    m = random_layer(gen, mode)
    x = torch.randn(5, K, generator=gen)
    m(x)  # a forward before the write: whatever it prepares must not outlive the write
    w2 = random_int8(gen, N, K)
    WRITES[write](m, w2)
    torch.testing.assert_close(m(x).double(), float64_forward(m, x), rtol=1e-5, atol=1e-4)
    if write in ("assign", "load_state_dict"):
        assert torch.equal(m.weight_int8, w2)


def test_dynamic_cpu_weight_is_held_packed_only():
    # No second copy that could drift: in dynamic mode on CPU only the packed form is kept,
    # and reading weight_int8 unpacks it exactly, for odd N and K too.
    gen = torch.Generator().manual_seed(22)
    for n, k in [(1, 1), (37, 130), (64, 64), (130, 7), (200, 4100)]:
        m = frugal.Int8Linear(k, n, bias=False)
        w = random_int8(gen, n, k)
        m.weight_int8 = w
        assert m._rows is None and m._packed is not None
        assert torch.equal(m.weight_int8, w)
        assert m.weight_int8.data_ptr() != m.weight_int8.data_ptr()  # a fresh tensor each read


def test_state_dict_copy_and_move_keep_the_weight(poison):
    gen = torch.Generator().manual_seed(23)
    m = random_layer(gen, "dynamic")
    x = torch.randn(3, K, generator=gen)
    want = float64_forward(m, x)
    assert list(m.state_dict()) == ["weight_int8", "weight_scale", "bias"]
    for other in (copy.deepcopy(m), m.to("cpu"), m.to(torch.float32)):
        torch.testing.assert_close(other(x).double(), want, rtol=1e-5, atol=1e-4)
    # A module on another backend gets the same weight through the state_dict.
    other = frugal.Int8Linear(K, N, backend="torch")
    other.load_state_dict(m.state_dict())
    assert other._rows is not None and torch.equal(other.weight_int8, m.weight_int8)
    torch.testing.assert_close(other(x).double(), want, rtol=1e-5, atol=1e-4)


def test_state_dict_errors():
    m = frugal.Int8Linear(K, N)
    sd = m.state_dict()
    with pytest.raises(RuntimeError, match="Missing key.*weight_int8"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "weight_int8"})
    with pytest.raises(RuntimeError, match=r"weight_int8 must have shape .*\(70, 136\); got "
                                           r"\(70, 135\)"):
        m.load_state_dict({**sd, "weight_int8": sd["weight_int8"][:, :-1]})
    with pytest.raises(frugal.DTypeError, match="weight_int8 must be int8; got torch.float32"):
        m.weight_int8 = torch.zeros(N, K)


def test_zero_dim_input_is_a_shape_error():
    for mode in ("dynamic", "weight_only"):
        layer = frugal.Int8Linear(8, 4, mode=mode)
        with pytest.raises(frugal.ShapeError, match=r"Int8Linear: x must have at least 1 dim"):
            layer(torch.tensor(1.0))


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("with_bias", [False, True])
def test_k_zero_gives_zeros_plus_bias(poison, backend, with_bias):
    gen = torch.Generator().manual_seed(24)
    bias = torch.randn(5, generator=gen) if with_bias else None
    want = torch.zeros(2, 3, 5, dtype=torch.float64) + (0.0 if bias is None else bias.double())
    aq, bq = torch.zeros(2, 3, 0, dtype=torch.int8), torch.zeros(5, 0, dtype=torch.int8)
    a_s, b_s = torch.rand(2, 3, generator=gen), torch.rand(5, generator=gen)
    y = frugal.int8_matmul(aq, bq, a_s, b_s, bias, torch.float32, backend=backend)
    assert y.shape == (2, 3, 5) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=0, atol=0)
    x = torch.randn(2, 3, 0, generator=gen, dtype=torch.float64).to(torch.float16)
    y = frugal.int8_weight_only_matmul(x, bq, b_s, bias, backend=backend)
    assert y.shape == (2, 3, 5) and y.dtype == torch.float16
    torch.testing.assert_close(y.double(), want.to(torch.float16).double(), rtol=0, atol=0)
