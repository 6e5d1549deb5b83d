"""``frugal bench``: how each op's cost grows with token count, against a dense PyTorch baseline.

A *sweep* times a few *candidates* (frugal backends and the baseline) over a range of token
counts ``x`` (rows M, sequence length, context length). For each candidate at each x the runner
reports the median time, the speedup over the baseline (baseline time / time), the achieved
GB/s and GFLOP/s from the sweep's byte and FLOP counts and, for memory-bound sweeps, GB/s as a
fraction of the device's measured copy bandwidth. Per candidate it fits the slope of log time
against log x, the scaling exponent: about 1 for work linear in tokens, 2 for quadratic.

Adding a sweep for a new op (in ``frugal/bench/builtin.py``)::

    @sweep(
        "int8_matmul",                  # name, for `frugal bench --sweep int8_matmul`
        op="int8_matmul",               # op family
        x_name="M",                     # what x counts
        xs=(256, 1024, 4096, 16384),    # full run
        quick=(256, 4096),              # `--quick` run
        baseline="torch",               # candidate the others are compared with
        flops=lambda m: 2 * m * N * K,  # per call; nbytes=... as well, or instead
        params={"N": N, "K": K},        # fixed sizes, shown with the results
        targets=(Target(x=4096, candidate="frugal", min_speedup=2.0, device="cuda"),),
    )
    def _int8_matmul(m, device):
        '''One line for `frugal bench --list`.'''
        a, b = ...                      # inputs for this x, built once
        return {"frugal": lambda: frugal.int8_matmul(a, b), "torch": lambda: a @ b}

``memory_bound=True`` (with ``nbytes``) adds the "% copy bw" column; ``notes=fn(device)``
records facts such as the backend ``auto`` picks. Timing uses ``triton.testing.do_bench``
(CUDA events, median) on CUDA and the median of repeated ``time.perf_counter`` runs after
warm-up on CPU; :func:`run` takes any ``timer(fn) -> ms`` instead.

``run(sweeps(...))`` returns a :class:`BenchRun`: ``.markdown()`` renders the tables, scaling
exponents and a PASS/FAIL line per target, ``.save(out)`` writes them with a JSON record and a
log-log plot per sweep.
"""

from . import builtin  # noqa: F401  (registers the built-in sweeps)
from . import cascade  # noqa: F401  (registers the shared-prefix decode sweep)
from . import generate  # noqa: F401  (registers end-to-end generation, transformers models)
from . import gpu  # noqa: F401  (registers the GPU-only sweeps of frugal gpu-check)
from . import paged  # noqa: F401  (registers the paged decode attention sweeps)
from . import sparse  # noqa: F401  (registers the block-sparse attention sweeps)
from .registry import Check, SlopeTarget, Sweep, Target, register, sweep, sweeps
from .runner import (BenchRun, Row, SlopeVerdict, SweepResult, Verdict, environment, fit_slope,
                     run)
from .timing import copy_bandwidth, default_timer, read_bandwidth, time_cpu, time_cuda

__all__ = [
    "BenchRun",
    "Check",
    "Row",
    "SlopeTarget",
    "SlopeVerdict",
    "Sweep",
    "SweepResult",
    "Target",
    "Verdict",
    "copy_bandwidth",
    "read_bandwidth",
    "default_timer",
    "environment",
    "fit_slope",
    "register",
    "run",
    "sweep",
    "sweeps",
    "time_cpu",
    "time_cuda",
]
