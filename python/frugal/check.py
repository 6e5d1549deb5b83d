"""``frugal check``: compile what the Triton JIT really builds, for real GPU targets, with no GPU.

The kernels are not listed by hand. ``frugal check`` drives the real launch code over the
declared matrix of public calls in :mod:`frugal.check_calls` with the launches captured
(:mod:`frugal.jit_capture`): each distinct launch -- kernel, constexprs, pointer dtypes, and
the JIT's own specialization of its integer and pointer arguments (value 1, divisibility by 16)
-- is compiled for each target by the installed Triton's JIT, exactly as that call would compile
on that GPU. The cubin's resource usage is read back with cuobjdump. A launch fails when it does
not compile, cannot launch on the target (shared memory per block, registers per thread or per
SM), has a stack frame or local memory (register spills), or is matmul-shaped but has no
tensor-core instructions.

``--floor`` compiles the same captured launches with the oldest Triton frugal supports
(:data:`FLOOR_TRITON`, installed apart from the environment's own, see ``--floor-path``); there
a launch fails only when it does not compile.

Run as ``frugal check [--arch sm_80,sm_90] [--kernel NAME] [--json PATH] [--floor]`` or
``python -m frugal.check ...``; ``run()`` returns the rows for programmatic use.
"""

import argparse
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

try:
    from tqdm import tqdm
except ImportError:  # tqdm comes with frugal[bench]; without it there is no progress bar
    tqdm = None

# name: (compute capability, max shared memory per block with opt-in, bytes)
ARCHS = {
    "sm_75": (75, 65536),
    "sm_80": (80, 166912),
    "sm_86": (86, 101376),
    "sm_89": (89, 101376),
    "sm_90": (90, 232448),
    "sm_100": (100, 232448),
    "sm_120": (120, 101376),
}
DEFAULT_ARCHS = ("sm_80", "sm_90")
FLOOR_TRITON = "3.2.0"  # the oldest Triton frugal supports (pyproject.toml, README)
FLOOR_ARCHS = ("sm_80",)
MAX_REGS_PER_THREAD = 255
REGS_PER_SM = 65536
WORKERS = 2

# The tensor-core instruction family Triton should emit per target; any family counts as
# tensor cores, but a different one than expected is reported.
_TC_EXPECTED = {"sm_90": "wgmma", "sm_100": "tcgen05"}
_TC_PATTERNS = {
    "tcgen05": re.compile(r"\btcgen05\.mma\b"),
    "wgmma": re.compile(r"\bwgmma\.mma_async\b"),
    "mma": re.compile(r"(?<![\w.])mma\.sync\b"),
}
_STATUS_WIDTH = 100  # compile errors are printed whole below the table
_COLUMNS = (  # (header, row key, right-aligned)
    ("kernel", "kernel", False), ("config", "config", False), ("target", "target", False),
    ("dtype", "dtype", False), ("spec", "spec", False), ("smem", "shared", True),
    ("regs", "regs", True), ("stack", "stack", True), ("tc", "tc", False),
    ("time_s", "compile_s", True), ("status", "status", False),
)


def _parse_archs(archs):
    names = archs.split(",") if isinstance(archs, str) else list(archs)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in ARCHS]
    if unknown or not names:
        raise ValueError(f"arch: expected a comma-separated list of {', '.join(ARCHS)}; "
                         f"got {', '.join(unknown) or repr(archs)}")
    return tuple(dict.fromkeys(names))


def kernel_info(launch):
    """(label, tensor cores expected) of a captured launch, from its kernel module's
    ``CHECK_KERNELS`` declaration ({fn name: (label, predicate over pointer dtypes)})."""
    table = getattr(importlib.import_module(launch.module), "CHECK_KERNELS", {})
    if launch.name not in table:
        return launch.name, False
    label, tensor_cores = table[launch.name]
    return label, bool(tensor_cores(pointer_dtypes(launch)))


def pointer_dtypes(launch):
    """{parameter: dtype name} of a launch's tensor arguments."""
    names = list(launch.fn().arg_names)
    values = dict(zip(names, launch.args))
    values.update(launch.kwargs)
    return {n: v[1].replace("torch.", "") for n, v in values.items()
            if isinstance(v, tuple) and v and v[0] == "t"}


