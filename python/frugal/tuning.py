"""``frugal tune``: measure every tunable choice on the machine at hand, keep only what gave the
right answer there, and let ``auto`` use it.

What is tuned, per op that declares a :class:`TuneSpec` (``op.tune``): for each size of the
op's bucket dimension (rows M, head dim D, ...), every implementation that can run
(``op.candidates``: the backend is a tunable choice) and, for an implementation with a
``space``, every launch config in it. Each candidate is

1. pruned, on a GPU, by ``frugal check``'s resource model for the GPU's arch (it is compiled as
   the JIT builds it; one that cannot launch or spills is dropped);
2. verified: run once on fresh random inputs against the op's reference with its accuracy
   rule; a candidate that misses it is dropped and can never be chosen;
3. timed with the bench timer (on a CPU its fastest run, not the median: see
   :func:`tuning_timer`), in interleaved rounds.

A candidate replaces the default choice -- auto's first verified backend, a C++ kernel's knob
defaults -- only when it is faster by the device's noise margin (NOISE_MARGIN: 10% on a CPU,
3% on a GPU). The winners become a file per device in the user's directory (``FRUGAL_CONFIG_DIR``, default
``~/.cache/frugal``): per op, buckets of sizes with their fastest verified backend (adjacent
sizes with one winner merge), and per launch-config table the winning configs, in the format of
``kernels/configs/*.json``. The file is keyed by device, frugal and Triton versions and a hash of
the kernel sources: a stale, foreign or corrupt one is ignored with one warning. Precedence for
a launch config: the tuned file, a shipped per-device file, the arch file, ``default.json``; for
a backend: the tuned file, then the op's default order.
"""

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import time
import warnings
from typing import Callable, Optional

import torch

FORMAT = 1
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    """How ``frugal tune`` exercises an op.

    dim : name of the bucket dimension ("M", "D", ...).
    sizes : ``(quick, device) -> list of ints``, the sizes along ``dim`` to measure.
    inputs : ``(size, device, generator) -> tuple``, fresh random arguments of an Impl's run.
    check : ``(out, args) -> None or str``, the accuracy rule against the reference (a reason
        when it misses).
    size_of : ``(args) -> int``, the size of a call (its arguments as the Impls take them).
    variants : ``(args) -> list of (label, kwargs)`` or None: other forms of the call that
        share the tuned choice but compile or run differently (the attention ops' score
        modifiers). Every candidate is verified under the plain call and each variant
        (``check(out, args, **kwargs)``), and timed as the sum of one call of each, so the
        chosen backend and config serve every variant, and one that breaks only under a
        variant is never chosen.
    """

    dim: str
    sizes: Callable
    inputs: Callable
    check: Callable
    size_of: Callable
    variants: Optional[Callable] = None


def call_variants(spec, args):
    """[(label, kwargs)]: the plain call of ``spec`` on ``args``, then its variants."""
    return [("", {})] + (list(spec.variants(args)) if spec.variants is not None else [])


@dataclasses.dataclass(frozen=True)
class Tuned:
    """A tuned choice: the backend and where it came from (file and entry)."""

    backend: str
    source: str


# ----------------------------------------------------------------------------- the files

def config_dir():
    """Where tuned files live: $FRUGAL_CONFIG_DIR, else ~/.cache/frugal."""
    return os.environ.get("FRUGAL_CONFIG_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "frugal")


def device_name(device):
    """The name a device's tuned file is filed under: the GPU's name, or the CPU's model and
    the ISA level the C++ kernels use."""
    device = torch.device(device)
    if device.type == "cuda":
        return _gpu_name(device.index if device.index is not None else
                         torch.cuda.current_device())
    from . import _ext

    isa = _ext.ext().cpu_isa() if _ext.ext() is not None else "no-ext"
    return f"CPU {_cpu_model()} {isa}"


@functools.lru_cache(maxsize=None)
def _gpu_name(index):
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _cpu_model():
    from .build_info import cpu_model

    return cpu_model()


def file_for(device):
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in device_name(device))
    return os.path.join(config_dir(), f"tuned-{name}.json")


