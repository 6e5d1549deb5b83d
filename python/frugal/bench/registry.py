"""What a sweep declares, and the registry ``frugal bench`` looks sweeps up in."""

import dataclasses
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Target:
    """A speedup that ``candidate`` must reach at ``x`` on ``device`` (a device type: "cpu"
    or "cuda") over ``versus`` (another candidate; the sweep's baseline when None), timed at
    ``versus_x`` (``x`` when None: a bound on how cost grows, e.g. a windowed op at 32k
    within 1.2x of itself at 4k is ``versus=<itself>, versus_x=4096, min_speedup=1 / 1.2``).

    ``min_copy_fraction`` (memory-bound sweeps) is a floor on ``candidate``'s GB/s at ``x`` as a
    fraction of the device's copy bandwidth (0.5: half). A target sets ``min_speedup``,
    ``min_copy_fraction`` or both; every floor it sets must hold."""

    x: int
    candidate: str
    min_speedup: Optional[float] = None
    device: str = "cpu"
    versus: Optional[str] = None
    versus_x: Optional[int] = None
    min_copy_fraction: Optional[float] = None

    def __post_init__(self):
        if self.min_speedup is None and self.min_copy_fraction is None:
            raise ValueError(f"Target({self.candidate!r}, x={self.x}): set min_speedup, "
                             f"min_copy_fraction or both; got neither")


@dataclasses.dataclass(frozen=True)
class SlopeTarget:
    """A bound on ``candidate``'s scaling exponent (the fitted slope of log time against log x)
    on ``device``: at most ``max_slope`` (cost that grows slowly, e.g. windowed attention
    <= 1.15) and/or at least ``min_slope`` (a baseline that is as costly as claimed). With
    ``min_x`` the slope is fitted over the x >= min_x only (e.g. a window of w tokens, whose
    cost is quadratic until N exceeds w)."""

    candidate: str
    max_slope: Optional[float] = None
    min_slope: Optional[float] = None
    device: str = "cpu"
    min_x: Optional[int] = None

    def __post_init__(self):
        if self.max_slope is None and self.min_slope is None:
            raise ValueError(f"SlopeTarget({self.candidate!r}): set max_slope, min_slope or "
                             f"both; got neither")


@dataclasses.dataclass(frozen=True)
class Check:
    """A claim about what a sweep measured besides time (bytes held against bytes needed,
    tokens equal to the baseline's, ...), decided by the sweep's ``checks``: ``name`` says the
    claim, ``measured`` the figures that decided it."""

    name: str
    passed: bool
    measured: str


