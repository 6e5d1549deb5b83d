"""Runs sweeps: times every candidate at every x, derives speedups, throughput and scaling
exponents, and renders the results as a Markdown table, a JSON record and log-log plots."""

import dataclasses
import datetime
import functools
import inspect
import json
import os
import pathlib
import platform
import re
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from tqdm import tqdm

from .registry import Check, SlopeTarget, Sweep, Target
from .timing import copy_fn, default_timer, time_cpu


@dataclasses.dataclass
class Row:
    """One candidate at one x. ``speedup`` is baseline time / time; the throughputs are None
    when the sweep gives no byte (or FLOP) count; ``copy_fraction`` is GB/s over the device's
    copy bandwidth at the same x (see :func:`run`), for memory-bound sweeps."""

    x: int
    candidate: str
    ms: float
    speedup: float
    gbps: Optional[float]
    gflops: Optional[float]
    copy_fraction: Optional[float]
    versus: dict = dataclasses.field(default_factory=dict)  # {sweep.compare name: speedup}


@dataclasses.dataclass
class Verdict:
    """A target's measured speedup (its ``versus`` time over its candidate's) and, for
    memory-bound sweeps, the candidate's fraction of copy bandwidth at the target's x."""

    target: Target
    speedup: float
    copy_fraction: Optional[float] = None

    @property
    def passed(self):
        t = self.target
        if t.min_speedup is not None and not self.speedup >= t.min_speedup:
            return False
        if t.min_copy_fraction is not None:
            return self.copy_fraction is not None and self.copy_fraction >= t.min_copy_fraction
        return True


@dataclasses.dataclass
class SlopeVerdict:
    """A slope target and the candidate's fitted scaling exponent (None: fewer than two x)."""

    target: SlopeTarget
    slope: Optional[float]

    @property
    def passed(self):
        t, s = self.target, self.slope
        if s is None:
            return False
        if t.max_slope is not None and not s <= t.max_slope:
            return False
        return t.min_slope is None or s >= t.min_slope


@dataclasses.dataclass
class SweepResult:
    sweep: Sweep
    rows: List[Row]
    slopes: Dict[str, Optional[float]]
    notes: dict
    verdicts: List[Verdict]
    slope_verdicts: List[SlopeVerdict] = dataclasses.field(default_factory=list)
    # Memory-bound sweeps: the copy bandwidth each x's copy fractions are against (GB/s).
    copy_by_x: Dict[int, float] = dataclasses.field(default_factory=dict)
    checks: List[Check] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BenchRun:
    """What :func:`run` measured, with the environment it measured it in."""

    env: dict
    copy_gbps: Optional[float]
    results: List[SweepResult]

    @property
    def passed(self):
        """Whether every target and check of this run was met."""
        return all(v.passed for r in self.results
                   for v in r.verdicts + r.slope_verdicts + r.checks)

    def markdown(self):
        """The results as Markdown: per sweep a table, the scaling exponents, the verdicts;
        with tuned twins, the paired comparison."""
        text = "\n\n".join(_sweep_markdown(r, self.env, self.copy_gbps) for r in self.results)
        pairs = self.tuned_pairs()
        if pairs:
            text += "\n\n" + _pairs_markdown(pairs)
        return text

    def tuned_pairs(self):
        """[(sweep, x, candidate, default ms, tuned ms)] of a ``compare_tuned`` run."""
        out = []
        for r in self.results:
            ms = {(row.x, row.candidate): row.ms for row in r.rows}
            for (x, name), tuned in ms.items():
                if name.endswith("@tuned") and (x, name[:-6]) in ms:
                    out.append((r.sweep.name, x, name[:-6], ms[x, name[:-6]], tuned))
        return out

    def record(self):
        """The results as a JSON-serialisable dict."""
        return {**self.env, "copy_bandwidth_gbps": self.copy_gbps,
                "sweeps": [_sweep_record(r) for r in self.results]}

    def save(self, out="bench-results"):
        """Write ``<time>-<device>.json``, ``.md`` and one ``-<sweep>.png`` per sweep into
        ``out`` (created if missing); return the paths written."""
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        # "2025-06-01T12:30:00+00:00" -> "20250601T123000": sorts by time, safe in file names.
        stamp = re.sub(r"[-:]", "", self.env["timestamp"][:19])
        stem = f"{stamp}-{self.env['device']}"
        json_path = out / f"{stem}.json"
        json_path.write_text(json.dumps(self.record(), indent=2) + "\n")
        md_path = out / f"{stem}.md"
        md_path.write_text(self.markdown() + "\n")
        paths = [json_path, md_path]
        for result in self.results:
            paths.append(out / f"{stem}-{result.sweep.name}.png")
            _plot(result, self.env, paths[-1])
        return paths