@functools.lru_cache(maxsize=None)
def sources_hash():
    """A hash of the kernel sources (Triton kernels, C++ and CUDA sources, launch configs): a
    tuned file made with other kernels is stale."""
    h = hashlib.sha256()
    for top in ("kernels", "csrc"):
        base = os.path.join(_ROOT, top)
        for dirpath, dirnames, filenames in sorted(os.walk(base)):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith((".py", ".cpp", ".cu", ".h", ".json")):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def _versions():
    from frugal import __version__

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"frugal": __version__, "triton": tv, "sources": sources_hash()}


_LOADED = {}  # (device type, index) -> the tuned data in force (or None)
_WARNED = set()
_ENABLED = [True]  # frugal.tuning.use(False) sets it aside


def _warn_once(path, why):
    if path not in _WARNED:
        _WARNED.add(path)
        warnings.warn(f"frugal: ignoring the tuned file {path}: {why}; the default configs "
                      f"apply (run `frugal tune` again)", stacklevel=3)


def read(path, device):
    """The data of a tuned file if it is valid for this device and these kernels, else None
    (with one warning for a stale, foreign or corrupt file)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format') if isinstance(data, dict) else '?'}")
        ops, tables = data["ops"], data["tables"]
        if not isinstance(ops, dict) or not isinstance(tables, dict):
            raise ValueError("ops and tables must be objects")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _warn_once(path, f"corrupt ({type(exc).__name__}: {exc})")
        return None
    if data.get("device") != device_name(device):
        _warn_once(path, f"made for {data.get('device')!r}, not {device_name(device)!r}")
        return None
    stale = {k: (data.get(k), v) for k, v in _versions().items() if data.get(k) != v}
    if stale:
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in stale.items())
        _warn_once(path, f"stale ({what})")
        return None
    return data


def load(device, force=False):
    """The tuned data in force for ``device`` (None without a valid file); installs its launch
    config tables so the Triton launchers pick them. Read once per device (``force`` again)."""
    device = torch.device(device)
    key = (device.type, device.index)
    if force or key not in _LOADED:
        path = file_for(device)
        data = read(path, device)
        if data is not None:
            data["path"] = path
        _LOADED[key] = data
        if device.type == "cuda" or data is not None:
            from frugal.kernels import configs

            configs.set_tuned(None if data is None else data["tables"], path)
    return _LOADED[key]


@contextlib.contextmanager
def use(enabled):
    """Inside, tuned choices apply (True) or not (False: the shipped defaults), for paired
    comparisons in one process (``frugal bench --compare-tuned``)."""
    from frugal.kernels import configs

    saved = _ENABLED[0], dict(configs._TUNED)
    _ENABLED[0] = enabled
    if not enabled:
        configs.set_tuned(None, None)
    try:
        yield
    finally:
        _ENABLED[0] = saved[0]
        configs.set_tuned(saved[1]["tables"], saved[1]["path"])


def forget():
    """Drop what was loaded (tests; after `frugal tune --reset`)."""
    _LOADED.clear()
    from frugal.kernels import configs

    configs.set_tuned(None, None)


def preferred(op, device, args, kwargs):
    """The backend the tuned file of ``device`` names for this call of ``op``, or None.
    (Under torch.compile only a file loaded before is consulted: loading reads files.)"""
    if op.tune is None or device.type not in ("cpu", "cuda") or not _ENABLED[0]:
        return None
    data = _LOADED.get((device.type, device.index), _LOADED)  # _LOADED: not read yet
    if data is _LOADED:
        # torch.compile traces only a plain dict read: loading reads files.
        data = None if torch.compiler.is_compiling() else load(device)
    if data is None:
        return None
    buckets = data["ops"].get(op.name)
    if not buckets:
        return None
    size = op.tune.size_of(args)
    for i, bucket in enumerate(buckets):
        bound = bucket.get("max")
        if bound is None or size <= bound:
            return Tuned(bucket["backend"], f"{data['path']}: {op.name}[{i}]")
    return None


# ----------------------------------------------------------------------------- tuning


@dataclasses.dataclass
class Result:
    """One candidate at one size."""

    op: str
    size: int
    backend: str
    config: Optional[dict]
    table: Optional[str]
    status: str  # "ok", "wrong: ...", "pruned: ...", "failed: ..." ("wrong (variant): ...")
    ms: Optional[float] = None  # the sum over the plain call and the variants, one call each
    variants: tuple = ()  # the labels of the TuneSpec's variants it ran under

    @property
    def label(self):
        cfg = "" if self.config is None else " " + ",".join(
            f"{k}={v}" for k, v in self.config.items())
        return f"{self.backend}{cfg}"


def _prune(impl, args, config, device, impl_spec):
    """Why a Triton candidate cannot ship on this GPU's arch (frugal check's rules), under the
    plain call or any variant of ``impl_spec`` (the op's TuneSpec), or None."""
    if device.type != "cuda" or impl.backend != "triton":
        return None
    from . import check, jit_capture

    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}"
    if arch not in check.ARCHS:
        return None
    with jit_capture.capture(device_key=(None, arch)) as launches:
        for _, mods in call_variants(impl_spec, args):
            impl.run(*args, config=config, **mods)
    for launch in launches:
        row = check.compile_launch(launch, arch)
        if not row["ok"]:
            return "; ".join(row["failures"])
    return None


