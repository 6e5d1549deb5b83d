"""Backend selection. Every op takes ``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``.

``auto`` takes the first backend of the op's preference list for the tensors' device type that
can run here (C++ on CPU tensors; CUDA C++, then Triton on CUDA tensors; PyTorch anywhere).
An explicit backend that cannot run raises BackendError saying why. ``frugal.explain(op, ...)``
returns the Choice an op would make for given arguments, and ``frugal.set_debug(True)`` logs
each choice on the ``frugal`` logger.
"""

import contextvars
import dataclasses
import importlib.util
import logging
import os

import torch

from . import _ext
from .errors import BackendError

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# Fastest first, per device type. Ops may pass their own.
DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# True while frugal.jit_capture records launches: Triton kernels "run" on CPU tensors then
# (the launch is recorded, never executed).
TRITON_ON_CPU = contextvars.ContextVar("frugal_triton_on_cpu", default=False)

logger = logging.getLogger("frugal")
_debug = False


def set_debug(on=True):
    """Log the backend each op call picks (logger ``frugal``, level INFO)."""
    global _debug
    _debug = bool(on)
    if on and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[frugal] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@dataclasses.dataclass(frozen=True)
class Choice:
    op: str
    backend: str
    reason: str

    def __str__(self):
        return f"{self.op}: backend={self.backend!r} ({self.reason})"


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_custom_op(name, mutates_args=()):
    """Registers a Python function that launches Triton kernels as a torch custom op.

    On a GPU this is ``torch.library.triton_op``, so torch.compile sees into the kernels. Under
    the Triton interpreter the op is opaque (``custom_op``): tracing cannot run interpreted
    kernels, and there is no GPU code for the compiler to see anyway. ``mutates_args`` names
    the arguments the op writes in place.
    """
    if triton_interpreting():
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return torch.library.triton_op(name, mutates_args=mutates_args)


def unavailable(backend, device):
    """Why ``backend`` cannot run on ``device`` here, or None when it can."""
    dev = device.type
    if backend == "torch":
        return None
    if backend == "cpu":
        if dev != "cpu":
            return f"backend='cpu' needs CPU tensors; got device {device}"
        return _ext.ext_error()
    if backend == "cuda":
        if dev != "cuda":
            return f"backend='cuda' needs CUDA tensors; got device {device}"
        if _ext.ext() is None:
            return _ext.ext_error()
        if not _ext.with_cuda():
            return ("backend='cuda': frugal._C was built without CUDA kernels "
                    "(rebuild with nvcc and a CUDA build of torch)")
        return None
    if backend == "triton":
        if not _HAS_TRITON:
            return "backend='triton' needs triton, which is not installed"
        if dev == "cuda":
            return None
        if dev == "cpu" and (triton_interpreting() or TRITON_ON_CPU.get()):
            return None
        return (f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got device {device}")
    raise AssertionError(backend)


def _describe(backend):
    if backend == "cpu":
        mod = _ext.ext()
        return f"C++ kernel, {mod.cpu_isa()}" if mod is not None else "C++ kernel"
    if backend == "triton" and triton_interpreting():
        return "Triton interpreter"
    return {"cuda": "CUDA C++ kernel", "triton": "Triton kernel", "torch": "PyTorch ops"}[backend]


def select(op, device, backend="auto", order=None, supported=None, explain=False):
    """The backend name ``op`` runs with on ``device`` (a Choice with the reason when
    ``explain``). ``supported`` limits the backends the op has. Raises BackendError."""
    if backend not in BACKENDS:
        raise BackendError(f"{op}: backend must be one of {', '.join(map(repr, BACKENDS))}; "
                           f"got {backend!r}")
    supported = supported or BACKENDS[1:]
    skipped = []
    if backend != "auto":
        if backend not in supported:
            raise BackendError(f"{op}: backend={backend!r} is not implemented for this op; it has "
                               f"{', '.join(map(repr, supported))}")
        why = unavailable(backend, device)
        if why is not None:
            raise BackendError(f"{op}: {why}")
        name = backend
    else:
        for name in (order or DEFAULT_ORDER).get(device.type, ("torch",)):
            if name not in supported:
                continue
            why = unavailable(name, device)
            if why is None:
                break
            skipped.append(f"{name}: {why}")
        else:
            raise BackendError(f"{op}: no backend can run on device {device}: "
                               + "; ".join(skipped))
    if explain or _debug:
        how = "asked for" if backend != "auto" else f"auto on {device.type}"
        note = f"; skipped {'; '.join(skipped)}" if skipped else ""
        choice = Choice(op, name, f"{how}: {_describe(name)}{note}")
        if _debug:
            logger.info("%s", choice)
        if explain:
            return choice
    return name


def explain(op, *args, **kwargs):
    """The Choice ``op`` (a public frugal function) would make for these arguments, without
    running it: ``frugal.explain(frugal.quantize_per_token, x)``."""
    selector = getattr(op, "_frugal_select", None)
    if selector is None:
        raise TypeError(f"explain: op must be a public frugal op; got {op!r}")
    return selector(*args, explain=True, **kwargs)