def fit_slope(xs, times):
    """Least-squares slope of log(time) against log(x): the scaling exponent (1 for linear
    cost, 2 for quadratic). None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(times), 1)[0])


def environment(device):
    """Versions, device and machine facts a benchmark record carries."""
    import triton

    import frugal

    device = torch.device(device)
    from frugal.build_info import cpu_model

    cpu = cpu_model()
    return {
        "frugal": frugal.__version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu_model": cpu,
        "cpu_threads": torch.get_num_threads(),
        "cpu_isa": _cpu_isa(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_isa():
    """The instruction sets of this CPU that matter to the kernels, and the path frugal's C++
    kernels take (FRUGAL_CPU_ISA may cap it)."""
    from frugal import _ext

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    names = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI",
             "avx512_bf16": "AVX512-BF16", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}
    has = [label for flag, label in names.items() if flag in flags]
    mod = _ext.ext()
    path = mod.cpu_isa() if mod is not None else "no extension"
    if mod is not None and "AMX-INT8" in has and mod.detected_cpu_isa() != "amx_int8":
        path += f" (AMX off: {mod.cpu_amx()[1]})"
    line = f"{' '.join(has) or 'none of AVX2/AVX-512/AMX'}; frugal C++ path: {path}"
    line += f"; torch ATen: {torch.backends.cpu.get_cpu_capability()}"
    level = os.environ.get("FRUGAL_BENCH_CPU_ISA")
    if level:  # frugal bench --cpu-isa: torch's libraries capped too
        caps = ", ".join(f"{k}={os.environ.get(k, '')}" for k in (
            "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS"))
        line += f" (--cpu-isa {level}: {caps})"
    return line


def run(sweeps, device=None, *, quick=False, timer=None, copy_gbps=None, progress=True,
        rounds=None, compare_tuned=False, fastest=False):
    """Time every candidate of every sweep at each of its token counts.

    Parameters
    ----------
    sweeps : sequence of Sweep
    device : str or torch.device, optional
        Defaults to "cuda" when available, else "cpu".
    quick : bool
        Use each sweep's ``quick`` token counts instead of ``xs``.
    timer : callable ``fn -> milliseconds``, optional
        For every sweep; by default a sweep's own ``timer``, else
        :func:`~frugal.bench.timing.default_timer` for the device (with ``fastest`` on a
        CPU, its fastest run instead of the median: for a machine shared with other work,
        where the median can be a scheduler time slice).
    copy_gbps : float, optional
        The device's copy bandwidth, for every x of every memory-bound sweep. When None it is
        measured: at each x of a memory-bound sweep a 256 MiB ``dst.copy_(src)`` is timed in
        the same interleaved rounds as the candidates, and that x's copy fractions are against
        it. On a shared machine whose memory bandwidth swings from minute to minute (cloud
        VMs), a kernel and the copy it is compared with then see the same conditions, rather
        than a kernel timed in a slow minute being held to a copy timed in a fast one, or the
        reverse. ``BenchRun.copy_gbps`` is the best copy of the run.
    progress : bool
        Show a progress bar on stderr.
    rounds : int, optional
        Time the candidates of each x this many times, interleaved (a, b, c, a, b, c, ...),
        and keep each one's fastest round: a burst of load from another process then slows
        one round of every candidate rather than one candidate. Default 2 on CPU (a shared
        machine), 1 on CUDA. The copy is timed the same way.
    compare_tuned : bool
        Time every candidate twice in the same interleaved rounds: ``name@default`` with the
        shipped configs and default backend order, ``name@tuned`` with this device's tuned file
        (``frugal tune``) as ``name@tuned``; :meth:`BenchRun.tuned_pairs` lists the pairs.

    Returns
    -------
    BenchRun
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if rounds is None:
        rounds = 2 if device.type == "cpu" else 1
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"run: rounds must be a positive int; got {rounds!r}")
    env = environment(device)
    if fastest and torch.device(device).type == "cpu":
        env["timer"] = "fastest run (--fastest)"
    total = sum(len(s.quick if quick else s.xs) for s in sweeps)
    measured = copy_gbps is None
    timed = []
    with tqdm(total=total, file=sys.stderr, disable=not progress, leave=False) as bar:
        for s in sweeps:
            xs = s.quick if quick else s.xs
            copy = None
            if s.memory_bound:
                copy = copy_fn(device) if measured else (None, copy_gbps)
            base = default_timer(device)
            if fastest and torch.device(device).type == "cpu":
                base = functools.partial(time_cpu, stat=min)
            times, copies = _time_sweep(s, xs, device, timer or s.timer or base,
                                        bar, rounds, copy, compare_tuned)
            timed.append((s, times, copies))
    if measured:
        copy_gbps = max((g for _, _, c in timed for g in c.values()), default=None)
    results = [_result(s, times, copies, device) for s, times, copies in timed]
    return BenchRun(env, copy_gbps, results)


