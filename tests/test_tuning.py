"""frugal tune: candidates verified against the reference before they are timed, winners in a
file per device that `auto` and the Triton launchers then use; a stale, foreign or corrupt file
is ignored with one warning. Timers are injected (the machine is noisy); the correctness gate
is real."""

import dataclasses
import json
import os

import pytest
import torch

import frugal
from frugal import registry, tuning
from frugal.kernels import configs

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("config_dir")


@pytest.fixture
def no_knobs(monkeypatch):
    """One candidate for each C++ CPU kernel: their knob spaces are left out
    (tests/test_knobs.py tunes them)."""
    for op in registry.OPS.values():
        impl = op.impls.get("cpu")
        if impl is not None and impl.space is not None:
            monkeypatch.setitem(op.impls, "cpu", dataclasses.replace(impl, space=None))


@pytest.fixture
def no_triton(monkeypatch, no_knobs):
    """The C++ and PyTorch candidates only (no Triton interpreter on CPU tensors), one per
    backend."""
    from frugal import dispatch

    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: False)


def _small(op_name, sizes):
    """Tune ``op_name`` on a few sizes only (a TuneSpec with other sizes)."""
    op = registry.op(op_name)
    return dataclasses.replace(op.tune, sizes=lambda quick, device: sizes)


def test_tuner_end_to_end_on_cpu_picks_the_fastest_verified_backend(monkeypatch, config_dir,
                                                                   no_triton):
    op = registry.op("int8_mm")
    monkeypatch.setattr(op, "tune", _small("int8_mm", [1, 8]))
    timings = iter([5.0, 1.0] * 8)  # candidates time in order: cpu, torch -> torch wins
    path, data, results = tuning.tune([op], CPU, timer=lambda fn: next(timings),
                                      progress=False)
    assert os.path.dirname(path) == str(config_dir)
    assert data["ops"]["int8_mm"] == [{"max": None, "backend": "torch", "ms": 1.0}]
    assert all(r.status == "ok" for r in results["int8_mm"])
    a = torch.randint(-127, 128, (3, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    choice = frugal.explain(frugal.int8_mm, a, b)
    assert choice.backend == "torch" and "tuned" in choice.reason and path in choice.reason
    assert torch.equal(frugal.int8_mm(a, b), frugal.reference.int8_mm(a, b))
    # An explicit backend is still obeyed.
    assert frugal.explain(frugal.int8_mm, a, b, backend="cpu").backend == "cpu"
    with open(path) as f:
        saved = json.load(f)
    assert saved["device"] == tuning.device_name(CPU)
    assert saved["sources"] == tuning.sources_hash()


def test_sizes_with_one_winner_merge_into_buckets(monkeypatch, no_triton):
    op = registry.op("int8_mm")
    monkeypatch.setattr(op, "tune", _small("int8_mm", [1, 2, 4, 8]))
    # cpu wins at 1 and 2, torch at 4 and 8 (candidates time in order cpu, torch, per round).
    plan = {1: (1.0, 2.0), 2: (1.0, 2.0), 4: (2.0, 1.0), 8: (2.0, 1.0)}
    calls = []

    def timer(fn):
        size = fn.args[0].shape[0]
        calls.append(size)
        return plan[size][len([c for c in calls if c == size]) % 2 == 0]

    _, data, _ = tuning.tune([op], CPU, timer=timer, progress=False, rounds=1)
    assert [(b["max"], b["backend"]) for b in data["ops"]["int8_mm"]] == [(2, "cpu"),
                                                                         (None, "torch")]
    a = torch.zeros(2, 16, dtype=torch.int8)
    b = torch.zeros(4, 16, dtype=torch.int8)
    assert frugal.explain(frugal.int8_mm, a, b).backend == "cpu"
    assert frugal.explain(frugal.int8_mm, torch.zeros(3, 16, dtype=torch.int8),
                          b).backend == "torch"


def test_a_wrong_candidate_is_never_chosen(monkeypatch):
    """A "cpu" implementation that is the fastest and wrong, beside a right "torch" one."""
    op = registry.Op("tuning_toy")
    try:
        op.implement("cpu", devices=("cpu",))(lambda x: x * 2 + 1e-3)  # off by 1e-3
        op.implement("torch")(lambda x: x * 2)
        op.tune = tuning.TuneSpec(
            dim="n", sizes=lambda quick, device: [4, 8],
            inputs=lambda n, device, gen: (torch.randn(n, generator=gen),),
            check=lambda out, args: None if torch.equal(out, args[0] * 2) else "not 2x",
            size_of=lambda args: args[0].shape[0])
        timings = iter([100.0] * 8)  # only the torch candidate is ever timed
        _, data, results = tuning.tune([op], CPU, timer=lambda fn: next(timings),
                                       progress=False)
        statuses = {(r.size, r.backend): r.status for r in results["tuning_toy"]}
        assert statuses[4, "cpu"] == "wrong: not 2x" and statuses[8, "cpu"] == "wrong: not 2x"
        assert statuses[4, "torch"] == "ok"
        assert data["ops"]["tuning_toy"] == [{"max": None, "backend": "torch", "ms": 100.0}]
        assert op.select(CPU, "auto", torch.ones(3)).backend == "torch"
    finally:
        del registry.OPS["tuning_toy"]
        for backend in ("cpu", "torch"):
            registry._MISSING.pop(("tuning_toy", backend), None)


def test_triton_configs_are_tuned_under_the_interpreter(monkeypatch, no_knobs):
    """The Triton candidates of a tiny space are verified for real (interpreter) and the
    winning config lands in the tuned tables, which the launcher then picks."""
    from frugal import jit_capture

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter for CPU tensors (set by conftest without a GPU)")
    space = [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4,
              "num_stages": 2, "split_k": 1},
             {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "num_warps": 4,
              "num_stages": 2, "split_k": 1}]
    monkeypatch.setattr(configs, "space", lambda table, quick=False: space)
    op = registry.op("int8_mm")
    monkeypatch.setattr(op, "tune", dataclasses.replace(
        op.tune, sizes=lambda quick, device: [3],
        inputs=lambda m, device, gen: (
            torch.randint(-127, 128, (m, 40), generator=gen, dtype=torch.int8),
            torch.randint(-127, 128, (24, 40), generator=gen, dtype=torch.int8))))
    want = space[1]

    def timer(fn):
        return 0.5 if fn.keywords.get("config") == want else 2.0

    _, data, results = tuning.tune([op], CPU, timer=timer, progress=False, rounds=1)
    tried = [r for r in results["int8_mm"] if r.backend == "triton"]
    assert len(tried) == 2 and all(r.status == "ok" for r in tried)
    assert data["ops"]["int8_mm"][0]["backend"] == "triton"
    (table,) = data["tables"]
    assert data["tables"][table] == [{"max_M": None, **want}]
    a = torch.randint(-127, 128, (3, 40), dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 40), dtype=torch.int8)
    with jit_capture.capture() as launches:
        frugal.int8_mm(a, b, backend="triton")
    used = {k: v[1] for k, v in launches[0].kwargs}
    assert (used["BLOCK_N"], used["BLOCK_K"], used["GROUP_M"]) == (32, 64, 2)
    assert configs.source(table) == tuning.file_for(CPU)


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "stale", "format"])
def test_a_bad_tuned_file_is_ignored_with_one_warning(damage, monkeypatch, no_triton):
    op = registry.op("int8_mm")
    monkeypatch.setattr(op, "tune", _small("int8_mm", [1]))
    timings = iter([5.0, 1.0, 5.0, 1.0])
    path, data, _ = tuning.tune([op], CPU, timer=lambda fn: next(timings), progress=False)
    if damage == "corrupt":
        with open(path, "w") as f:
            f.write("{not json")
    else:
        data = dict(data, **{"foreign": {"device": "CPU something else"},
                             "stale": {"sources": "0" * 16},
                             "format": {"format": 99}}[damage])
        with open(path, "w") as f:
            json.dump(data, f)
    tuning.forget()
    a = torch.zeros(2, 16, dtype=torch.int8)
    expected = {"corrupt": "corrupt", "foreign": "made for", "stale": "stale",
                "format": "corrupt"}[damage]
    with pytest.warns(UserWarning, match=f"ignoring the tuned file .*{expected}"):
        choice = frugal.explain(frugal.int8_mm, a, a)
    assert choice.backend == "cpu" and "tuned" not in choice.reason
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        frugal.explain(frugal.int8_mm, a, a)