def _describe(launch):
    """(config, dtype, spec) columns: constexprs and launch options; pointer dtypes; the
    integer/pointer specializations (=1 a constant, %16 divisible, ~16 an unaligned pointer)."""
    _, parts, options = launch.spec_key()
    config, spec = [], []
    for name, s in parts:
        if s[0] == "c" and s[1] is not None:
            value = s[1]
            config.append(f"{name}={int(value) if isinstance(value, bool) else value}")
        elif s[0] == "one":
            spec.append(f"{name}=1")
        elif s[0] == "i" and len(s) == 3 and s[2]:
            spec.append(f"{name}%16")
        elif s[0] == "t" and not s[2]:
            spec.append(f"{name}~16")
    opts = dict(options)
    config.append(f"w{opts.get('num_warps', 4)},s{opts.get('num_stages', 3)}")
    dtypes = ",".join(f"{n.removesuffix('_ptr')}={d}" for n, d in pointer_dtypes(launch).items())
    return ",".join(config), dtypes, ",".join(spec) or "-"


def capture_matrix(arch, families=None):
    """The distinct launches of the declared call matrix (:mod:`frugal.check_calls`) on a GPU
    of ``arch`` ("sm_90"): with that arch's config file, and with each GPU-specific file.
    Returns [(Launch, calls asking for it)]."""
    from frugal import check_calls, jit_capture
    from frugal.kernels import _launch

    families = families or check_calls.FAMILIES
    launches = []
    for name in _launch.device_files():
        with jit_capture.capture(device_key=(name, arch)) as recorded:
            check_calls.run(families)
        launches += recorded
    return jit_capture.unique(launches)


def _labels(launch, calls, arch, tensor_cores=None):
    label, expected = kernel_info(launch)
    config, dtype, spec = _describe(launch)
    options = dict(launch.spec_key()[2])
    return {
        "kernel": label, "config": config, "dtype": dtype, "spec": spec, "target": arch,
        "call": launch.call, "calls": calls,
        "num_warps": options.get("num_warps", 4), "num_stages": options.get("num_stages", 3),
        "tensor_cores": expected if tensor_cores is None else tensor_cores,
        "shared": None, "regs": None, "stack": None, "local": None,
        "tc_instructions": [], "compile_s": None, "error": None, "triton": None,
    }


def _resources(cubin):
    """Registers, stack frame and local memory of the one kernel in ``cubin`` (cuobjdump)."""
    from frugal import build_info

    tool = build_info.cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found: pip install nvidia-cuda-cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    usage = re.findall(r"Function \S+:\s*\n\s*(.+)", out)
    if len(usage) != 1:
        raise RuntimeError(f"cuobjdump: expected one kernel in the cubin; got:\n{out}")
    fields = dict(re.findall(r"(\w+):(\d+)", usage[0]))
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]),
            "local": int(fields["LOCAL"])}


def _measure(launch, arch):
    import triton

    from frugal import jit_capture

    capability = ARCHS[arch][0]
    start = time.perf_counter()
    try:
        kernel = jit_capture.compile_launch(launch, capability)
        compile_s = time.perf_counter() - start
        ptx = kernel.asm["ptx"]
        found = [name for name, pattern in _TC_PATTERNS.items() if pattern.search(ptx)]
        return {"shared": kernel.metadata.shared, "tc_instructions": found,
                "compile_s": round(compile_s, 3), "triton": triton.__version__,
                **_resources(kernel.asm["cubin"])}
    except Exception as exc:  # any failure to build is a result: the row reports it
        return {"error": f"{type(exc).__name__}: {exc}", "triton": triton.__version__,
                "compile_s": round(time.perf_counter() - start, 3)}


