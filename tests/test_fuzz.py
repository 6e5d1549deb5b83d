"""Fuzzing the public ops (hypothesis, bounded): random valid calls and calls with one or two
arguments broken in a random way. Every call either raises a frugal error whose message starts
with the op's name and names the argument, or returns what the PyTorch reference returns for the
same arguments. (Random PagedKVCache operation sequences, valid and not, are the state machine
of test_paged_kv_cache.py.)"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import frugal
from frugal.errors import FrugalError

# derandomize: the same examples on every run (CI never meets a new draw by chance).
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def _breakers(draw, names, kinds):
    """{argument name: how to break it} for 0 to 2 arguments."""
    n = draw(st.integers(0, min(2, len(names))))
    picked = draw(st.lists(st.sampled_from(names), min_size=n, max_size=n, unique=True))
    return {name: draw(st.sampled_from(kinds)) for name in picked}


def _break(value, how, gen):
    """A broken version of an argument."""
    if how == "not_tensor":
        return "x" if torch.is_tensor(value) else [value]
    if not torch.is_tensor(value):
        return {"nan": float("nan"), "neg": -3, "huge": 2**70, "not_tensor": "x"}.get(how, -1)
    if how == "dtype":
        return value.to(torch.float64) if value.is_floating_point() else value.to(torch.int16)
    if how == "shape":
        return value[..., :-1] if value.shape[-1] > 1 else value.unsqueeze(0).expand(
            2, *value.shape)
    if how == "dims":
        return value.reshape(-1) if value.dim() > 1 else value.reshape(1, 1, -1)
    if how == "meta":
        return value.to("meta")
    if how == "nan" and value.is_floating_point():
        return value.clone().fill_(float("nan"))
    if how == "strided" and value.dim() >= 1:
        return torch.cat([value, value], dim=-1)[..., ::2]  # same values, non-unit stride
    return value


def _call(op_name, fn, args, kwargs, reference):
    """Run the call; a frugal error must name the op; a result must equal the reference's."""
    try:
        got = fn(*args, **kwargs)
    except (FrugalError, TypeError, ValueError) as exc:
        assert str(exc).startswith(f"{op_name}:"), f"unclear error: {type(exc).__name__}: {exc}"
        return
    want = reference(*args, **kwargs)
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if g.device.type == "meta":  # shape propagation: no values to compare
            continue
        tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(g.dtype, 1e-5)
        if g.dtype in (torch.int8, torch.int32):
            assert torch.equal(g, w)
        else:
            # Two summation orders differ by a few roundings of the largest terms: under
            # cancellation an element's error scales with the tensor's magnitude, not its own.
            finite = w.float()[torch.isfinite(w.float())]
            scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * scale,
                                       equal_nan=True)


@SETTINGS
@given(st.data())
def test_quantize_per_token(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    shape = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))
    x = (torch.randn(shape, generator=gen) * 10).to(data.draw(st.sampled_from(FLOATS)))
    broken = _breakers(data.draw, ["x"], ["dtype", "meta", "not_tensor", "nan", "strided"])
    x = _break(x, broken["x"], gen) if "x" in broken else x
    _call("quantize_per_token", frugal.quantize_per_token, (x,), {},
          lambda x: frugal.quantize_per_token(x, backend="torch"))


@SETTINGS
@given(st.data())
def test_int8_matmul(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    m, n, k = (data.draw(st.integers(0, 12)) for _ in range(3))
    args = {
        "aq": torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8),
        "bq": torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8),
        "a_scale": torch.rand(m, generator=gen), "b_scale": torch.rand(n, generator=gen),
        "bias": torch.randn(n, generator=gen) if data.draw(st.booleans()) else None,
    }
    out_dtype = data.draw(st.sampled_from(FLOATS))
    broken = _breakers(data.draw, list(args), ["dtype", "shape", "dims", "meta", "not_tensor"])
    for name, how in broken.items():
        if args[name] is not None:
            args[name] = _break(args[name], how, gen)
    vals = tuple(args.values())
    _call("int8_matmul", frugal.int8_matmul, vals, {"out_dtype": out_dtype},
          lambda *a, **kw: frugal.int8_matmul(*a, **kw, backend="torch"))
    if not broken:  # the exact GEMM and the weight-only op on the same operands
        _call("int8_mm", frugal.int8_mm, vals[:2], {},
              lambda a, b: frugal.int8_mm(a, b, backend="torch"))
        x = torch.randn(m, k, generator=gen)
        _call("int8_weight_only_matmul", frugal.int8_weight_only_matmul,
              (x, vals[1], vals[3], vals[4]), {},
              lambda *a: frugal.int8_weight_only_matmul(*a, backend="torch"))


