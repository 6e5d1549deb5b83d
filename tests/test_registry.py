"""frugal.registry: one declaration of an implementation is all dispatch (auto and explicit),
explain and the tuner's candidate list need."""

import pytest
import torch

import frugal
from frugal import registry
from frugal.errors import BackendError


@pytest.fixture
def dummy_cpu_dequantize():
    """A "cpu" backend for dequantize (which has only "torch"), that records its calls and
    refuses int8 inputs with more than 1000 rows."""
    calls = []

    def run(q, scale, out_dtype):
        calls.append(tuple(q.shape))
        return frugal.reference.dequantize(q, scale, out_dtype) + 0.0

    op = registry.op("dequantize")
    op.implement("cpu", devices=("cpu",), describe="dummy test kernel",
                 why_not=lambda q, s, d: "too many rows" if q.shape[0] > 1000 else None)(run)
    try:
        yield calls
    finally:
        op.unregister("cpu")


def test_a_registered_backend_is_dispatched_explained_and_a_tuning_candidate(
        dummy_cpu_dequantize):
    q = torch.randint(-127, 128, (5, 8), dtype=torch.int8)
    s = torch.rand(5)
    out = frugal.dequantize(q, s)  # auto on CPU: "cpu" comes before "torch"
    assert dummy_cpu_dequantize == [(5, 8)]
    torch.testing.assert_close(out, q.float() * s[:, None])
    choice = frugal.explain(frugal.dequantize, q, s)
    assert (choice.backend, choice.reason) == ("cpu", "auto on cpu: dummy test kernel")
    op = registry.op("dequantize")
    device = torch.device("cpu")
    assert [i.backend for i in op.candidates(device, q, s, torch.float32)] == ["cpu", "torch"]

    # Its own limit: auto skips it with the reason, an explicit request raises it.
    big = torch.zeros(1001, 8, dtype=torch.int8)
    choice = frugal.explain(frugal.dequantize, big, torch.rand(1001))
    assert choice.backend == "torch" and "too many rows" in choice.reason
    assert [i.backend for i in op.candidates(device, big, torch.rand(1001), torch.float32)] \
        == ["torch"]
    with pytest.raises(BackendError, match="backend='cpu': too many rows"):
        frugal.dequantize(big, torch.rand(1001), backend="cpu")
    frugal.dequantize(q, s, backend="torch")
    assert dummy_cpu_dequantize == [(5, 8)]  # the explicit torch backend did not reach it


def test_registry_errors():
    op = registry.op("dequantize")
    with pytest.raises(ValueError, match="already has backend 'torch'"):
        op.implement("torch")(lambda *a: None)
    with pytest.raises(ValueError, match="backend must be one of"):
        op.implement("fpga")(lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.Op("dequantize")
    with pytest.raises(KeyError, match="no op named 'nope'"):
        registry.op("nope")
    q = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(BackendError, match="not implemented for this op; it has 'torch'"):
        frugal.dequantize(q, torch.rand(2), backend="triton")


def test_every_public_op_is_registered_with_a_reference():
    names = {"quantize_per_token", "dequantize", "int8_mm", "int8_matmul",
             "int8_weight_only_matmul", "paged_append", "paged_attention",
             "paged_prefill_attention", "sparse_attention"}
    assert names <= set(registry.OPS)
    for name in names:
        assert "torch" in registry.op(name).backends, name
