"""The C++ CPU kernels' knobs (csrc/cpu/knobs.h, frugal.cpu_knobs): a call sets them on its
thread and gets them back on exit; every value in range gives the same (exact) result; the
tuner searches them, keeps the defaults unless a candidate clearly beats them, and a cpu call
then runs with its bucket's values."""

import threading

import pytest
import torch

import frugal
from frugal import knobs, reference, registry, tuning
from frugal.tuning import Result

pytestmark = [pytest.mark.skipif(not knobs.knobs(), reason="frugal._C is not built"),
              pytest.mark.usefixtures("config_dir")]

CPU = torch.device("cpu")


def test_the_knob_list_matches_the_header():
    import os
    import re

    header = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "cpu",
                               "knobs.h")).read()
    names = re.findall(r"^\s+X\((\w+),", header, flags=re.M)
    assert names == list(knobs.knobs())
    for k in knobs.knobs().values():
        assert k.lo <= k.default <= k.hi and k.doc


def test_a_block_sets_the_knobs_on_its_thread_and_restores_them():
    name = "int8_task_groups"
    default = knobs.knobs()[name].default
    seen = {}
    with frugal.cpu_knobs(**{name: 7}):
        assert knobs.current()[name] == 7
        t = threading.Thread(target=lambda: seen.setdefault("other", knobs.current()[name]))
        t.start()
        t.join()
        with frugal.cpu_knobs(**{name: None}):
            assert knobs.current()[name] == default
        assert knobs.current()[name] == 7
        with pytest.raises(RuntimeError, match="boom"):
            with frugal.cpu_knobs(**{name: 9}):
                raise RuntimeError("boom")
        assert knobs.current()[name] == 7
    assert knobs.current()[name] == default
    assert seen["other"] == default  # another thread keeps its own


@pytest.mark.parametrize("values, error, words", [
    ({"no_such_knob": 1}, ValueError, "'no_such_knob' is not a knob; expected one of"),
    ({"int8_task_groups": 0}, ValueError, "int8_task_groups must be in [1, 64]; got 0"),
    ({"int8_task_groups": 65}, ValueError, "must be in [1, 64]; got 65"),
    ({"paged_partition_tokens": 256.0}, TypeError, "must be an int or None"),
    ({"paged_partition_tokens": True}, TypeError, "must be an int or None"),
])
def test_bad_knobs_are_clear_errors_and_change_nothing(values, error, words):
    before = knobs.current()
    with pytest.raises(error) as info:
        with frugal.cpu_knobs(paged_prefill_rows=8, **values):
            pass
    assert words in str(info.value)
    assert knobs.current() == before


