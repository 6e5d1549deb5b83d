import dataclasses
import functools
import json

import pytest
import torch

from frugal import bench
from frugal.bench import registry

XS = (64, 128, 256, 512, 1024)


def fake_timer(fn):
    # Synthetic candidates return their own cost in ms, so nothing here depends on timing.
    return fn()


def _synthetic_setup(x, device):
    return {
        "linear": lambda: 0.001 * x,
        "quadratic": lambda: 1e-4 * x * x,
        "dense": lambda: 0.004 * x,
    }


def _synthetic(**fields):
    defaults = dict(name="synthetic", op="test", x_name="tokens", xs=XS, quick=XS[:2],
                    setup=_synthetic_setup, baseline="dense", nbytes=lambda x: 1e6 * x,
                    flops=lambda x: 2e6 * x, memory_bound=True, params={"K": 8},
                    notes=lambda device: {"device": str(device)},
                    targets=(bench.Target(x=256, candidate="linear", min_speedup=3.0),
                             bench.Target(x=256, candidate="quadratic", min_speedup=3.0)))
    return bench.Sweep(**{**defaults, **fields})


def _run(sweep, **kwargs):
    return bench.run([sweep], "cpu", timer=fake_timer, copy_gbps=10.0, progress=False, **kwargs)


@pytest.mark.parametrize("slope", [0.5, 1.0, 2.0])
def test_fit_slope_recovers_power_law(slope):
    assert bench.fit_slope(XS, [3.0 * x**slope for x in XS]) == pytest.approx(slope)


def test_fit_slope_needs_two_distinct_x():
    assert bench.fit_slope([128], [1.0]) is None
    assert bench.fit_slope([128, 128], [1.0, 2.0]) is None


def test_slopes_ratios_and_throughput():
    result = _run(_synthetic()).results[0]
    assert result.slopes == pytest.approx({"linear": 1.0, "quadratic": 2.0, "dense": 1.0})
    rows = {(r.x, r.candidate): r for r in result.rows}
    assert len(rows) == len(XS) * 3
    assert rows[256, "linear"].speedup == pytest.approx(4.0)
    assert rows[256, "quadratic"].speedup == pytest.approx(0.004 * 256 / (1e-4 * 256**2))
    assert rows[256, "dense"].speedup == 1.0
    # 256e6 bytes in 0.256 ms = 1000 GB/s; twice the FLOPs.
    assert rows[256, "linear"].gbps == pytest.approx(1000.0)
    assert rows[256, "linear"].gflops == pytest.approx(2000.0)
    assert rows[256, "linear"].copy_fraction == pytest.approx(100.0)
    assert result.notes == {"device": "cpu"}


def test_targets_pass_and_fail():
    run = _run(_synthetic())
    verdicts = {v.target.candidate: v for v in run.results[0].verdicts}
    assert verdicts["linear"].passed and not verdicts["quadratic"].passed
    assert not run.passed
    text = run.markdown()
    assert "synthetic tokens=256 K=8: linear is 4.0x the dense (target >= 3x): PASS" in text
    assert "quadratic is 0.2x the dense (target >= 3x): FAIL" in text


def test_targets_for_other_devices_or_unmeasured_x_are_skipped():
    targets = (bench.Target(x=256, candidate="linear", min_speedup=99.0, device="cuda"),
               bench.Target(x=999, candidate="linear", min_speedup=99.0))
    run = _run(_synthetic(targets=targets))
    assert run.results[0].verdicts == [] and run.passed


def test_quick_uses_quick_xs():
    result = _run(_synthetic(), quick=True).results[0]
    assert sorted({r.x for r in result.rows}) == list(XS[:2])


def test_columns_follow_what_the_sweep_counts():
    text = _run(_synthetic(flops=None, memory_bound=False)).markdown()
    assert "GB/s" in text and "% copy bw" not in text and "GFLOP/s" not in text
    text = _run(_synthetic(nbytes=None, memory_bound=False)).markdown()
    assert "GB/s" not in text and "GFLOP/s" in text