def test_interrupting_keeps_what_finished(monkeypatch, no_triton):
    ops = [registry.op("quantize_per_token"), registry.op("int8_mm")]
    monkeypatch.setattr(ops[0], "tune", _small("quantize_per_token", [64]))
    monkeypatch.setattr(ops[1], "tune", _small("int8_mm", [1]))
    count = []

    def timer(fn):
        count.append(1)
        if len(count) > 4:  # quantize's two candidates x 2 rounds, then Ctrl-C
            raise KeyboardInterrupt
        return 1.0

    path, data, _ = tuning.tune(ops, CPU, timer=timer, progress=False)
    assert set(data["ops"]) == {"quantize_per_token"} and os.path.exists(path)


def test_cli_show_and_reset(monkeypatch, capsys, no_triton):
    op = registry.op("int8_mm")
    monkeypatch.setattr(op, "tune", _small("int8_mm", [1]))
    timings = iter([5.0, 1.0, 5.0, 1.0])
    path, _, _ = tuning.tune([op], CPU, timer=lambda fn: next(timings), progress=False)
    assert tuning.main(["--show", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert path in out and "int8_mm by M: rest: torch" in out
    assert tuning.main(["--reset", "--device", "cpu"]) == 0
    assert not os.path.exists(path)
    assert frugal.explain(frugal.int8_mm, torch.zeros(1, 8, dtype=torch.int8),
                          torch.zeros(1, 8, dtype=torch.int8)).backend == "cpu"
    with pytest.raises(SystemExit):
        tuning.main(["--op", "no_such_op"])


def test_bench_compares_tuned_and_default_in_one_run(monkeypatch, no_triton):
    """frugal bench --compare-tuned: every candidate timed with and without the tuned file, in
    the same rounds; the tuned twin of an op whose tuned backend differs runs that backend."""
    from frugal import bench

    op = registry.op("int8_mm")
    monkeypatch.setattr(op, "tune", _small("int8_mm", [1]))
    timings = iter([5.0, 1.0, 5.0, 1.0])
    tuning.tune([op], CPU, timer=lambda fn: next(timings), progress=False)  # torch wins
    seen = []

    @bench.sweep("tuned_pairs_test", op="int8_matmul", x_name="M", xs=(2,), quick=(2,),
                 baseline="plain")
    def _setup(m, device):
        a = torch.zeros(m, 16, dtype=torch.int8)
        return {"plain": lambda: a.sum(),
                "frugal": lambda: seen.append(frugal.explain(frugal.int8_mm, a, a).backend)}

    try:
        result = bench.run(bench.sweeps(["tuned_pairs_test"]), "cpu", timer=lambda fn: fn() or 1.0,
                           progress=False, rounds=1, compare_tuned=True)
    finally:
        del bench.registry._SWEEPS["tuned_pairs_test"]
    assert seen == ["cpu", "torch"]  # default first, then the tuned twin
    pairs = result.tuned_pairs()
    assert {(p[2], p[1]) for p in pairs} == {("plain", 2), ("frugal", 2)}
    assert "Tuned vs default" in result.markdown()


@pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key(
    "frugal::sparse_attention_fwd", "CUDA"), reason="frugal._C has no CUDA kernels")
def test_the_cuda_kernels_are_tuner_candidates_on_a_gpu(monkeypatch):
    """On a CUDA device `frugal tune` verifies and times backend 'cuda' (the CUDA C++ sparse
    forward, the CUTLASS GEMMs) next to Triton's configs and torch: its candidates are the
    registry's. No GPU here: CPU tensors stand in for the device's, the capability is faked, and
    a shape or dtype the CUDA kernels refuse leaves them out."""
    from frugal import masks

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    gpu = torch.device("cuda")

    def backends(name, *args):
        return [impl.backend for impl, _, _ in tuning._candidates(registry.op(name), gpu, args,
                                                                  quick=True)]

    q = torch.randn(1, 2, 128, 64).half()
    mask = masks.causal(128)
    assert backends("sparse_attention", q, q, q, mask, 0.125)[0] == "cuda"
    assert "cuda" not in backends("sparse_attention", q.float(), q.float(), q.float(), mask,
                                  0.125)
    a = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    s_a, s_b = torch.rand(8), torch.rand(16)
    for name, args in [("int8_mm", (a, b)),
                       ("int8_matmul", (a, b, s_a, s_b, None, torch.float16)),
                       ("int8_weight_only_matmul", (a.half(), b, s_b, None))]:
        found = backends(name, *args)
        assert "cuda" in found and "triton" in found, (name, found)
    assert "cuda" not in backends("int8_mm", a[:, :40], b[:, :40])  # K % 16 != 0


def test_noise_cannot_replace_the_default_backend():
    from frugal.tuning import Result

    rows = [Result("int8_mm", 1, "cpu", None, None, "ok", 1.00),
            Result("int8_mm", 1, "torch", None, None, "ok", 0.98),
            Result("int8_mm", 64, "cpu", None, None, "wrong: off", None),
            Result("int8_mm", 64, "torch", None, None, "ok", 3.0)]
    data = tuning.summarize({"int8_mm": rows}, CPU)
    assert [b["backend"] for b in data["ops"]["int8_mm"]] == ["cpu", "torch"]  # 2%: noise
    rows[1].ms = 0.85
    data = tuning.summarize({"int8_mm": rows}, CPU)
    assert data["ops"]["int8_mm"] == [{"max": None, "backend": "torch", "ms": 0.85}]


def test_the_cpu_tuning_timer_takes_the_fastest_run():
    import itertools
    import time

    from frugal.bench.timing import time_cpu

    def make():  # 2 of every 3 runs preempted for 5 ms: the median is a preempted run
        delays = itertools.cycle([0.005, 0.005, 0.0])
        return lambda: time.sleep(next(delays))

    assert tuning.tuning_timer(CPU)(make()) < 2.0
    assert time_cpu(make(), min_time=0.05) > 4.0


def test_a_candidate_wrong_only_under_a_variant_is_never_chosen():
    """TuneSpec.variants (the attention ops' score modifiers): every candidate is verified
    under the plain call and each variant, and timed on one call of each. The "cpu" candidate
    is right without the modifier and wrong with it; "torch" is right under both."""
    op = registry.Op("tuning_variants_toy")
    seen = []
    try:
        op.implement("cpu", devices=("cpu",))(lambda x, shift=0.0: x * 2 + 2 * shift)
        op.implement("torch")(lambda x, shift=0.0: (seen.append(shift), x * 2 + shift)[1])
        op.tune = tuning.TuneSpec(
            dim="n", sizes=lambda quick, device: [5],
            inputs=lambda n, device, gen: (torch.randn(n, generator=gen),),
            check=lambda out, args, shift=0.0: (None if torch.equal(out, args[0] * 2 + shift)
                                                else "off"),
            size_of=lambda args: args[0].shape[0],
            variants=lambda args: [("shifted", dict(shift=0.5))])

        def timer(fn):
            seen.clear()
            fn()
            assert seen == [0.0, 0.5], "the timed call runs the plain call and each variant"
            return 1.0

        _, data, results = tuning.tune([op], CPU, timer=timer, progress=False, rounds=1)
        statuses = {r.backend: r.status for r in results["tuning_variants_toy"]}
        assert statuses == {"cpu": "wrong (shifted): off", "torch": "ok"}
        assert data["ops"]["tuning_variants_toy"][0]["backend"] == "torch"
    finally:
        del registry.OPS["tuning_variants_toy"]
        for backend in ("cpu", "torch"):
            registry._MISSING.pop(("tuning_variants_toy", backend), None)


def test_attention_tuning_verifies_every_score_modifier(monkeypatch, no_triton):
    """paged_attention and sparse_attention tune under the plain call, a softcap and ALiBi
    slopes: each verified against the float64 reference with the same modifier, so a
    candidate that ignores one is caught."""
    for name, size in (("paged_attention", 64), ("sparse_attention", 64)):
        op = registry.op(name)
        args = op.tune.inputs(size, CPU, torch.Generator().manual_seed(1))
        labels = [label for label, _ in tuning.call_variants(op.tune, args)]
        assert labels == ["", "softcap", "alibi"]
        impl = op.impls["torch"]
        for label, mods in tuning.call_variants(op.tune, args):
            assert op.tune.check(impl.run(*args, **mods), args, **mods) is None, (name, label)
            if mods:  # the plain answer misses under a modifier: the check can fail
                assert op.tune.check(impl.run(*args), args, **mods) is not None, (name, label)