def evaluate(row, arch, floor=False):
    """Apply the launch rules of ``arch`` to one measured row.

    Parameters
    ----------
    row : dict
        A row as built by ``compile_launch``: ``error``, ``shared``, ``regs``, ``stack``,
        ``local``, ``num_warps``, ``tensor_cores`` (the kernel expects tensor cores) and
        ``tc_instructions`` (tensor-core instruction families found in the PTX).
    arch : str
        A key of ``ARCHS``, e.g. ``"sm_80"``.
    floor : bool
        The row was compiled by the floor Triton: only a compile error fails (resources and
        instruction choice are tuned for the current Triton); the rest become notes.

    Returns
    -------
    failures : list of str
        Why the launch cannot ship on ``arch``; empty when it passes.
    notes : list of str
        Remarks that do not fail it (e.g. ``mma`` where ``wgmma`` was expected).
    """
    if row["error"]:
        lines = [line for line in row["error"].splitlines() if line.strip()]
        return [f"compile error: {lines[-1] if lines else row['error']}"], []
    failures, notes = [], []
    max_shared = ARCHS[arch][1]
    if row["shared"] > max_shared:
        failures.append(f"shared memory {row['shared']} B > {max_shared} B per block on {arch}")
    if row["stack"] or row["local"]:
        failures.append(f"stack frame {row['stack']} B, local memory {row['local']} B "
                        f"(register spills)")
    if row["regs"] > MAX_REGS_PER_THREAD:
        failures.append(f"{row['regs']} registers > {MAX_REGS_PER_THREAD} per thread")
    threads = 32 * row["num_warps"]
    if row["regs"] * threads > REGS_PER_SM:
        failures.append(f"{row['regs']} registers x {threads} threads > {REGS_PER_SM} per SM")
    if row["tensor_cores"]:
        expected = _TC_EXPECTED.get(arch, "mma")
        found = row["tc_instructions"]
        if not found:
            failures.append(f"matmul-shaped but no tensor-core instructions ({expected} expected)")
        elif expected not in found:
            notes.append(f"{'+'.join(found)}, not {expected}")
    if floor:
        return [], failures + notes
    return failures, notes


def _finish(row, floor=False):
    failures, notes = evaluate(row, row["target"], floor)
    row["failures"], row["notes"], row["ok"] = failures, notes, not failures
    return row


def compile_launch(launch, arch, calls=1, tensor_cores=None, floor=False):
    """Compile one captured launch for ``arch`` with the installed Triton and evaluate it.

    Parameters
    ----------
    launch : frugal.jit_capture.Launch
    arch : str
        A key of ``ARCHS``.
    calls : int
        How many calls of the matrix asked for this launch (reported).
    tensor_cores : bool, optional
        Whether tensor-core instructions are expected; default from the kernel module's
        ``CHECK_KERNELS``.
    floor : bool
        Evaluate as a floor-Triton row (only compile errors fail).

    Returns
    -------
    dict
        The row: labels, ``shared`` (bytes), ``regs``, ``stack``, ``local`` (bytes),
        ``tc_instructions``, ``compile_s``, ``error``, ``failures``, ``notes`` and ``ok``.
    """
    return _finish({**_labels(launch, calls, arch, tensor_cores), **_measure(launch, arch)},
                   floor)


def _compile_job(launch_json, calls, arch, floor):
    from frugal.jit_capture import Launch

    return compile_launch(Launch.from_json(launch_json), arch, calls, floor=floor)


def _init_worker(cache_dir):
    # A cache hit would skip the frontend (hiding its errors) and time nothing.
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _compile_all(jobs, floor=False):
    """Compile (Launch, calls, arch) jobs in worker processes with the Triton this process
    imports (each row records its version); ``floor`` evaluates the rows as floor rows.

    A compiler crash (a segfault kills its worker, and the pool with it) fails only the launch
    that caused it: the jobs the broken pool left run again in order in a single-worker pool,
    where the first one that kills it is the culprit; the rest go back to parallel."""
    if not jobs:
        return []
    rows = [None] * len(jobs)
    bar = None if tqdm is None else tqdm(total=len(jobs), desc="frugal check", unit="launch",
                                         file=sys.stderr)
    todo, isolate = list(range(len(jobs))), False
    try:
        with tempfile.TemporaryDirectory() as cache_dir:
            while todo:
                broken = _compile_round(jobs, todo, rows, cache_dir, floor,
                                        1 if isolate else WORKERS, bar)
                if broken and isolate:  # one worker, in order: the first undone one crashed
                    culprit = broken.pop(0)
                    launch, calls, arch = jobs[culprit]
                    row = _labels(launch, calls, arch)
                    row["error"] = "compiler process died (a crash of Triton or ptxas)"
                    rows[culprit] = _finish(row, floor)
                    if bar:
                        bar.update()
                    isolate = False  # the rest in parallel again, until the next crash
                elif broken:
                    isolate = True
                todo = broken
    finally:
        if bar:
            bar.close()
    return rows