def _time_sweep(sweep, xs, device, timer, bar, rounds=1, copy=None, compare_tuned=False):
    """Times and, with ``copy`` = (fn, counted bytes), the copy GB/s at each x; ``copy`` =
    (None, gbps) gives every x that bandwidth."""
    times, copies = {}, {}
    for x in xs:
        t, copy_ms = _time_candidates(sweep, x, device, timer, bar, rounds,
                                      copy[0] if copy else None, compare_tuned)
        times.update(t)
        if copy is not None:
            copies[x] = copy[1] / copy_ms / 1e6 if copy[0] is not None else copy[1]
        bar.update()
    return times, copies


def _result(sweep, times, copies, device):
    rows = [_row(sweep, x, name, ms, times, copies.get(x), device)
            for (x, name), ms in times.items()]
    curves = {}
    for row in rows:
        curves.setdefault(row.candidate, []).append(row)
    slopes = {name: fit_slope([r.x for r in rs], [r.ms for r in rs]) for name, rs in curves.items()}
    fractions = {(r.x, r.candidate): r.copy_fraction for r in rows}
    verdicts = [Verdict(t, times[_versus(sweep, t)] / times[t.x, t.candidate],
                        fractions[t.x, t.candidate])
                for t in sweep.targets
                if t.device == device.type and (t.x, t.candidate) in times
                and _versus(sweep, t) in times]
    slope_verdicts = [SlopeVerdict(t, _target_slope(t, curves[t.candidate]))
                      for t in sweep.slope_targets
                      if t.device == device.type and t.candidate in slopes]
    notes = sweep.notes(device) if sweep.notes else {}
    if sweep.summary:
        notes.update(_count(sweep.summary, rows, device))
    checks = list(_count(sweep.checks, rows, device)) if sweep.checks else []
    return SweepResult(sweep, rows, slopes, notes, verdicts, slope_verdicts, dict(copies),
                       checks)


def _target_slope(target, rows):
    rows = [r for r in rows if target.min_x is None or r.x >= target.min_x]
    return fit_slope([r.x for r in rows], [r.ms for r in rows])


def _versus(sweep, target):
    """The (x, candidate) a target's speedup is measured against."""
    x = target.x if target.versus_x is None else target.versus_x
    return x, target.versus or sweep.baseline


def _twins(candidates):
    """Each candidate twice: ``name`` with tuning set aside (the shipped defaults; the sweep's
    baseline and targets refer to these) and ``name@tuned``."""
    from frugal import tuning

    def within(fn, enabled):
        def call():
            with tuning.use(enabled):
                return fn()

        return call

    twins = {}
    for name, fn in candidates.items():
        twins[name] = within(fn, False)
        twins[f"{name}@tuned"] = within(fn, True)
    return twins


def _time_candidates(sweep, x, device, timer, bar, rounds=1, copy=None, compare_tuned=False):
    """({(x, name): best ms}, best ms of ``copy`` or None): every candidate, then the copy (if
    given), in each of ``rounds`` interleaved rounds."""
    # A function of its own so that x's inputs are freed before the next, larger ones exist.
    candidates = sweep.setup(x, device)
    if sweep.baseline not in candidates:
        raise ValueError(f"sweep {sweep.name!r}: setup({x}, {device}) must return the "
                         f"baseline {sweep.baseline!r}; got {', '.join(candidates)}")
    if compare_tuned:
        candidates = _twins(candidates)
    times, copy_ms = {}, None
    for r in range(rounds):
        steps = list(candidates.items()) + ([(None, copy)] if copy is not None else [])
        for name, fn in steps:
            bar.set_postfix_str(f"{sweep.name} {sweep.x_name}={x} {name or 'copy bandwidth'}"
                                + (f" (round {r + 1}/{rounds})" if rounds > 1 else ""))
            ms = timer(fn)
            if name is None:
                copy_ms = ms if copy_ms is None else min(ms, copy_ms)
            else:
                times[x, name] = min(ms, times.get((x, name), ms))
    return times, copy_ms