def _candidates(op, device, args, quick):
    """(impl, table, config) for every implementation that can run ``args`` and every config
    of its space (one None config without a space)."""
    out = []
    for impl in op.candidates(device, *args):
        space = impl.space(*args, quick=quick) if impl.space is not None else None
        if not space:
            out.append((impl, None, None))
        else:
            out.extend((impl, table, cfg) for table, cfg in space)
    return out


def tuning_timer(device):
    """The bench timer, except on a CPU the fastest run rather than the median: on a shared
    machine another process taking a core (or a two-thread parallel region waiting for its
    descheduled thread) only ever adds time, and the median of a loaded machine's runs can be
    a scheduler time slice rather than the kernel."""
    from .bench.timing import default_timer, time_cpu

    if torch.device(device).type == "cuda":
        return default_timer(device)
    return functools.partial(time_cpu, stat=min)


class _InTurn:
    """One call of each variant, in turn: what a candidate is timed on. ``args`` and
    ``keywords`` are the plain call's (as on a functools.partial), ``calls`` all of them."""

    def __init__(self, calls):
        self.calls = calls
        self.args, self.keywords = calls[0].args, calls[0].keywords

    def __call__(self):
        for call in self.calls:
            call()


def tune_op(op, device, *, quick=True, timer=None, rounds=2, deadline=None, bar=None,
            seed=0):
    """Measure ``op`` on ``device``; returns the list of :class:`Result`."""
    spec = op.tune
    timer = timer or tuning_timer(device)
    results = []
    gen = torch.Generator().manual_seed(seed)
    for size in spec.sizes(quick, device):
        if deadline is not None and time.monotonic() > deadline:
            break
        args = spec.inputs(size, device, gen)
        variants = call_variants(spec, args)
        labels = tuple(label for label, _ in variants[1:])
        timed = []
        for impl, table, config in _candidates(op, device, args, quick):
            res = Result(op.name, size, impl.backend, config, table, "ok", variants=labels)
            results.append(res)
            kwargs = {} if config is None else {"config": config}
            why = _prune(impl, args, config, device, spec) if config is not None else None
            if why is not None:
                res.status = f"pruned: {why}"
                continue
            fresh = spec.inputs(size, device, gen)  # verified on inputs not seen before
            reason = None
            for label, mods in call_variants(spec, fresh):
                where = f" ({label})" if label else ""
                try:
                    reason = spec.check(impl.run(*fresh, **kwargs, **mods), fresh, **mods)
                except Exception as exc:  # a candidate that raises is a result, not a crash
                    reason = f"failed{where}: {type(exc).__name__}: {exc}"
                    break
                if reason is not None:
                    reason = f"wrong{where}: {reason}"
                    break
            if reason is not None:
                res.status = reason
                continue
            calls = [functools.partial(impl.run, *args, **kwargs, **mods)
                     for _, mods in variants]
            timed.append((res, calls[0] if len(calls) == 1 else _InTurn(calls)))
        for _ in range(rounds):  # interleaved: each candidate once per round, best kept
            for res, fn in timed:
                ms = timer(fn)
                res.ms = ms if res.ms is None else min(res.ms, ms)
        if bar is not None:
            bar.update()
    return results