@SETTINGS
@given(st.data())
def test_paged_attention_and_prefill(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    bs = data.draw(st.sampled_from([1, 2, 4, 16]))
    hkv, g, d = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), 8 * data.draw(
        st.integers(1, 4))
    lens = data.draw(st.lists(st.integers(0, 20), min_size=1, max_size=3))
    width = max(-(-n // bs) for n in lens) or 1
    blocks = len(lens) * width + 2
    k = torch.randn(blocks, bs, hkv, d, generator=gen)
    v = torch.randn(blocks, bs, hkv, d, generator=gen)
    tables = torch.randperm(blocks, generator=gen)[:len(lens) * width].view(
        len(lens), width).to(torch.int32)
    args = {"q": torch.randn(len(lens), hkv * g, d, generator=gen), "k_cache": k, "v_cache": v,
            "block_tables": tables, "seq_lens": torch.tensor(lens, dtype=torch.int32),
            "scale": data.draw(st.sampled_from([None, 0.3])),
            "window": data.draw(st.sampled_from([None, 1, 5, 2**40]))}
    broken = _breakers(data.draw, list(args),
                       ["dtype", "shape", "dims", "meta", "not_tensor", "nan", "neg", "huge"])
    for name, how in broken.items():
        args[name] = _break(args[name], how, gen)
    vals = tuple(args.values())
    _call("paged_attention", frugal.paged_attention, vals, {},
          lambda *a: frugal.paged_attention(*a, backend="torch"))
    if torch.is_tensor(args["q"]) and args["q"].dim() == 3:
        q4 = args["q"][:, None]
        _call("paged_prefill_attention", frugal.paged_prefill_attention, (q4, *vals[1:]), {},
              lambda *a: frugal.paged_prefill_attention(*a, backend="torch"))


@SETTINGS
@given(st.data())
def test_sparse_attention(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    n = data.draw(st.integers(1, 150))
    d = data.draw(st.sampled_from([32, 64, 48]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    mask = data.draw(st.sampled_from([
        frugal.masks.causal(n, block_size=64), frugal.masks.sliding_window(n, 7, block_size=64),
        frugal.masks.document(torch.arange(n) // 33, block_size=64)]))
    args = {"q": torch.randn(1, 2, n, d, generator=gen).to(dtype),
            "k": torch.randn(1, 1, n, d, generator=gen).to(dtype),
            "v": torch.randn(1, 1, n, d, generator=gen).to(dtype), "mask": mask,
            "scale": data.draw(st.sampled_from([None, 0.2]))}
    broken = _breakers(data.draw, list(args),
                       ["dtype", "shape", "dims", "meta", "not_tensor", "nan", "huge"])
    for name, how in broken.items():
        args[name] = _break(args[name], how, gen)
    _call("sparse_attention", frugal.sparse_attention, tuple(args.values()), {},
          lambda *a: frugal.sparse_attention(*a, backend="torch"))


def test_breakers_reach_every_kind():
    """The fuzzers' own means: each way of breaking an argument changes it."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(3, 4)
    for how in ("dtype", "shape", "dims", "meta", "not_tensor", "nan", "strided"):
        broken = _break(t, how, gen)
        assert not (torch.is_tensor(broken) and broken.dtype == t.dtype and
                    broken.device == t.device and broken.shape == t.shape and
                    broken.stride() == t.stride() and torch.equal(broken, t)), how
    assert math.isnan(_break(0.3, "nan", gen)) and _break(5, "huge", gen) == 2**70
    with pytest.raises(AssertionError, match="unclear error"):
        _call("x", lambda: (_ for _ in ()).throw(ValueError("boom")), (), {}, None)