@dataclasses.dataclass
class Sweep:
    """One op's candidates timed over a range of token counts.

    Parameters
    ----------
    name : str
        Unique name, used by ``frugal bench --sweep NAME``.
    op : str
        Op family ("quantize", "int8_matmul", "attention", ...).
    x_name : str
        Name of the token-count axis ("M", "tokens", "context").
    xs, quick : sequence of int
        Token counts of a full run and of a ``--quick`` run.
    setup : callable ``(x, device) -> dict[str, callable]``
        Builds the inputs for ``x`` and returns the candidates, each a no-argument callable.
    baseline : str
        The candidate every other one is compared with (dense PyTorch).
    compare : sequence of str
        Further candidates to report each row's speedup over ("vs NAME" columns), for sweeps
        with several baselines (fp32 and bf16 matmul, torch._int_mm).
    nbytes, flops : callable ``x -> number`` or ``(x, device) -> number``, optional
        Bytes moved and floating-point operations per call, for GB/s and GFLOP/s; the
        two-argument form for counts that depend on the device (its dtype).
    memory_bound : bool
        Report GB/s as a fraction of the device's measured copy bandwidth (needs ``nbytes``).
    params : mapping
        The fixed sizes and dtypes of the sweep ({"K": 4096}), shown with its results.
    notes : callable ``device -> dict``, optional
        Facts worth recording with the results (which backend ``auto`` picked, ...).
    targets : sequence of Target
        Speedups the run checks and prints a PASS/FAIL line for.
    slope_targets : sequence of SlopeTarget
        Bounds on scaling exponents the run checks likewise.
    summary : callable ``rows -> dict`` or ``(rows, device) -> dict``, optional
        Facts derived from the measured rows (a break-even point, ...), added to the notes.
    checks : callable ``rows -> [Check]`` or ``(rows, device) -> [Check]``, optional
        Claims about what the candidates measured besides time; the run prints a PASS/FAIL
        line for each and counts them with the targets.
    description : str
        One line for ``frugal bench --list``.
    devices : tuple of str
        Device types the sweep runs on (a plain ``frugal bench`` skips it elsewhere).
    timer : callable ``fn -> milliseconds``, optional
        Times this sweep's candidates instead of the device's default timer: an end-to-end
        sweep whose one call runs for seconds times a single call. A timer given to
        :func:`~frugal.bench.run` still takes precedence.
    """

    name: str
    op: str
    x_name: str
    xs: Sequence[int]
    quick: Sequence[int]
    setup: Callable
    baseline: str
    compare: Tuple[str, ...] = ()
    nbytes: Optional[Callable[[int], float]] = None
    flops: Optional[Callable[[int], float]] = None
    memory_bound: bool = False
    params: Mapping[str, object] = dataclasses.field(default_factory=dict)
    notes: Optional[Callable] = None
    targets: Tuple[Target, ...] = ()
    slope_targets: Tuple[SlopeTarget, ...] = ()
    summary: Optional[Callable] = None
    checks: Optional[Callable] = None
    description: str = ""
    devices: Tuple[str, ...] = ("cpu", "cuda")
    timer: Optional[Callable] = None

    def __post_init__(self):
        for field in ("xs", "quick"):
            values = tuple(getattr(self, field))
            if not values or not all(isinstance(v, int) and v > 0 for v in values):
                raise ValueError(f"Sweep {self.name!r}: {field} must be a non-empty sequence of "
                                 f"positive ints; got {getattr(self, field)!r}")
            setattr(self, field, values)
        if self.memory_bound and self.nbytes is None:
            raise ValueError(f"Sweep {self.name!r}: memory_bound=True needs nbytes; got None")
        self.targets = tuple(self.targets)
        self.slope_targets = tuple(self.slope_targets)
        for t in self.targets:
            if t.min_copy_fraction is not None and not self.memory_bound:
                raise ValueError(f"Sweep {self.name!r}: a target with min_copy_fraction needs "
                                 f"memory_bound=True; got memory_bound=False")


_SWEEPS: Dict[str, Sweep] = {}


def register(sweep):
    """Add ``sweep`` (a Sweep) to the registry and return it."""
    if sweep.name in _SWEEPS:
        raise ValueError(f"register: a sweep named {sweep.name!r} is already registered")
    _SWEEPS[sweep.name] = sweep
    return sweep


def sweep(name, **fields):
    """Decorator form of :func:`register`: the decorated function is the sweep's ``setup``,
    its docstring's first line the description unless ``description`` is given."""

    def decorate(setup):
        doc = (setup.__doc__ or "").strip().splitlines()
        fields.setdefault("description", doc[0] if doc else "")
        register(Sweep(name=name, setup=setup, **fields))
        return setup

    return decorate


def sweeps(names=None, device=None):
    """The registered sweeps in registration order, or the ones named in ``names``; without
    names and with a ``device`` type, only the sweeps that run on it.

    Raises
    ------
    ValueError
        A name in ``names`` is not registered.
    """
    if not names:
        return [s for s in _SWEEPS.values() if device is None or device in s.devices]
    unknown = [n for n in names if n not in _SWEEPS]
    if unknown:
        raise ValueError(f"unknown sweep {unknown[0]!r}; registered sweeps: "
                         f"{', '.join(_SWEEPS) or '(none)'}")
    return [_SWEEPS[n] for n in dict.fromkeys(names)]