def _compile_round(jobs, todo, rows, cache_dir, floor, workers, bar):
    """One pool over the jobs ``todo``; fills ``rows``; returns the jobs a crash left undone,
    in submission order."""
    # spawn: a forked child would inherit the parent's threads (torch, tqdm) mid-state.
    context = multiprocessing.get_context("spawn")
    broken = []
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context,
                             initializer=_init_worker, initargs=(cache_dir,)) as pool:
        futures = {}
        for i in todo:
            launch, calls, arch = jobs[i]
            futures[pool.submit(_compile_job, launch.to_json(), calls, arch, floor)] = i
        for future in as_completed(futures):
            i = futures[future]
            try:
                rows[i] = future.result()
            except BrokenProcessPool:
                broken.append(i)
                continue
            if bar:
                bar.update()
    return sorted(broken)


def floor_triton_version(path):
    """The Triton version installed under ``path`` (a ``pip install --target`` folder)."""
    out = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                         env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"floor Triton under {path} does not import:\n{out.stderr}")
    return out.stdout.strip()


def _run_in_subprocess(argv, stdout=None, floor_path=None):
    # Kernels were defined as interpreted functions, which cannot be compiled: start afresh.
    # With floor_path, that Triton comes first on the new process's path (and on its compile
    # workers', which start with their parent's sys.path): it captures and compiles.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if floor_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (floor_path, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "frugal.check", *argv], env=env,
                          stdout=stdout).returncode


def kernel_labels():
    """Every kernel label the check knows (``CHECK_KERNELS`` of each kernel module)."""
    from frugal.kernels import KERNEL_MODULES

    return sorted(label for module in KERNEL_MODULES
                  for label, _ in importlib.import_module(
                      f"frugal.kernels.{module}").CHECK_KERNELS.values())


def _check_kernels(kernels):
    if kernels is None:
        return None
    unknown = sorted(set(kernels) - set(kernel_labels()))
    if unknown:
        raise ValueError(f"kernel: expected names among {', '.join(kernel_labels())}; got "
                         f"{', '.join(unknown)}")
    return tuple(kernels)


def _jobs(archs, kernels):
    jobs = []
    for arch in archs:
        for launch, calls in capture_matrix(arch):
            if kernels is None or kernel_info(launch)[0] in kernels:
                jobs.append((launch, calls, arch))
    return jobs


def run(archs=DEFAULT_ARCHS, kernels=None, floor_path=None):
    """Capture the call matrix's launches and compile each for each target.

    Parameters
    ----------
    archs : str or sequence of str
        Targets, keys of ``ARCHS`` (a comma-separated string is accepted).
    kernels : sequence of str, optional
        Only the launches of these kernels (labels as in the table); all when None.
    floor_path : str, optional
        Compile with the Triton installed under this folder (the floor check).

    Returns
    -------
    list of dict
        One row per (launch, target), as ``compile_launch`` returns it.

    Raises
    ------
    ValueError
        On an unknown target or kernel name.
    """
    archs = _parse_archs(archs)
    kernels = _check_kernels(kernels)
    if not _interpreting() and floor_path is None:
        return _compile_all(_jobs(archs, kernels))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        argv = ["--arch", ",".join(archs), "--json", path]
        if kernels is not None:
            argv += ["--kernel", ",".join(kernels)]
        if floor_path is not None:
            argv += ["--floor", "--floor-path", floor_path]
        code = _run_in_subprocess(argv, subprocess.DEVNULL, floor_path)
        if not os.path.exists(path):
            raise RuntimeError(f"python -m frugal.check exited {code} without writing rows")
        with open(path) as f:
            return json.load(f)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_version():
    import triton

    return triton.__version__


def _cell(row, key):
    if key == "tc":
        value = "+".join(row["tc_instructions"]) or "-"
    elif key == "status":
        value = ("ok" + "".join(f" ({n})" for n in row["notes"]) if row["ok"]
                 else "FAIL: " + "; ".join(row["failures"]))
        if len(value) > _STATUS_WIDTH:
            value = value[:_STATUS_WIDTH - 3] + "..."
    else:
        value = row[key]
    return "-" if value is None else str(value)


