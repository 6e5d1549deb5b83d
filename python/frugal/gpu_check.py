"""``frugal gpu-check`` (``make gpu-check``): verify frugal on the GPU at hand in one command.

1. The whole test suite on CUDA tensors (every device-parametrized test runs its CUDA case; the
   Triton kernels run compiled, not interpreted), with a JUnit record.
2. A short GPU bench (``frugal.bench.gpu``): causal and windowed attention against SDPA's
   FlashAttention backend and FlexAttention, the int8 GEMM against bf16 cuBLAS and
   ``torch._int_mm``, paged decode against dense SDPA and the copy bandwidth.
3. A summary as JSON and Markdown in ``--out`` (default ``gpu-check-results``): device,
   versions, test counts and failures, bench tables and targets.

On a machine without a GPU it says so and exits 0. Exit status 1 when a test fails (a missed
bench target is reported, not fatal, unless ``--strict``). Budget: under 8 minutes on one H100.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parser():
    parser = argparse.ArgumentParser(prog="frugal gpu-check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-check-results", metavar="DIR",
                        help="where the summary, JUnit and bench records go (default: %(default)s)")
    parser.add_argument("--tests", default=os.path.join(_ROOT, "tests"), metavar="PATH",
                        help="the test suite to run (default: %(default)s)")
    parser.add_argument("--skip-tests", action="store_true", help="bench only")
    parser.add_argument("--skip-bench", action="store_true", help="tests only")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a missed bench target")
    parser.add_argument("--timeout", type=int, default=360, metavar="S",
                        help="limit for the test suite (default: %(default)s s)")
    return parser


def _junit_counts(path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}"
              for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return counts, failed


def run_tests(tests, out, timeout):
    """The suite on this GPU; returns a dict of counts, failures and wall time."""
    junit = os.path.join(out, "junit.xml")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               tests, f"--junitxml={junit}"], env=env, timeout=timeout)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    result = {"exit": code, "wall_s": round(time.perf_counter() - start, 1)}
    if os.path.exists(junit):
        counts, failed = _junit_counts(junit)
        result.update(counts, failed=failed)
    return result


def run_bench(out):
    """The GPU-only sweeps, quick; returns the BenchRun and the records written."""
    from frugal import bench

    result = bench.run(bench.sweeps([s.name for s in bench.sweeps() if s.devices == ("cuda",)]),
                       "cuda", quick=True)
    paths = result.save(os.path.join(out, "bench"))
    return result, paths


def _markdown(summary, bench_md):
    t = summary.get("tests", {})
    lines = [f"# frugal gpu-check: {summary['device']}", "",
             f"{summary['date']}; torch {summary['torch']}, triton {summary['triton']}, "
             f"frugal {summary['frugal']}", ""]
    if t:
        lines += ["## Tests", "",
                  f"{t.get('tests', '?')} run, {t.get('failures', 0)} failed, "
                  f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped in "
                  f"{t['wall_s']} s (exit {t['exit']})", ""]
        lines += [f"- FAILED {name}" for name in t.get("failed", [])]
        lines.append("")
    if bench_md:
        lines += ["## Bench", "", bench_md]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("frugal gpu-check: no CUDA device on this machine (torch.cuda.is_available() is "
              "False): nothing to verify. Run it where a GPU is.")
        return 0
    import triton

    import frugal

    os.makedirs(args.out, exist_ok=True)
    summary = {
        "device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "frugal": frugal.__version__,
    }
    start = time.perf_counter()
    failed = False
    if not args.skip_tests:
        summary["tests"] = run_tests(args.tests, args.out, args.timeout)
        failed = summary["tests"]["exit"] != 0
    bench_md = ""
    if not args.skip_bench:
        result, paths = run_bench(args.out)
        bench_md = result.markdown()
        summary["bench"] = {"records": paths, "passed": result.passed}
        failed = failed or (args.strict and not result.passed)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = _markdown(summary, bench_md)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"frugal gpu-check: {summary['wall_s']} s; wrote {args.out}/summary.json and "
          f"summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