def test_save_writes_json_markdown_and_png(tmp_path):
    paths = _run(_synthetic()).save(tmp_path / "out")
    assert sorted(p.suffix for p in paths) == [".json", ".md", ".png"]
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    png = next(p for p in paths if p.suffix == ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    for key in ("device", "device_name", "cpu_model", "torch", "triton", "frugal", "timestamp",
                "copy_bandwidth_gbps", "sweeps"):
        assert key in record, key
    assert record["copy_bandwidth_gbps"] == 10.0
    (sweep,) = record["sweeps"]
    assert sweep["name"] == "synthetic" and sweep["baseline"] == "dense"
    assert sweep["slopes"]["quadratic"] == pytest.approx(2.0)
    assert sweep["notes"] == {"device": "cpu"}
    assert len(sweep["rows"]) == len(XS) * 3
    assert set(sweep["rows"][0]) == {"x", "candidate", "ms", "speedup", "gbps", "gflops",
                                     "copy_fraction", "versus"}
    assert [t["passed"] for t in sweep["targets"]] == [True, False]


def test_setup_must_return_the_baseline():
    with pytest.raises(ValueError, match="must return the baseline 'missing'"):
        _run(_synthetic(baseline="missing"))


@pytest.mark.parametrize("field, value", [("xs", ()), ("quick", (0, 8)), ("xs", (1.5,))])
def test_sweep_rejects_bad_token_counts(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a non-empty sequence of positive"):
        _synthetic(**{field: value})


def test_memory_bound_needs_bytes():
    with pytest.raises(ValueError, match="memory_bound=True needs nbytes"):
        _synthetic(nbytes=None)


def test_registry(monkeypatch):
    monkeypatch.setattr(registry, "_SWEEPS", dict(registry._SWEEPS))

    @bench.sweep("decorated", op="test", x_name="M", xs=(1, 2), quick=(1,), baseline="b")
    def setup(x, device):
        """First line.

        More."""
        return {"b": lambda: 1.0}

    (found,) = bench.sweeps(["decorated"])
    assert found.setup is setup and found.description == "First line."
    with pytest.raises(ValueError, match="already registered"):
        bench.register(found)
    with pytest.raises(ValueError, match="unknown sweep 'nope'; registered sweeps: .*decorated"):
        bench.sweeps(["nope"])


def test_time_cpu_repeats_until_min_runs_and_min_time():
    calls = []
    ms = bench.time_cpu(lambda: calls.append(1), min_time=0.0, min_runs=7, warmup_time=0.0)
    assert len(calls) == 8 and ms >= 0  # one warm-up call, then seven timed
    with pytest.raises(ValueError, match="min_runs must be >= 1; got 0"):
        bench.time_cpu(lambda: None, min_runs=0)


def test_copy_bandwidth_counts_read_and_write():
    gbps = bench.copy_bandwidth("cpu", nbytes=1 << 20, timer=lambda fn: (fn(), 1.0)[1])
    assert gbps == pytest.approx(2 * (1 << 20) / 1e6)  # 2 MiB in 1 ms
    assert bench.copy_bandwidth("cpu", nbytes=1 << 20) > 0


def test_quantize_sweep_end_to_end(tmp_path):
    (sweep,) = bench.sweeps(["quantize_per_token"])
    sweep = dataclasses.replace(sweep, xs=(16, 64), quick=(16, 64))
    timer = functools.partial(bench.time_cpu, min_time=0.0, min_runs=3, warmup_time=0.0)
    run = bench.run([sweep], "cpu", quick=True, timer=timer, copy_gbps=10.0, progress=False)
    (result,) = run.results
    assert {r.candidate for r in result.rows} == {"frugal", "reference"}
    assert all(r.ms > 0 and r.gbps > 0 for r in result.rows)
    assert set(result.slopes) == {"frugal", "reference"}
    assert "backend=" in result.notes["auto"]
    assert result.verdicts == []  # the target is at M=4096, not measured here
    assert "| 64 | frugal |" in run.markdown()
    assert len(run.save(tmp_path)) == 3


@pytest.mark.parametrize("name", ["int8_matmul", "int8_matmul_n11008"])
def test_int8_sweeps_run(name, monkeypatch):
    # Every candidate runs once (a fake timer) and the notes build: a real run takes minutes.
    from frugal.bench import builtin

    monkeypatch.setattr(builtin, "rotation_bytes", lambda: 1 << 20)  # one copy of each
    (sweep,) = bench.sweeps([name])
    sweep = dataclasses.replace(sweep, xs=(1, 2), quick=(1, 2))
    calls = []

    def timer(fn):
        fn()
        calls.append(fn)
        return 1.0 + len(calls)

    run = bench.run([sweep], "cpu", quick=True, timer=timer, copy_gbps=10.0, progress=False)
    (result,) = run.results
    users = {"bf16", "int_mm", "int_mm_dyn", "qdynamic"}
    assert {r.candidate for r in result.rows} == {"w8a8", "weight_only", "int8_matmul",
                                                  "fp32"} | users
    assert all(set(r.versus) == users for r in result.rows)
    assert "backend='cpu'" in result.notes["auto"]
    # Int8Linear against fp32 at M <= 16, and against every user path at every M (of the
    # sweep's own xs: M = 2 has none).
    assert {(v.target.x, v.target.versus) for v in result.verdicts} == {
        (1, "fp32"), (1, "bf16"), (1, "int_mm_dyn"), (1, "qdynamic")}
    assert "vs int_mm" in run.markdown()


def test_target_needs_a_floor():
    with pytest.raises(ValueError, match="set min_speedup, min_copy_fraction or both; got neither"):
        bench.Target(x=256, candidate="linear")
    with pytest.raises(ValueError, match="min_copy_fraction needs memory_bound=True"):
        _synthetic(memory_bound=False,
                   targets=(bench.Target(x=256, candidate="linear", min_copy_fraction=0.5),))


def test_copy_fraction_targets():
    # copy_gbps=10: linear moves 256e6 bytes in 0.256 ms (100x copy bandwidth), quadratic in
    # 6.5536 ms (3.9x).
    targets = (bench.Target(x=256, candidate="linear", min_copy_fraction=50.0),
               bench.Target(x=256, candidate="quadratic", min_copy_fraction=5.0),
               bench.Target(x=256, candidate="linear", min_speedup=5.0, min_copy_fraction=50.0))
    run = _run(_synthetic(targets=targets))
    verdicts = run.results[0].verdicts
    assert [v.passed for v in verdicts] == [True, False, False]  # the last: speedup only 4x
    assert verdicts[1].copy_fraction == pytest.approx(256e6 / (1e-4 * 256**2) / 1e6 / 10.0)
    text = run.markdown()
    assert "linear reaches 10000.0% of copy bandwidth (target >= 5000%): PASS" in text
    assert "quadratic reaches 390.6% of copy bandwidth (target >= 500%): FAIL" in text
    assert ("linear is 4.0x the dense (target >= 5x) and reaches 10000.0% of copy bandwidth "
            "(target >= 5000%): FAIL") in text
    record = run.record()["sweeps"][0]["targets"]
    assert [t["passed"] for t in record] == [True, False, False]
    assert record[0]["copy_fraction"] == pytest.approx(100.0)


def test_targets_against_another_x():
    # Cost growth: linear at 512 against itself at 256 is 0.5x (twice the time).
    targets = (bench.Target(x=512, candidate="linear", min_speedup=0.4, versus="linear",
                            versus_x=256),
               bench.Target(x=512, candidate="linear", min_speedup=1 / 1.2, versus="linear",
                            versus_x=256),
               bench.Target(x=512, candidate="linear", min_speedup=0.1, versus="linear",
                            versus_x=999))  # not measured: skipped
    run = _run(_synthetic(targets=targets))
    verdicts = run.results[0].verdicts
    assert len(verdicts) == 2 and [v.passed for v in verdicts] == [True, False]
    assert verdicts[0].speedup == pytest.approx(0.5)
    assert ("linear is 0.50x the linear at tokens=256 (target >= 0.833x): FAIL"
            in run.markdown())


def test_counts_may_depend_on_the_device():
    seen = []

    def nbytes(x, device):
        seen.append(device)
        return 1e6 * x

    result = _run(_synthetic(nbytes=nbytes, flops=lambda x, device=None: 2e6 * x)).results[0]
    rows = {(r.x, r.candidate): r for r in result.rows}
    assert rows[256, "linear"].gbps == pytest.approx(1000.0)
    assert rows[256, "linear"].gflops == pytest.approx(2000.0)
    assert seen and all(d == torch.device("cpu") for d in seen)


# ---------------------------------------------------------------------------------------------
# Paged decode attention sweeps (frugal.bench.paged)

PAGED_SWEEPS = ["paged_attention", "paged_attention_b1", "paged_attention_b32",
                "paged_attention_window"]


@pytest.mark.parametrize("name", PAGED_SWEEPS)
def test_paged_sweeps_run(name, monkeypatch):
    # Every candidate runs once at two tiny contexts (a fake timer) and the notes build; the real
    # sizes take minutes. Tiny inputs would need thousands of rotating copies to fill 4x the
    # last-level cache.
    from frugal.bench import paged

    monkeypatch.setattr(paged, "rotation_bytes", lambda: 1 << 20)
    (sweep,) = bench.sweeps([name])
    sweep = dataclasses.replace(sweep, xs=(17, 40), quick=(17, 40))
    calls = []

    def timer(fn):
        out = fn()
        assert out.shape[1:] == (32, 128) and torch.isfinite(out).all()
        calls.append(fn)
        return 1.0 + len(calls)

    run = bench.run([sweep], "cpu", quick=True, timer=timer, copy_gbps=10.0, progress=False)
    (result,) = run.results
    want = {"paged", "sdpa"} if name.endswith("window") else {"paged", "sdpa", "sdpa_gqa",
                                                                 "gather_sdpa"}
    assert {r.candidate for r in result.rows} == want
    assert len(result.rows) == 2 * len(want)
    assert all(r.gbps > 0 and r.copy_fraction > 0 for r in result.rows)
    assert "backend='cpu'" in result.notes["auto"] and result.notes["dtype"] == "float32"
    assert result.verdicts == []  # the targets are at 4096 and 32768
    assert ("KV memory" in result.notes) == (name == "paged_attention")
    assert "| 40 | paged |" in run.markdown()


@pytest.mark.parametrize("batch, context, window, block_size",
                         [(3, 100, None, 16), (3, 100, 37, 16), (2, 45, 45, 4), (1, 7, 3, 1),
                          (2, 33, 80, 8)])
def test_paged_candidates_agree(poison, batch, context, window, block_size):
    # Every candidate against float64 attention computed from the paged cache itself (positions
    # read through the tables by hand), so a wrong contiguous copy or gather fails too.
    from frugal.bench import paged

    problem = paged.DecodeProblem(batch, context, "cpu", window=window, hq=12, hkv=3, d=40,
                                  block_size=block_size, seed=context)
    lo = 0 if window is None else max(0, context - window)
    pos = torch.arange(lo, context)
    want = torch.empty(batch, 12, 40, dtype=torch.float64)
    for b in range(batch):
        blocks = problem.tables[b, pos // block_size].long()
        assert (blocks >= 0).all()
        k = problem.k_cache[blocks, pos % block_size].double().repeat_interleave(4, dim=1)
        v = problem.v_cache[blocks, pos % block_size].double().repeat_interleave(4, dim=1)
        s = torch.einsum("hd,lhd->hl", problem.q[b].double(), k) * problem.scale
        want[b] = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v)
    if window is not None and lo > 0:
        # Blocks wholly before the window were given back.
        assert (problem.tables[:, :lo // block_size] == -1).all()
    assert problem.k_dense.shape == (batch, 3, context - lo, 40)
    for name in ("paged", "sdpa", "sdpa_gqa", "gather_sdpa"):
        out = getattr(problem, name)()
        assert out.shape == (batch, 12, 40) and out.dtype == torch.float32, name
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_paged_memory_cap_and_footprint():
    from frugal.bench import paged
    from frugal.paged_kv_cache import kv_footprint

    assert paged.kv_bytes(8, 4096, "cpu") == 2 * 8 * 4096 * 8 * 128 * 4
    assert paged.kv_bytes(8, 32768, "cpu", window=4096) == paged.kv_bytes(8, 4096, "cpu")
    assert paged.kv_bytes(8, 4096, "cuda") == paged.kv_bytes(8, 4096, "cpu") // 2
    # Inputs and temporaries of every timed candidate stay under the cap.
    for name in PAGED_SWEEPS:
        (sweep,) = bench.sweeps([name])
        batch, window = sweep.params["B"], sweep.params.get("window")
        for x in sweep.xs:
            timed = [n for n in ("paged", "sdpa", "sdpa_gqa", "gather_sdpa")
                     if paged.fits(n, batch, x, "cpu", window)]
            assert "paged" in timed and "sdpa" in timed, (name, x)
            held = max((1 + paged._EXTRA_KV[n]) * paged.kv_bytes(batch, x, "cpu", window)
                       for n in timed)
            assert held <= paged.MEMORY_CAP < 6.5e9
    assert not paged.fits("gather_sdpa", 8, 32768, "cpu")
    assert paged.fits("gather_sdpa", 8, 16384, "cpu")
    line = paged.mixed_batch_footprint(batch=5, max_len=300, block_size=16, seed=3)
    lengths = torch.randint(1, 301, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    fp = kv_footprint(lengths, 16)
    per_slot = 2 * 8 * 128 * 4
    assert f"paged holds {fp.paged_slots * per_slot / 1e9:.3f} GB" in line
    assert f"dense max-length {fp.dense_slots * per_slot / 1e9:.3f} GB" in line
    assert line.endswith("PASS" if fp.paged_overhead <= 0.05 else "FAIL")


# Slope targets, per-candidate FLOP counts and summaries (used by the sparse-attention sweeps)


def test_slope_targets_pass_and_fail():
    sweep = _synthetic(slope_targets=(
        registry.SlopeTarget(candidate="linear", max_slope=1.15),
        registry.SlopeTarget(candidate="quadratic", max_slope=1.15),
        registry.SlopeTarget(candidate="quadratic", min_slope=1.7),
        registry.SlopeTarget(candidate="linear", min_slope=1.7, device="cuda"),
        registry.SlopeTarget(candidate="quadratic", max_slope=1.15, min_x=XS[-1])))
    run = _run(sweep)
    (result,) = run.results
    assert [(v.target.candidate, v.passed) for v in result.slope_verdicts] == [
        ("linear", True), ("quadratic", False), ("quadratic", True), ("quadratic", False)]
    assert result.slope_verdicts[-1].slope is None  # one x left: no fit, so it fails
    assert result.slope_verdicts[0].slope == pytest.approx(1.0)
    assert not run.passed
    md = run.markdown()
    assert "synthetic: quadratic scaling exponent 2.00 (target <= 1.15): FAIL" in md
    assert "synthetic: quadratic scaling exponent 2.00 (target >= 1.7): PASS" in md
    record = run.record()["sweeps"][0]["slope_targets"]
    assert [r["passed"] for r in record] == [True, False, True, False]
    assert f"exponent over tokens >= {XS[-1]} n/a" in md
    with pytest.raises(ValueError, match="set max_slope, min_slope or both"):
        registry.SlopeTarget(candidate="linear")


def test_checks_pass_fail_and_count_with_the_targets():
    """A sweep's checks see the measured rows (and the device when they take it); a failed one
    fails the run like a missed target, in the Markdown and the JSON record."""
    def checks(rows, device):
        slowest = max((r for r in rows if r.x == XS[-1]), key=lambda r: r.ms)
        return [registry.Check("slowest is linear", slowest.candidate == "linear",
                               f"{slowest.candidate} on {device.type}"),
                registry.Check("rows per x", len(rows) == 3 * len(XS), f"{len(rows)}")]

    run = _run(_synthetic(targets=(), checks=checks))
    (result,) = run.results
    assert [(c.name, c.passed) for c in result.checks] == [("slowest is linear", False),
                                                          ("rows per x", True)]
    assert not run.passed
    md = run.markdown()
    assert "synthetic: slowest is linear: quadratic on cpu: FAIL" in md
    assert f"synthetic: rows per x: {3 * len(XS)}: PASS" in md
    assert run.record()["sweeps"][0]["checks"][1] == {
        "name": "rows per x", "passed": True, "measured": str(3 * len(XS))}
    assert _run(_synthetic(targets=(), checks=lambda rows: [])).passed


def test_flops_per_candidate_and_summary():
    sweep = _synthetic(flops=lambda x: {"linear": 1e6 * x, "dense": 4e6 * x},
                       summary=lambda rows: {"rows seen": len(rows)})
    run = _run(sweep)
    (result,) = run.results
    by = {(r.x, r.candidate): r for r in result.rows}
    assert by[64, "linear"].gflops == pytest.approx(1e6 * 64 / (0.001 * 64) / 1e6)
    assert by[64, "quadratic"].gflops is None
    assert result.notes["rows seen"] == 3 * len(XS)
    assert "| 64 | quadratic |" in run.markdown()


# Block-sparse attention sweeps (frugal.bench.sparse)


@pytest.mark.parametrize("name", ["sparse_attention", "sparse_attention_break_even"])
def test_sparse_sweeps_run_and_candidates_agree(name, monkeypatch):
    from frugal.bench import sparse

    monkeypatch.setattr(sparse, "_BE_N", 320)
    (sweep,) = bench.sweeps([name])
    xs = (200, 330) if name == "sparse_attention" else (64, 200)
    sweep = dataclasses.replace(sweep, xs=xs, quick=xs)
    outputs = {}

    def timer(fn):
        out = fn()
        assert torch.isfinite(out).all()
        outputs.setdefault(out.shape, []).append(out)
        return 1.0 + len(outputs)

    run = bench.run([sweep], "cpu", quick=True, timer=timer, progress=False)
    (result,) = run.results
    names = {r.candidate for r in result.rows}
    if name == "sparse_attention":
        assert names == {"sdpa_causal"} | {f"{p}_{m}" for p in ("frugal", "sdpa_mask")
                                             for m in ("window512", "window1024", "causal",
                                                       "bigbird")}
        # Each frugal candidate equals SDPA with its mask as a dense bool mask.
        for n in xs:
            cands = sparse._setup(n, torch.device("cpu"))
            for m in ("window512", "window1024", "causal", "bigbird"):
                torch.testing.assert_close(cands[f"frugal_{m}"](), cands[f"sdpa_mask_{m}"](),
                                           atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(cands["frugal_causal"](), cands["sdpa_causal"](),
                                       atol=2e-5, rtol=2e-5)
        assert all(r.gflops > 0 for r in result.rows)
        assert len(result.slope_verdicts) == 3
    else:
        assert names == {"frugal", "sdpa_dense"}
        assert "break-even density" in result.notes


def test_rounds_interleave_and_keep_the_best():
    order = []

    def setup(x, device):
        calls = {"a": iter([5.0, 3.0, 4.0]), "base": iter([2.0, 6.0, 1.0])}
        return {name: (lambda name=name, it=it: (order.append(name), next(it))[1])
                for name, it in calls.items()}

    sweep = _synthetic(setup=setup, baseline="base", xs=(8,), quick=(8,), targets=(),
                       nbytes=None, memory_bound=False, flops=None)
    run = bench.run([sweep], "cpu", timer=fake_timer, progress=False, rounds=3)
    assert order == ["a", "base"] * 3
    ms = {r.candidate: r.ms for r in run.results[0].rows}
    assert ms == {"a": 3.0, "base": 1.0}
    with pytest.raises(ValueError, match="rounds must be a positive int; got 0"):
        bench.run([sweep], "cpu", timer=fake_timer, progress=False, rounds=0)


def test_read_bandwidth_counts_the_bytes_read():
    gbps = bench.read_bandwidth("cpu", nbytes=1 << 20, timer=lambda fn: (fn(), 1.0)[1])
    assert gbps == pytest.approx((1 << 20) / 1.0 / 1e6)


def test_summary_may_take_the_device():
    seen = []
    sweep = _synthetic(summary=lambda rows, device: seen.append(device) or {"n": len(rows)})
    (result,) = _run(sweep).results
    assert seen == [torch.device("cpu")] and result.notes["n"] == 3 * len(XS)


def test_copy_is_timed_with_each_x_and_fractions_use_it(monkeypatch):
    # With no copy_gbps the copy runs in every round of every x, after the candidates, and each
    # x's fractions are against the best copy of that x.
    order = []
    copy_ms = {64: [4.0, 2.0], 128: [1.0, 8.0]}  # per x, per round: best 2.0 and 1.0 ms
    state = {"x": None}

    def setup(x, device):
        state["x"] = x
        return {name: (lambda n=name, f=fn: (order.append((x, n)), f())[1])
                for name, fn in _synthetic_setup(x, device).items()}

    def fake_copy(device, nbytes=256 << 20):
        def fn():
            x = state["x"]
            order.append((x, "copy"))
            return copy_ms[x][sum(1 for o in order if o == (x, "copy")) - 1]
        return fn, 2e6  # 2e6 bytes counted: 1 GB/s at 2 ms, 2 GB/s at 1 ms

    monkeypatch.setattr(bench.runner, "copy_fn", fake_copy)
    run = bench.run([_synthetic(setup=setup, targets=())], "cpu", quick=True, timer=fake_timer,
                    progress=False, rounds=2)
    (result,) = run.results
    assert order == [(x, n) for x in (64, 128) for _ in range(2)
                     for n in ("linear", "quadratic", "dense", "copy")]
    assert result.copy_by_x == pytest.approx({64: 1.0, 128: 2.0})
    assert run.copy_gbps == pytest.approx(2.0)  # the best of the run
    rows = {(r.x, r.candidate): r for r in result.rows}
    assert rows[64, "linear"].copy_fraction == pytest.approx(rows[64, "linear"].gbps / 1.0)
    assert rows[128, "linear"].copy_fraction == pytest.approx(rows[128, "linear"].gbps / 2.0)
    assert "timed at each tokens in the same rounds as the candidates" in run.markdown()
    assert run.record()["sweeps"][0]["copy_gbps_by_x"] == pytest.approx({"64": 1.0, "128": 2.0})


@pytest.mark.parametrize("name", ["cascade_decode", "cascade_decode_mha"])
def test_cascade_sweeps_run_and_candidates_agree(name, monkeypatch):
    # Both candidates at two suffixes, on a small prefix (the real sizes take minutes), with the
    # auto threshold lowered so that the cascade is chosen: the same result, the notes say so.
    from frugal import cascade
    from frugal.bench import cascade as sweep_module

    monkeypatch.setattr(sweep_module, "BATCH", 5)
    monkeypatch.setattr(sweep_module, "PREFIX", 48)
    monkeypatch.setattr(cascade, "MIN_SAVED_BYTES", 1)
    monkeypatch.setattr(cascade, "MIN_PREFIX_BYTES", 1)
    (sweep,) = bench.sweeps([name])
    sweep = dataclasses.replace(sweep, xs=(1, 32), quick=(1, 32))
    outs = []

    def timer(fn):
        out = fn()
        assert out.shape == (5, 32, 128) and torch.isfinite(out).all()
        outs.append(out)
        return 1.0 + len(outs)

    run = bench.run([sweep], "cpu", quick=True, timer=timer, progress=False)
    (result,) = run.results
    assert {r.candidate for r in result.rows} == {"per_sequence", "cascade"}
    # Interleaved rounds: per_sequence, cascade, per_sequence, cascade, ... at each x.
    assert len(outs) % 2 == 0
    for per_sequence, cascaded in zip(outs[::2], outs[1::2]):
        torch.testing.assert_close(cascaded, per_sequence, rtol=1e-5, atol=1e-5)
    assert result.notes["auto chose"] == ("1: 5 sequences share 48 tokens; "
                                          "32: 5 sequences share 48 tokens")
    assert [v.target.x for v in result.verdicts] == [1, 32]


def test_a_sweeps_own_timer_is_used_unless_run_is_given_one():
    sweep = _synthetic(timer=lambda fn: 7.0, targets=(), nbytes=None, memory_bound=False)
    own = bench.run([sweep], "cpu", progress=False, rounds=1)
    assert {r.ms for r in own.results[0].rows} == {7.0}
    given = bench.run([sweep], "cpu", timer=fake_timer, progress=False, rounds=1)
    assert {r.ms for r in given.results[0].rows} != {7.0}


# End-to-end generation (frugal.bench.generate)


def test_generate_sweep_runs_and_records_tokens_and_kv_bytes(monkeypatch, one_thread):
    # Every candidate generates once at two tiny token counts with a smaller model; frugal's
    # greedy tokens must equal transformers', and its blocks waste at most block_size - 1 slots
    # per sequence over the tokens they hold (all but each sequence's last sampled token).
    pytest.importorskip("transformers", minversion="5")
    from frugal.bench import generate

    monkeypatch.setattr(generate, "MODEL", dict(generate.MODEL, hidden_size=64,
                                                num_hidden_layers=2, vocab_size=256))
    monkeypatch.setattr(generate, "MEAN_TOKENS", 96)
    monkeypatch.setattr(generate, "NEW_TOKENS", 5)
    monkeypatch.setattr(generate, "SYSTEM_TOKENS", 16)
    generate._models.cache_clear()
    (sweep,) = bench.sweeps(["generate"])
    sweep = dataclasses.replace(sweep, xs=(200, 401), quick=(200, 401))
    try:
        run = bench.run([sweep], "cpu", quick=True, progress=False, rounds=1)
    finally:
        generate._models.cache_clear()
    (result,) = run.results
    assert {r.candidate for r in result.rows} == set(generate.CANDIDATES)
    assert sum(map(len, generate.prompts_for(401))) + 4 * 5 == 401
    assert result.notes["at 401"].startswith("4 sequences; prefix tokens reused ")
    assert "frugal_int8_kv" in result.notes["KV bytes at 401"]
    overheads = [float(s.split("(+")[1].split("%")[0])
                 for s in result.notes["KV bytes at 401"].split(", ") if "(+" in s]
    assert overheads and max(overheads) <= 100 * 4 * 15 / (401 - 4)
    assert "frugal" in result.notes[
        "KV bytes scaling exponent (slope of log bytes vs log tokens)"]
    # The checks: tokens equal at both x; KV overhead per frugal candidate, decided against 5%
    # (sequences of ~96 tokens waste up to 15 of them: above 5% here, below at 512 tokens).
    checks = {c.name: c for c in result.checks}
    tokens = checks["frugal's greedy tokens equal transformers' for every sequence"]
    assert tokens.passed and tokens.measured == "200: 2/2, 401: 4/4"
    kv = [c for name, c in checks.items() if name.endswith("of its tokens' at every tokens")]
    assert len(kv) == 4 and run.passed == all(c.passed for c in result.checks)
    for c in kv:
        worst = max(float(p.split("+")[1].rstrip("%")) for p in c.measured.split(", "))
        assert c.passed == (worst <= 5.0)


def test_fastest_times_each_candidate_by_its_fastest_run(monkeypatch):
    """--fastest: a candidate preempted on most runs is timed by its clean runs (the median
    would be a preempted one)."""
    import itertools
    import time

    from frugal.bench.registry import Sweep

    delays = itertools.cycle([0.004, 0.004, 0.0])
    sweep = Sweep(name="fastest_test", op="quantize_per_token", x_name="x", xs=(1,),
                  quick=(1,), baseline="a", setup=lambda x, device: {
                      "a": lambda: time.sleep(next(delays))})
    run = bench.run([sweep], "cpu", progress=False, copy_gbps=10.0, fastest=True, rounds=1)
    assert run.results[0].rows[0].ms < 2.0
    assert "timer: fastest run" in run.markdown()
    run = bench.run([sweep], "cpu", progress=False, copy_gbps=10.0, rounds=1)
    assert run.results[0].rows[0].ms > 3.0


def test_rotation_exceeds_the_last_level_cache():
    from frugal.bench import timing

    llc = timing.llc_bytes()
    assert llc >= 1 << 20
    assert timing.rotation_bytes() >= max(64 << 20, 4 * llc)


def test_int8_sweeps_report_each_paths_error():
    """The int8 sweeps' notes give each timed path's error against float64 (what its speed
    buys): Int8Linear W8A8 and the hand-written torch._int_mm path quantize alike, so their
    errors agree; quantize_dynamic's 7-bit per-tensor x costs it about twice W8A8's error;
    bf16 beats them all."""
    from frugal.bench.builtin import int8_linear_errors

    err = int8_linear_errors(96, 320, m=16, seed=3)
    assert set(err) == {"w8a8", "weight_only", "int_mm_dyn", "qdynamic", "bf16"}
    assert all(0 < e < 0.05 for e in err.values()), err
    assert err["int_mm_dyn"] == pytest.approx(err["w8a8"], rel=1e-3)
    assert err["qdynamic"] > 1.4 * err["w8a8"] and err["bf16"] < err["w8a8"] / 2, err
