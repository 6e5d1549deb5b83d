"""``frugal check``: compile every Triton kernel for real GPU targets, with no GPU present.

Each module in ``frugal.kernels.KERNEL_MODULES`` lists, through ``check_specs()``, every
(kernel, launch config, dtype) its launchers may compile. Each one is compiled for each target
with ``triton.compile``; its PTX goes through ptxas for registers and spills. A config fails when
it does not compile, cannot launch on the target (shared memory per block, registers per thread
or per SM), spills registers, or is matmul-shaped but has no tensor-core instructions.

Run as ``frugal check [--arch sm_80,sm_90] [--kernel NAME] [--json PATH]`` or
``python -m frugal.check ...``; ``run()`` returns the rows for programmatic use.
"""

import argparse
import functools
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
_SPEC_KEYS = ("kernel", "fn", "signature", "constexprs", "num_warps", "num_stages", "dtype",
              "config", "tensor_cores")
_COLUMNS = (  # (header, row key, right-aligned)
    ("kernel", "kernel", False), ("config", "config", False), ("target", "target", False),
    ("dtype", "dtype", False), ("smem", "shared", True), ("regs", "regs", True),
    ("spills", "spills", True), ("stack", "stack", True), ("tc", "tc", False),
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


@functools.lru_cache(maxsize=None)
def _specs(module):
    specs = list(importlib.import_module(f"frugal.kernels.{module}").check_specs())
    for spec in specs:
        missing = [k for k in _SPEC_KEYS if k not in spec]
        if missing:
            raise ValueError(f"frugal.kernels.{module}.check_specs(): expected keys "
                             f"{', '.join(_SPEC_KEYS)}; spec {spec.get('kernel')!r} lacks "
                             f"{', '.join(missing)}")
    return specs


def _jobs(archs, kernels):
    from frugal.kernels import KERNEL_MODULES

    jobs = [(module, index, arch)
            for module in KERNEL_MODULES
            for index, spec in enumerate(_specs(module))
            if kernels is None or spec["kernel"] in kernels
            for arch in archs]
    if kernels is not None:
        known = {spec["kernel"] for module in KERNEL_MODULES for spec in _specs(module)}
        unknown = sorted(set(kernels) - known)
        if unknown:
            raise ValueError(f"kernel: expected names among {', '.join(sorted(known))}; "
                             f"got {', '.join(unknown)}")
    return jobs


def _interpreting():
    import triton

    return triton.knobs.runtime.interpret


def _labels(spec, arch):
    return {
        "kernel": spec["kernel"], "config": spec["config"], "dtype": spec["dtype"],
        "target": arch, "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
        "tensor_cores": bool(spec["tensor_cores"]),
        "shared": None, "regs": None, "spill_stores": None, "spill_loads": None, "stack": None,
        "tc_instructions": [], "compile_s": None, "error": None,
    }


def _ptxas_usage(ptx, capability, metadata):
    from triton.backends.nvidia.compiler import get_ptxas

    gpu_name = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    # The flags of Triton's own ptxas run, so the counts are those of the cubin it built.
    flags = ["--regAllocOptLevel=2"] + ([] if metadata.enable_fp_fusion else ["--fmad=false"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(capability).path, "-v", *flags, f"--gpu-name={gpu_name}", path,
             "-o", os.devnull],
            capture_output=True, text=True,
        )
    if out.returncode != 0:
        raise RuntimeError(f"ptxas --gpu-name={gpu_name} failed ({out.returncode}):\n{out.stderr}")
    regs = re.search(r"Used (\d+) registers", out.stderr)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      out.stderr)
    if regs is None or frame is None:
        raise RuntimeError(f"ptxas -v: expected register and stack-frame lines; got:\n{out.stderr}")
    return {"regs": int(regs.group(1)), "stack": int(frame.group(1)),
            "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3))}


def _measure(spec, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = spec["signature"]
    # What the JIT specializes for a 16-byte-aligned tensor argument.
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, ty in enumerate(signature.values()) if ty.startswith("*")}
    capability = ARCHS[arch][0]
    start = time.perf_counter()
    try:
        kernel = triton.compile(
            ASTSource(spec["fn"], signature, spec["constexprs"], attrs),
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
        compile_s = time.perf_counter() - start
        ptx = kernel.asm["ptx"]
        found = [name for name, pattern in _TC_PATTERNS.items() if pattern.search(ptx)]
        return {"shared": kernel.metadata.shared, "tc_instructions": found,
                "compile_s": round(compile_s, 3),
                **_ptxas_usage(ptx, capability, kernel.metadata)}
    except Exception as exc:  # any failure to build is a result: the row reports it
        return {"error": f"{type(exc).__name__}: {exc}",
                "compile_s": round(time.perf_counter() - start, 3)}


def evaluate(row, arch):
    """Apply the launch rules of ``arch`` to one measured row.

    Parameters
    ----------
    row : dict
        A row as built by ``compile_spec``: ``error``, ``shared``, ``regs``, ``spill_stores``,
        ``spill_loads``, ``num_warps``, ``tensor_cores`` (the spec expects tensor cores) and
        ``tc_instructions`` (tensor-core instruction families found in the PTX).
    arch : str
        A key of ``ARCHS``, e.g. ``"sm_80"``.

    Returns
    -------
    failures : list of str
        Why the config cannot ship on ``arch``; empty when it passes.
    notes : list of str
        Remarks that do not fail the config (e.g. ``mma`` where ``wgmma`` was expected).
    """
    if row["error"]:
        lines = [line for line in row["error"].splitlines() if line.strip()]
        return [f"compile error: {lines[-1] if lines else row['error']}"], []
    failures, notes = [], []
    max_shared = ARCHS[arch][1]
    if row["shared"] > max_shared:
        failures.append(f"shared memory {row['shared']} B > {max_shared} B per block on {arch}")
    if row["spill_stores"] or row["spill_loads"]:
        failures.append(f"spills {row['spill_stores']} B stores + {row['spill_loads']} B loads")
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
    return failures, notes


def _finish(row):
    failures, notes = evaluate(row, row["target"])
    row["failures"], row["notes"], row["ok"] = failures, notes, not failures
    return row


def compile_spec(spec, arch):
    """Compile one ``check_specs()`` entry for ``arch`` and evaluate it.

    Parameters
    ----------
    spec : dict
        Keys ``kernel``, ``fn`` (a ``triton.JITFunction``; not an interpreted one),
        ``signature``, ``constexprs``, ``num_warps``, ``num_stages``, ``dtype``, ``config``,
        ``tensor_cores``.
    arch : str
        A key of ``ARCHS``.

    Returns
    -------
    dict
        The row: labels, ``shared`` (bytes), ``regs``, ``spill_stores``, ``spill_loads``,
        ``stack`` (bytes), ``tc_instructions``, ``compile_s``, ``error``, ``failures``, ``notes``
        and ``ok``.
    """
    return _finish({**_labels(spec, arch), **_measure(spec, arch)})


def _compile_job(module, index, arch):
    return compile_spec(_specs(module)[index], arch)


def _init_worker(cache_dir):
    # A cache hit would skip the frontend (hiding its errors) and time nothing.
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _compile_all(jobs):
    if not jobs:
        return []
    rows = [None] * len(jobs)
    bar = None if tqdm is None else tqdm(total=len(jobs), desc="frugal check", unit="config",
                                         file=sys.stderr)
    # spawn: a forked child would inherit the parent's threads (torch, tqdm) mid-state.
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as cache_dir, ProcessPoolExecutor(
        max_workers=min(WORKERS, len(jobs)), mp_context=context,
        initializer=_init_worker, initargs=(cache_dir,),
    ) as pool:
        futures = {pool.submit(_compile_job, *job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                rows[i] = future.result()
            except BrokenProcessPool as exc:
                module, index, arch = jobs[i]
                row = _labels(_specs(module)[index], arch)
                row["error"] = f"compiler process died: {exc}"
                rows[i] = _finish(row)
            if bar:
                bar.update()
        if bar:
            bar.close()
    return rows


def _run_in_subprocess(argv, stdout=None):
    # Kernels were defined as interpreted functions, which cannot be compiled: start afresh.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "frugal.check", *argv], env=env,
                          stdout=stdout).returncode


def run(archs=DEFAULT_ARCHS, kernels=None):
    """Compile every kernel config for each target and evaluate it.

    Parameters
    ----------
    archs : str or sequence of str
        Targets, keys of ``ARCHS`` (a comma-separated string is accepted).
    kernels : sequence of str, optional
        Only the specs whose ``kernel`` is listed; all when None.

    Returns
    -------
    list of dict
        One row per (spec, target), as ``compile_spec`` returns it.

    Raises
    ------
    ValueError
        On an unknown target or kernel name.
    """
    archs = _parse_archs(archs)
    kernels = None if kernels is None else tuple(kernels)
    jobs = _jobs(archs, kernels)
    if not _interpreting():
        return _compile_all(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        argv = ["--arch", ",".join(archs), "--json", path]
        if kernels is not None:
            argv += ["--kernel", ",".join(kernels)]
        code = _run_in_subprocess(argv, stdout=subprocess.DEVNULL)
        if not os.path.exists(path):
            raise RuntimeError(f"python -m frugal.check exited {code} without writing rows")
        with open(path) as f:
            return json.load(f)


def _cell(row, key):
    if key == "spills":
        value = None if row["spill_stores"] is None else row["spill_stores"] + row["spill_loads"]
    elif key == "tc":
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
        description="Compile every Triton kernel config for GPU targets (no GPU needed) and "
                    "fail on one that cannot launch, spills, or misses tensor cores.",
    )
    parser.add_argument("--arch", default=",".join(DEFAULT_ARCHS),
                        help=f"comma-separated targets among {', '.join(ARCHS)} "
                             f"(default: %(default)s)")
    parser.add_argument("--kernel", help="comma-separated kernel names (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    return parser


def main(argv=None):
    """Command line entry: ``frugal check [--arch ...] [--kernel ...] [--json PATH]``.

    Returns
    -------
    int
        0 when every config passes, 1 when any fails.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        archs = _parse_archs(args.arch)
        kernels = None if args.kernel is None else tuple(
            k.strip() for k in args.kernel.split(",") if k.strip())
        jobs = _jobs(archs, kernels)
    except ValueError as exc:
        parser.error(str(exc))
    if _interpreting():
        return _run_in_subprocess(argv)
    rows = _compile_all(jobs)
    failed = [row for row in rows if not row["ok"]]
    print(format_table(rows))
    for row in failed:
        if row["error"]:
            print(f"\n{row['kernel']} [{row['config']}] {row['target']} {row['dtype']}:\n"
                  f"{row['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{len(rows)} configs compiled, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    from frugal.check import main as _main  # workers unpickle functions of frugal.check

    sys.exit(_main())