def _count(fn, x, device):
    """A sweep's nbytes, flops (or summary of rows) at x: ``fn(x)``, or ``fn(x, device)`` when
    fn takes two."""
    params = inspect.signature(fn).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return fn(x, device) if len(positional) >= 2 else fn(x)


def _row(sweep, x, name, ms, times, copy_gbps, device):
    gbps = _count(sweep.nbytes, x, device) / ms / 1e6 if sweep.nbytes else None
    flops = _count(sweep.flops, x, device) if sweep.flops else None
    if isinstance(flops, dict):
        flops = flops.get(name)
    gflops = flops / ms / 1e6 if flops is not None else None
    fraction = gbps / copy_gbps if sweep.memory_bound and copy_gbps else None
    versus = {other: times[x, other] / ms for other in sweep.compare if (x, other) in times}
    return Row(x, name, ms, times[x, sweep.baseline] / ms, gbps, gflops, fraction, versus)


def _params(sweep):
    return " ".join(f"{k}={v}" for k, v in sweep.params.items())


def _verdict_line(sweep, v):
    t = v.target
    where = " ".join(filter(None, [f"{sweep.x_name}={t.x}", _params(sweep)]))
    claims = []
    if t.min_speedup is not None:
        versus = t.versus or sweep.baseline
        if t.versus_x is not None:
            versus += f" at {sweep.x_name}={t.versus_x}"
        digits = 1 if t.min_speedup >= 1 else 2  # 0.83x, the floor of "within 1.2x"
        claims.append(f"is {v.speedup:.{digits}f}x the {versus} "
                      f"(target >= {t.min_speedup:.3g}x)")
    if t.min_copy_fraction is not None:
        got = "n/a" if v.copy_fraction is None else f"{100 * v.copy_fraction:.1f}%"
        claims.append(f"reaches {got} of copy bandwidth "
                      f"(target >= {100 * t.min_copy_fraction:g}%)")
    return (f"{sweep.name} {where}: {t.candidate} {' and '.join(claims)}: "
            f"{'PASS' if v.passed else 'FAIL'}")


def _sweep_markdown(result, env, copy_gbps):
    sweep = result.sweep
    title = f"### {sweep.name} on {env['device']} ({env['device_name']})"
    if env["device"] == "cpu" and env.get("cpu_isa"):
        title += f"\n\nCPU: {env['cpu_isa']}; {env['cpu_threads']} threads"
        if env.get("timer"):
            title += f"; timer: {env['timer']}"
    lines = [title + (f": {_params(sweep)}" if sweep.params else "")]
    if sweep.memory_bound:
        by_x = result.copy_by_x
        lo, hi = (min(by_x.values()), max(by_x.values())) if by_x else (copy_gbps, copy_gbps)
        if lo is None:
            lines.append("Memory-bound.")
        elif lo == hi:
            lines.append(f"Memory-bound; copy bandwidth {hi:.1f} GB/s (read + write).")
        else:
            each = ", ".join(f"{x}: {g:.1f}" for x, g in sorted(by_x.items()))
            lines.append(f"Memory-bound; copy bandwidth (read + write) timed at each "
                         f"{sweep.x_name} in the same rounds as the candidates, % copy bw "
                         f"against the copy at the same {sweep.x_name}: {lo:.1f} to {hi:.1f} "
                         f"GB/s ({each}).")
    lines += [f"- {k}: {v}" for k, v in result.notes.items()]
    columns = [sweep.x_name, "candidate", "ms", "speedup"]
    if sweep.nbytes:
        columns.append("GB/s")
    if sweep.memory_bound:
        columns.append("% copy bw")
    if sweep.flops:
        columns.append("GFLOP/s")
    columns += [f"vs {other}" for other in sweep.compare]
    lines += ["", "| " + " | ".join(columns) + " |",
              "|" + "|".join([" ---: ", " :--- "] + [" ---: "] * (len(columns) - 2)) + "|"]
    for row in result.rows:
        cells = [str(row.x), row.candidate, f"{row.ms:.4g}", f"{row.speedup:.2f}x"]
        if sweep.nbytes:
            cells.append(f"{row.gbps:.1f}")
        if sweep.memory_bound:
            cells.append(f"{100 * row.copy_fraction:.0f}%")
        if sweep.flops:
            cells.append("-" if row.gflops is None else f"{row.gflops:.1f}")
        cells += [f"{row.versus[o]:.2f}x" if o in row.versus else "-" for o in sweep.compare]
        lines.append("| " + " | ".join(cells) + " |")
    slopes = ", ".join(f"{name} {_fmt_slope(s)}" for name, s in result.slopes.items())
    lines += ["", f"Scaling exponent (slope of log time vs log {sweep.x_name}): {slopes}"]
    lines += [_verdict_line(sweep, v) for v in result.verdicts]
    lines += [_slope_line(sweep, v) for v in result.slope_verdicts]
    lines += [f"{sweep.name}: {c.name}: {c.measured}: {'PASS' if c.passed else 'FAIL'}"
              for c in result.checks]
    return "\n".join(lines)