def format_table(rows):
    """Rows as aligned plain text, one line per (config, target), with a header."""
    cells = [[header for header, _, _ in _COLUMNS]]
    cells += [[_cell(row, key) for _, key, _ in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = []
    for line in cells:
        parts = [text.rjust(w) if right else text.ljust(w)
                 for text, w, (_, _, right) in zip(line, widths, _COLUMNS)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _parser():
    parser = argparse.ArgumentParser(
        prog="frugal check",
        description="Compile what the Triton JIT builds for the declared matrix of public "
                    "calls, for GPU targets (no GPU needed), and fail on a launch that does "
                    "not compile, cannot launch, spills, or misses tensor cores.",
    )
    parser.add_argument("--arch", default=None,
                        help=f"comma-separated targets among {', '.join(ARCHS)} (default: "
                             f"{','.join(DEFAULT_ARCHS)}; with --floor {','.join(FLOOR_ARCHS)})")
    parser.add_argument("--kernel", help="comma-separated kernel names (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    parser.add_argument("--floor", action="store_true",
                        help=f"compile with the floor Triton ({FLOOR_TRITON}) from --floor-path "
                             f"instead: only compile errors fail")
    parser.add_argument("--floor-path", metavar="DIR",
                        default=os.environ.get("FRUGAL_FLOOR_TRITON"),
                        help="folder holding the floor Triton (pip install --target DIR "
                             f"triton=={FLOOR_TRITON}); default $FRUGAL_FLOOR_TRITON")
    return parser


def main(argv=None):
    """Command line entry: ``frugal check [--arch ...] [--kernel ...] [--json PATH] [--floor]``.

    Returns
    -------
    int
        0 when every launch passes, 1 when any fails.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    floor = args.floor
    try:
        archs = _parse_archs(args.arch or (FLOOR_ARCHS if floor else DEFAULT_ARCHS))
        kernels = _check_kernels(None if args.kernel is None else tuple(
            k.strip() for k in args.kernel.split(",") if k.strip()))
    except ValueError as exc:
        parser.error(str(exc))
    if floor:
        if not args.floor_path:
            parser.error(f"--floor needs the floor Triton: pip install --target DIR "
                         f"triton=={FLOOR_TRITON}, then --floor-path DIR")
        version = floor_triton_version(args.floor_path)
        if version != FLOOR_TRITON:
            parser.error(f"--floor-path: expected Triton {FLOOR_TRITON}; {args.floor_path} "
                         f"holds {version}")
    if floor and _triton_version() != FLOOR_TRITON:
        return _run_in_subprocess(argv, floor_path=args.floor_path)
    if _interpreting():
        return _run_in_subprocess(argv)
    rows = _compile_all(_jobs(archs, kernels), floor)
    failed = [row for row in rows if not row["ok"]]
    print(format_table(rows))
    for row in failed:
        if row["error"]:
            print(f"\n{row['kernel']} [{row['config']}] {row['target']} {row['dtype']} "
                  f"{row['spec']} (from: {row['call']}):\n{row['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    which = f"Triton {FLOOR_TRITON} (floor)" if floor else "Triton"
    print(f"{len(rows)} launches compiled with {which}, {len(failed)} failed")
    cuda_failed = 0 if floor else _cuda_report()
    return 1 if failed or cuda_failed else 0


def _cuda_report():
    """Prints the CUDA C++ kernels' resources (frugal._C, built for the targets by nvcc) next
    to the Triton launches; returns how many have a stack frame or spill."""
    from frugal import _ext, build_info

    if not _ext.with_cuda() or build_info.cuobjdump() is None:
        print("\nCUDA C++ kernels: frugal._C was built without them (no nvcc or a CPU torch)")
        return 0
    report = build_info.cuda_kernel_report()
    bad = [r for r in report if r["stack"] or r["spill_bytes"] or r["blocks_per_sm"] == 0]
    print("\nCUDA C++ kernels (frugal._C, nvcc):")
    print(build_info.format_cuda_report(report))
    print(f"{len(report)} CUDA kernel builds, {len(bad)} with a stack frame, spills or no "
          f"room to launch")
    return len(bad)


if __name__ == "__main__":
    from frugal.check import main as _main  # workers unpickle functions of frugal.check

    sys.exit(_main())
