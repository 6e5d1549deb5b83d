"""The ``frugal`` command: ``frugal info``, ``frugal bench``, ``frugal check``, ``frugal tune``
and ``frugal gpu-check``."""

import argparse
import os
import sys

import torch

import frugal
from frugal import _ext


def main(argv=None):
    """Run the ``frugal`` command with ``argv`` (default ``sys.argv[1:]``); return the exit
    status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # argparse would try to parse check's own options; hand them over untouched.
    if argv[:1] == ["check"]:
        return _check(argv[1:])
    if argv[:1] == ["gpu-check"]:
        from frugal import gpu_check

        return gpu_check.main(argv[1:])
    if argv[:1] == ["tune"]:
        from frugal import tuning

        return tuning.main(argv[1:])
    args = _parser().parse_args(argv)
    return args.func(args)


def _parser():
    parser = argparse.ArgumentParser(prog="frugal", description=frugal.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, the compiled extension, backend choice")
    info.set_defaults(func=_info)

    bench = commands.add_parser(
        "bench", help="time ops against dense PyTorch over token counts",
        description="Time each op's candidates against its dense PyTorch baseline over a range "
                    "of token counts; print a table and write JSON, Markdown and PNG plots. "
                    "A missed target prints FAIL and is recorded; --strict makes it exit 1.")
    bench.add_argument("--sweep", action="append", metavar="NAME",
                       help="run this sweep (repeatable; default: all; see --list)")
    bench.add_argument("--quick", action="store_true", help="fewer token counts per sweep")
    bench.add_argument("--device", choices=("cpu", "cuda"),
                       help="default: cuda when available, else cpu")
    bench.add_argument("--out", default="bench-results", metavar="DIR",
                       help="where results are written (default: %(default)s)")
    bench.add_argument("--list", action="store_true", help="list the sweeps and exit")
    bench.add_argument("--compare-tuned", action="store_true",
                       help="time every candidate with and without this device's tuned file "
                            "(frugal tune), in the same rounds, and list the pairs")
    bench.add_argument("--strict", action="store_true",
                       help="exit 1 when a target is missed (default: report it, exit 0)")
    bench.add_argument("--rounds", type=int, default=None, metavar="R",
                       help="time each x's candidates R times, interleaved, keeping each one's "
                            "best (default 2 on CPU, 1 on CUDA)")
    bench.add_argument("--fastest", action="store_true",
                       help="on a CPU, each candidate's fastest run instead of its median (for "
                            "a machine shared with other work: another process only ever adds "
                            "time)")
    bench.add_argument("--cpu-isa", choices=tuple(CPU_FAMILIES), metavar="LEVEL",
                       help="time a CPU family's instruction set on this CPU: cap frugal's C++ "
                            "kernels (FRUGAL_CPU_ISA) and torch's own CPU kernels (ATen, "
                            "oneDNN, MKL, FBGEMM) at LEVEL, one of "
                            f"{', '.join(CPU_FAMILIES)}; the command reruns itself with them "
                            "set (the caches and bandwidth stay this machine's)")
    bench.set_defaults(func=_bench)

    commands.add_parser("check", help="run frugal.check (arguments are passed on to it)",
                        add_help=False)
    commands.add_parser("tune", help="measure and verify every tunable choice on this device; "
                        "`auto` then uses the winners (arguments are passed on)",
                        add_help=False)
    commands.add_parser("gpu-check", help="verify this GPU: the test suite on CUDA tensors and "
                        "a short bench against FlashAttention, FlexAttention and cuBLAS "
                        "(arguments are passed on to frugal.gpu_check)", add_help=False)
    return parser


def _info(args):
    print(f"frugal {frugal.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton
    except ImportError as e:
        print(f"triton: not importable ({e})")
    else:
        print(f"triton {triton.__version__}")
    mod = _ext.ext()
    if mod is None:
        print(f"frugal._C: not loaded: {_ext.ext_error()}")
    else:
        why_not_amx = mod.cpu_amx()[1]
        print(f"frugal._C: loaded; CPU ISA {mod.cpu_isa()} (widest {mod.detected_cpu_isa()}"
              f"{'; AMX: ' + why_not_amx if why_not_amx else ''}); "
              f"CUDA kernels {'yes' if _ext.with_cuda() else 'no'}")
    cuda = torch.cuda.is_available()
    print(f"CUDA available: {'yes, ' + torch.cuda.get_device_name() if cuda else 'no'}")
    from frugal import tuning

    for device in ("cpu", "cuda") if cuda else ("cpu",):
        probe = torch.zeros(1, 8, device=device)
        print(f"on {device}: {frugal.explain(frugal.quantize_per_token, probe)}")
        data = tuning.load(device)
        path = tuning.file_for(device)
        print(f"  tuned file: {path if data else 'none valid (' + path + '); shipped configs'}")
    from frugal import knobs as cpu_knobs

    knobs = cpu_knobs.knobs()
    if knobs:
        tuned = {}
        data = tuning.load("cpu")
        for table, buckets in ((data or {}).get("tables") or {}).items():
            if table.startswith("cpu_"):
                for b in buckets:
                    for name, value in b.items():
                        if name in knobs and value != knobs[name].default:
                            tuned.setdefault(name, set()).add(value)
        print("C++ CPU kernel knobs (frugal.cpu_knobs; default [range], tuned values):")
        for name, k in knobs.items():
            extra = f"; tuned: {', '.join(map(str, sorted(tuned[name])))}" if name in tuned else ""
            print(f"  {name} = {k.default} [{k.lo}, {k.hi}]{extra}: {k.doc}")
    return 0


# Environment caps that make this process's kernels use one CPU family's instructions: frugal's
# (FRUGAL_CPU_ISA) and those of the libraries behind torch's CPU ops, each read when the library
# loads: ATen's vectorized kernels, oneDNN (bf16 / int8 matmul, torch._int_mm), MKL (fp32
# matmul) and FBGEMM (quantize_dynamic).
CPU_FAMILIES = {
    "avx2": dict(FRUGAL_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                 MKL_ENABLE_INSTRUCTIONS="AVX2", FBGEMM_ENABLE_INSTRUCTIONS="AVX2"),
    "avx512": dict(FRUGAL_CPU_ISA="avx512", ATEN_CPU_CAPABILITY="avx512",
                   ONEDNN_MAX_CPU_ISA="AVX512_CORE", MKL_ENABLE_INSTRUCTIONS="AVX512",
                   FBGEMM_ENABLE_INSTRUCTIONS="AVX512"),
    "avx512_vnni": dict(FRUGAL_CPU_ISA="avx512_vnni", ATEN_CPU_CAPABILITY="avx512",
                        ONEDNN_MAX_CPU_ISA="AVX512_CORE_VNNI", MKL_ENABLE_INSTRUCTIONS="AVX512_E1",
                        FBGEMM_ENABLE_INSTRUCTIONS="AVX512_E1"),
}
_FAMILY_MARK = "FRUGAL_BENCH_CPU_ISA"  # set in the rerun: the caps are in force


def _rerun_capped(level):
    """Re-executes this frugal command with ``level``'s caps in the environment (a fresh
    process: the libraries read them as they load). Does not return (OSError if the exec
    fails)."""
    env = dict(os.environ, **CPU_FAMILIES[level], **{_FAMILY_MARK: level})
    argv = [sys.executable, "-m", "frugal", *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def _bench(args):
    from frugal import bench

    if args.cpu_isa is not None and os.environ.get(_FAMILY_MARK) != args.cpu_isa:
        if args.device == "cuda":
            print("frugal bench: --cpu-isa is for CPU runs; got --device cuda", file=sys.stderr)
            return 2
        return _rerun_capped(args.cpu_isa)

    if args.list:
        for s in bench.sweeps():
            xs = ", ".join(map(str, s.xs))
            print(f"{s.name}  [{s.op}]  {s.x_name} in {xs}  {s.description}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("frugal bench: --device cuda, but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        sweeps = bench.sweeps(args.sweep, device)
    except ValueError as e:
        print(f"frugal bench: --sweep: {e}", file=sys.stderr)
        return 2
    elsewhere = [s.name for s in sweeps if device not in s.devices]
    if elsewhere:
        print(f"frugal bench: --sweep {', '.join(elsewhere)} runs on "
              f"{' or '.join(bench.sweeps(elsewhere)[0].devices)} only; this run is on {device}",
              file=sys.stderr)
        return 2
    result = bench.run(sweeps, device, quick=args.quick, rounds=args.rounds,
                       compare_tuned=args.compare_tuned, fastest=args.fastest)
    print(result.markdown())
    for path in result.save(args.out):
        print(f"wrote {path}", file=sys.stderr)
    if not result.passed:
        failed = "FAIL lines above (and in the JSON record)"
        if args.strict:
            print(f"frugal bench: targets missed: {failed}; --strict: exit 1", file=sys.stderr)
            return 1
        print(f"frugal bench: targets missed: {failed}; the run completed (--strict to gate "
              f"on them)", file=sys.stderr)
    return 0


def _check(argv):
    try:
        from frugal import check
    except ImportError as e:
        print(f"frugal check: frugal.check could not be imported ({e})", file=sys.stderr)
        return 2
    return check.main(argv)
