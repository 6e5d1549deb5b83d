"""What the backends need of the installation, and how choices are reported. Every op takes
``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``; which implementations an op has and
how ``auto`` picks among them is declared in :mod:`frugal.registry`.
``frugal.explain(op, ...)`` returns the Choice an op would make for given arguments, and
``frugal.set_debug(True)`` logs each choice on the ``frugal`` logger.
"""

import dataclasses
import importlib.util
import logging
import os

import torch

from . import _ext

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# True while frugal.jit_capture records launches: Triton kernels "run" on CPU tensors then
# (the launch is recorded, never executed). A plain flag: torch.compile traces reads of it.
triton_on_cpu = False

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
        if dev == "cpu" and (triton_interpreting() or triton_on_cpu):
            return None
        return (f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got device {device}")
    raise AssertionError(backend)


def describe(backend):
    """What runs for ``backend`` here, for explain and the debug log."""
    if backend == "cpu":
        mod = _ext.ext()
        return f"C++ kernel, {mod.cpu_isa()}" if mod is not None else "C++ kernel"
    if backend == "triton" and triton_interpreting():
        return "Triton interpreter"
    return {"cuda": "CUDA C++ kernel", "triton": "Triton kernel", "torch": "PyTorch ops"}[backend]


def debugging():
    return _debug


def log(choice):
    """Logs a Choice on the ``frugal`` logger when set_debug(True)."""
    if _debug:
        logger.info("%s", choice)


def explain(op, *args, **kwargs):
    """The Choice ``op`` (a public frugal function) would make for these arguments, without
    running it: ``frugal.explain(frugal.quantize_per_token, x)``."""
    selector = getattr(op, "_frugal_select", None)
    if selector is None:
        raise TypeError(f"explain: op must be a public frugal op; got {op!r}")
    return selector(*args, explain=True, **kwargs)