@pytest.mark.parametrize("m", [1, 3, 5, 37])
@pytest.mark.parametrize("values", [
    {"int8_stream_max_m": 0},
    {"int8_block_k4": 16, "int8_task_groups": 1},
    {"int8_block_k4": 48, "int8_task_groups": 64, "int8_task_block_bytes": 4096},
    {"int8_task_block_bytes": 64 << 20, "int8_task_groups": 3},
])
def test_int8_gemms_are_exact_at_every_knob_value(m, values):
    gen = torch.Generator().manual_seed(m)
    k, n = 1000, 203  # K: several 16- or 48-step blocks; N: not a multiple of the 64-col group
    a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    a_s, b_s = torch.rand(m, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
    with frugal.cpu_knobs(**values):
        got = frugal.int8_mm(a, b, backend="cpu")
        scaled = frugal.int8_matmul(a, b, a_s, b_s, out_dtype=torch.float32, backend="cpu")
    assert torch.equal(got, reference.int8_mm(a, b))
    plain = frugal.int8_matmul(a, b, a_s, b_s, out_dtype=torch.float32, backend="cpu")
    assert torch.equal(scaled, plain)  # bit-identical to the default knobs' result


@pytest.mark.parametrize("values", [
    {"paged_partition_tokens": 16, "paged_min_items_per_thread": 256},
    {"paged_partition_tokens": 1 << 20, "paged_min_items_per_thread": 1},
    {"paged_many_heads": 1, "paged_prefill_rows": 1},
    {"paged_prefill_rows": 4096},
])
def test_paged_ops_agree_with_the_reference_at_every_knob_value(values):
    gen = torch.Generator().manual_seed(1)
    blocks, bs, hkv, hq, d = 24, 16, 2, 6, 40
    k = torch.randn(blocks, bs, hkv, d, generator=gen)
    v = torch.randn(blocks, bs, hkv, d, generator=gen)
    tables = torch.randperm(blocks, generator=gen).to(torch.int32).view(3, 8)
    lens = torch.tensor([77, 128, 5], dtype=torch.int32)
    q = torch.randn(3, hq, d, generator=gen)
    with frugal.cpu_knobs(**values):
        out = frugal.paged_attention(q, k, v, tables, lens, backend="cpu")
        qp = torch.randn(3, 4, hq, d, generator=gen)
        pre = frugal.paged_prefill_attention(qp, k, v, tables, lens, backend="cpu")
    want = reference.paged_attention(q.double(), k.double(), v.double(), tables, lens)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    want = reference.paged_prefill_attention(qp.double(), k.double(), v.double(), tables, lens)
    torch.testing.assert_close(pre.double(), want, rtol=1e-5, atol=1e-5)


def test_the_tuner_searches_the_knobs_and_a_cpu_call_runs_with_the_winner(monkeypatch):
    from frugal import dispatch

    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: False)
    op = registry.op("int8_mm")
    monkeypatch.setattr(op, "tune", __import__("dataclasses").replace(
        op.tune, sizes=lambda quick, device: [1, 64]))
    space = op.impls["cpu"].space(*op.tune.inputs(64, CPU, torch.Generator()), quick=True)
    want = space[-1][1]
    assert len(space) > 1 and want != space[0][1]

    def timer(fn):  # the last knob candidate wins at M = 64; the defaults win at M = 1
        config = fn.keywords.get("config")
        if config is None:
            return 9.0  # torch
        return 1.0 if config == want and fn.args[0].shape[0] == 64 else 2.0

    path, data, results = tuning.tune([op], CPU, timer=timer, progress=False, rounds=1)
    tried = [r for r in results["int8_mm"] if r.backend == "cpu"]
    assert all(r.status == "ok" for r in tried) and len(tried) > 2
    table = data["tables"]["cpu_int8_mm"]
    assert table[-1] == {"max_M": None, **want}
    assert {k: v for k, v in table[0].items() if k != "max_M"} != want

    # A cpu call at M = 64 runs inside the winner's knobs: observe them through the run.
    seen = []
    run = knobs.with_tuned(lambda *args: seen.append(knobs.current()), "cpu_int8_mm",
                           op.tune.size_of)
    run(torch.zeros(64, 8, dtype=torch.int8), None)
    assert {k: seen[-1][k] for k in want} == want
    # ... unless inside a cpu_knobs block, or with tuned choices off.
    with frugal.cpu_knobs(int8_task_groups=2):
        run(torch.zeros(64, 8, dtype=torch.int8), None)
    assert seen[-1]["int8_task_groups"] == 2
    with tuning.use(False):
        run(torch.zeros(64, 8, dtype=torch.int8), None)
    assert seen[-1] == {n: k.default for n, k in knobs.knobs().items()}
    a = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    b = torch.randint(-127, 128, (70, 96), dtype=torch.int8)
    assert torch.equal(frugal.int8_mm(a, b), reference.int8_mm(a, b))
    reason = frugal.explain(frugal.int8_mm, a, b, backend="cpu").reason
    last = len(table) - 1
    assert "knobs " in reason and f"{path}: tables.cpu_int8_mm[{last}])" in reason
    assert "tables.cpu_int8_mm[0])" in frugal.explain(frugal.int8_mm, a[:1], b,
                                                        backend="cpu").reason


def test_noise_cannot_pick_knobs_over_the_defaults():
    defaults = {n: k.default for n, k in knobs.knobs().items() if n.startswith("paged_")}
    other = dict(defaults, paged_partition_tokens=256)
    rows = [Result("paged_attention", 128, "cpu", defaults, "cpu_paged_attention", "ok", 1.00),
            Result("paged_attention", 128, "cpu", other, "cpu_paged_attention", "ok", 0.98)]
    margin = tuning._margin("cpu")
    kept = tuning._default_unless_faster(rows, margin)
    assert [r.config for r in kept] == [defaults]  # 2% faster: noise
    rows[1].ms = 0.85
    assert len(tuning._default_unless_faster(rows, margin)) == 2  # 15% faster: kept