def _buckets(results, key):
    """Merge sizes whose winners (by ``key``) agree into buckets [{max, ...winner}], the last
    one open-ended."""
    by_size = {}
    for res in results:
        if res.status == "ok" and res.ms is not None:
            best = by_size.get(res.size)
            if best is None or res.ms < best.ms:
                by_size[res.size] = res
    sizes = sorted(by_size)
    buckets = []
    for size in sizes:
        win = by_size[size]
        if buckets and key(buckets[-1]["_win"]) == key(win):
            buckets[-1]["max"] = size
        else:
            buckets.append({"max": size, "_win": win})
    if buckets:
        buckets[-1]["max"] = None
    return buckets


# A candidate must beat the default choice by this much to replace it: timing noise must not
# choose a backend or a CPU knob value.
# On this project's CPUs (shared 2-core VMs) the twins of untouched candidates in a quiet
# paired run differ by up to 10% and a memory-bound kernel's time swings more; GPU timings
# (CUDA events, median of 100) are steadier.
NOISE_MARGIN = {"cpu": 0.10, "cuda": 0.03}


def _margin(device):
    return NOISE_MARGIN.get(torch.device(device).type, 0.10)


def _default_backend_unless_faster(results, margin):
    """``results`` with each size's other backends dropped unless their best time beats the
    default backend's (auto's first verified candidate there) by ``margin``."""
    first, best = {}, {}
    for r in results:
        if r.status == "ok" and r.ms is not None:
            first.setdefault(r.size, r.backend)
            key = (r.size, r.backend)
            best[key] = min(best.get(key, r.ms), r.ms)
    return [r for r in results if r.size not in first or r.backend == first[r.size]
            or r.ms is None or r.ms <= best[r.size, first[r.size]] * (1 - margin)]


def _default_unless_faster(rows, margin):
    """The rows of a knob table with each size's candidates other than the defaults dropped
    unless they beat the defaults' time by ``margin``."""
    from . import knobs as cpu_knobs

    defaults = {n: k.default for n, k in cpu_knobs.knobs().items()}
    base = {}
    for r in rows:
        if r.status == "ok" and r.ms is not None and all(
                defaults.get(k) == v for k, v in r.config.items()):
            base[r.size] = r.ms
    return [r for r in rows if r.size not in base or r.ms is None
            or r.ms <= base[r.size] * (1 - margin)
            or all(defaults.get(k) == v for k, v in r.config.items())]


def summarize(results_by_op, device):
    """The tuned-file data of measured results."""
    ops, tables = {}, {}
    for name, results in results_by_op.items():
        buckets = _buckets(_default_backend_unless_faster(results, _margin(device)),
                           key=lambda r: r.backend)
        ops[name] = [{"max": b["max"], "backend": b["_win"].backend, "ms": b["_win"].ms}
                     for b in buckets]
        # Launch configs: per table, the fastest config per size among its Triton candidates.
        # C++ CPU knob tables (cpu_*): likewise, keyed on the op's dim, but a size keeps the
        # knobs' defaults unless its winner beat them by the noise margin.
        triton = [r for r in results if r.table is not None]
        for table in sorted({r.table for r in triton}):
            rows = [r for r in triton if r.table == table]
            from frugal.kernels import configs

            if table.startswith("cpu_"):
                from . import registry

                dim = registry.op(name).tune.dim
                rows = _default_unless_faster(rows, _margin(device))
            else:
                dim = configs.table_dim(table)
            tb = _buckets(rows, key=lambda r: json.dumps(r.config, sort_keys=True))
            tables[table] = [{f"max_{dim}": b["max"], **b["_win"].config} for b in tb]
    return {"format": FORMAT, "device": device_name(device), **_versions(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "ops": ops, "tables": tables}


def tunable_ops(names=None):
    """The registered ops with a TuneSpec (all, or those named)."""
    from . import registry

    ops = [op for op in registry.OPS.values() if op.tune is not None]
    if names:
        known = {op.name for op in ops}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"--op: expected names among {', '.join(sorted(known))}; got "
                             f"{', '.join(unknown)}")
        ops = [op for op in ops if op.name in names]
    return ops