def _slope_line(sweep, v):
    t = v.target
    bounds = " and ".join(filter(None, [
        f">= {t.min_slope:g}" if t.min_slope is not None else "",
        f"<= {t.max_slope:g}" if t.max_slope is not None else ""]))
    over = f" over {sweep.x_name} >= {t.min_x}" if t.min_x is not None else ""
    return (f"{sweep.name}: {t.candidate} scaling exponent{over} {_fmt_slope(v.slope)} (target "
            f"{bounds}): {'PASS' if v.passed else 'FAIL'}")


def _fmt_slope(slope):
    return "n/a" if slope is None else f"{slope:.2f}"


def _sweep_record(result):
    sweep = result.sweep
    return {
        "name": sweep.name,
        "op": sweep.op,
        "x_name": sweep.x_name,
        "xs": sorted({r.x for r in result.rows}),
        "baseline": sweep.baseline,
        "params": dict(sweep.params),
        "memory_bound": sweep.memory_bound,
        "description": sweep.description,
        "notes": result.notes,
        "rows": [dataclasses.asdict(r) for r in result.rows],
        "slopes": result.slopes,
        "targets": [{**dataclasses.asdict(v.target), "speedup": v.speedup,
                     "copy_fraction": v.copy_fraction, "passed": v.passed}
                    for v in result.verdicts],
        "slope_targets": [{**dataclasses.asdict(v.target), "slope": v.slope,
                           "passed": v.passed} for v in result.slope_verdicts],
        "checks": [dataclasses.asdict(c) for c in result.checks],
        "copy_gbps_by_x": {str(x): g for x, g in sorted(result.copy_by_x.items())},
    }


def _plot(result, env, path):
    sweep = result.sweep
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curves = {}
    for row in result.rows:
        curves.setdefault(row.candidate, []).append((row.x, row.ms))
    for name, points in curves.items():
        xs, ms = zip(*sorted(points))
        style = "--" if name == sweep.baseline else "-"
        label = f"{name} (slope {_fmt_slope(result.slopes[name])})"
        ax.loglog(xs, ms, style, marker="o", label=label)
    # Label the measured token counts themselves; log-scale minor labels collide.
    xs = sorted({row.x for row in result.rows})
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(sweep.x_name)
    ax.set_ylabel("time (ms)")
    ax.set_title(f"{sweep.name} {_params(sweep)}\n{env['device_name']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _pairs_markdown(pairs, noise=1.1):
    """The paired comparison: tuned over default per point; beyond ``noise`` either way it is
    named faster or slower."""
    lines = ["## Tuned vs default (same run, interleaved)", "",
             "| sweep | x | candidate | default ms | tuned ms | speedup | |",
             "|---|---|---|---|---|---|---|"]
    for sweep, x, name, base, tuned in pairs:
        speed = base / tuned
        mark = "faster" if speed > noise else "SLOWER" if speed < 1 / noise else ""
        lines.append(f"| {sweep} | {x} | {name} | {base:.4g} | {tuned:.4g} | {speed:.2f}x | "
                     f"{mark} |")
    faster = [p for p in pairs if p[3] / p[4] > noise]
    slower = [p for p in pairs if p[3] / p[4] < 1 / noise]
    lines += ["", f"{len(pairs)} points: {len(faster)} faster, {len(slower)} slower beyond "
                  f"{noise:.2f}x (noise: the twins of candidates tuning does not touch)"]
    return "\n".join(lines)
