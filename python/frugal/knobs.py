"""The tunable knobs of the C++ CPU kernels (``csrc/cpu/knobs.h``): work-split and blocking
constants that change their speed, never their results -- the int8 GEMM's K blocks and task
sizes, the paged decode's split-KV partition, the paged prefill's rows per work item.

A call sets them for the kernels it runs on the calling thread::

    with frugal.cpu_knobs(paged_partition_tokens=256):
        out = frugal.paged_attention(q, k_cache, v_cache, tables, lens)

``frugal tune`` searches them (``kernels/configs/space.json``, tables ``cpu_*``) like the
Triton launch configs, verifying each candidate's answer, and the winners per shape bucket go
to the tuned file; a ``cpu`` backend call (``auto`` included) then runs with its bucket's
values unless it is inside a ``cpu_knobs`` block, which wins. Under ``torch.compile`` the
knobs in force when the graph runs apply (the tuned values are not looked up).
"""

import contextlib
import dataclasses
import functools
import threading

import torch

from . import _ext, tuning


@dataclasses.dataclass(frozen=True)
class Knob:
    """One knob: its name, default, valid range [lo, hi] and what it does."""

    name: str
    default: int
    lo: int
    hi: int
    doc: str
    index: int


@functools.cache
def knobs():
    """{name: :class:`Knob`} of the compiled kernels (empty without frugal._C). Read once;
    do not modify."""
    C = _ext.ext()
    if C is None or not hasattr(C, "cpu_knobs"):
        return {}
    return {name: Knob(name, d, lo, hi, doc, i)
            for i, (name, d, lo, hi, doc) in enumerate(C.cpu_knobs())}


_KNOBS = knobs()
_LOCAL = threading.local()  # .stack: the values set by the cpu_knobs blocks open on this thread


def _check(values):
    if not _KNOBS:
        raise RuntimeError(f"cpu_knobs: the C++ CPU kernels are not built ({_ext.ext_error()})")
    for name, value in values.items():
        knob = _KNOBS.get(name)
        if knob is None:
            raise ValueError(f"cpu_knobs: {name!r} is not a knob; expected one of "
                             f"{', '.join(sorted(_KNOBS))}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"cpu_knobs: {name} must be an int or None (its default); got "
                            f"{type(value).__name__} {value!r}")
        if not knob.lo <= value <= knob.hi:
            raise ValueError(f"cpu_knobs: {name} must be in [{knob.lo}, {knob.hi}]; got {value}")


@contextlib.contextmanager
def cpu_knobs(**values):
    """Within the block, the C++ CPU kernels called on this thread use these knob values
    (None: the default); the previous values come back on exit, also on error. Names and
    ranges: :func:`knobs` (``frugal info`` lists them). Raises ValueError for an unknown name
    or a value out of range, TypeError for a value that is not an int."""
    _check(values)
    C = _ext.ext()
    previous = []
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    try:
        for name, value in values.items():
            knob = _KNOBS[name]
            previous.append((knob.index, C.set_cpu_knob(knob.index, -1 if value is None
                                                        else value)))
        stack.append(values)
        yield
    finally:
        if stack and stack[-1] is values:
            stack.pop()
        for index, value in reversed(previous):
            C.set_cpu_knob(index, value)


def current():
    """{name: value} in force on this thread."""
    return dict(zip(_KNOBS, _ext.ext().cpu_knob_values())) if _KNOBS else {}


def _inside_block():
    return bool(getattr(_LOCAL, "stack", None))


_NONE = ({}, None)
_CPU = torch.device("cpu")
_CPU_KEY = (_CPU.type, _CPU.index)


def tuned_values(table, size):
    """The knob values the CPU's tuned file gives ``table`` at ``size`` ({} without one, when
    tuned choices are off, or inside a :func:`cpu_knobs` block), and the entry's name. (On
    every cpu call: a few dict reads when nothing is tuned.)"""
    if not tuning._ENABLED[0]:
        return _NONE
    data = tuning._LOADED.get(_CPU_KEY, _CPU)  # _CPU: not read yet
    if data is _CPU:
        data = tuning.load(_CPU)
    if not data or _inside_block():
        return _NONE
    buckets = data.get("tables", {}).get(table)
    if not buckets:
        return _NONE
    for i, bucket in enumerate(buckets):
        bound = next((v for k, v in bucket.items() if k.startswith("max_")), None)
        if bound is None or size <= bound:
            return ({k: v for k, v in bucket.items() if not k.startswith("max_")},
                    f"{data['path']}: tables.{table}[{i}]")
    return _NONE


def with_tuned(run, table, size_of):
    """``run`` (a cpu implementation's) taking ``config=`` (knob values: the tuner's
    candidates) and otherwise applying the tuned file's values for ``table`` at
    ``size_of(args)``."""
    def tuned_run(*args, config=None, **kwargs):
        if config is None:
            if torch.compiler.is_compiling():
                return run(*args, **kwargs)
            config, _ = tuned_values(table, size_of(args))
            if not config:
                return run(*args, **kwargs)
        with cpu_knobs(**config):
            return run(*args, **kwargs)

    return tuned_run