def save(data, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def tune(ops, device, *, quick=True, budget_s=None, timer=None, progress=True, rounds=2):
    """Tune ``ops`` on ``device``, write the device's tuned file (in :func:`config_dir`) and
    load it. Interrupting (Ctrl-C) or running out of budget keeps what finished. Returns
    (path, data, results)."""
    device = torch.device(device)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    total = sum(len(op.tune.sizes(quick, device)) for op in ops)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="frugal tune", unit="size")
        except ImportError:
            bar = None
    results = {}
    try:
        for op in ops:
            if deadline is not None and time.monotonic() > deadline:
                break
            results[op.name] = tune_op(op, device, quick=quick, timer=timer, rounds=rounds,
                                       deadline=deadline, bar=bar)
    except KeyboardInterrupt:
        pass  # keep what finished
    finally:
        if bar is not None:
            bar.close()
    data = summarize({k: v for k, v in results.items() if v}, device)
    path = save(data, file_for(device))
    load(device, force=True)
    return path, data, results


# ----------------------------------------------------------------------------- command line

def format_results(results):
    """Per op and size, every candidate with its status and time, the winner marked."""
    lines = []
    for name, rows in results.items():
        for size in sorted({r.size for r in rows}):
            here = [r for r in rows if r.size == size]
            ok = [r for r in here if r.status == "ok" and r.ms is not None]
            best = min(ok, key=lambda r: r.ms) if ok else None
            labels = next((r.variants for r in here if r.variants), ())
            note = f" (times: one call each of plain, {', '.join(labels)})" if labels else ""
            lines.append(f"{name} {registry_dim(name)}={size}{note}:")
            for r in sorted(here, key=lambda r: (r.ms is None, r.ms or 0)):
                mark = "*" if r is best else " "
                ms = f"{r.ms:9.4f} ms" if r.ms is not None else " " * 12
                lines.append(f"  {mark} {ms}  {r.label}  {'' if r.status == 'ok' else r.status}")
    return "\n".join(lines)


def registry_dim(name):
    from . import registry

    return registry.op(name).tune.dim


def format_file(data):
    lines = [f"device {data['device']}; frugal {data['frugal']}, triton {data['triton']}, "
             f"sources {data['sources']}; made {data['created']}"]
    for name, buckets in data["ops"].items():
        parts = [f"<= {b['max']}: {b['backend']}" if b["max"] is not None
                 else f"rest: {b['backend']}" for b in buckets]
        lines.append(f"  {name} by {registry_dim(name)}: " + "; ".join(parts))
    for table, buckets in data["tables"].items():
        lines.append(f"  config table {table}: {len(buckets)} bucket(s)")
        for b in buckets:
            lines.append("    " + ", ".join(f"{k}={v}" for k, v in b.items()))
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="frugal tune", description="Measure every tunable choice of frugal's ops on this "
        "device (backend, launch configs), verify each candidate against the reference, and "
        "write the winners to this device's tuned file, which `auto` then uses.")
    parser.add_argument("--op", action="append", metavar="NAME",
                        help="tune this op (repeatable; default: every tunable op)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and configs")
    parser.add_argument("--budget-s", type=float, metavar="S",
                        help="stop after about S seconds, keeping what finished")
    parser.add_argument("--out", metavar="DIR",
                        help="the config directory (default $FRUGAL_CONFIG_DIR or "
                             "~/.cache/frugal)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--show", action="store_true", help="print this device's tuned file")
    parser.add_argument("--reset", action="store_true", help="delete this device's tuned file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.out:
        os.environ["FRUGAL_CONFIG_DIR"] = args.out
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    path = file_for(device)
    if args.reset:
        if os.path.exists(path):
            os.remove(path)
            print(f"removed {path}")
        else:
            print(f"no tuned file for {device_name(device)} ({path})")
        forget()
        return 0
    if args.show:
        data = read(path, device)
        print(f"{path}:\n{format_file(data)}" if data else f"no valid tuned file at {path}")
        return 0
    try:
        ops = tunable_ops(args.op)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.monotonic()
    path, data, results = tune(ops, device, quick=args.quick, budget_s=args.budget_s)
    print(format_results(results))
    print(f"\nwrote {path} ({time.monotonic() - start:.0f} s):\n{format_file(data)}")
    return 0
