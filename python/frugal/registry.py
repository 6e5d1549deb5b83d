"""One registry of op implementations, read by dispatch (``backend="auto"`` and explicit
backends), :func:`frugal.explain`, ``frugal check``, the bench sweeps and ``frugal tune``.

Each op is an :class:`Op`; each backend of it one :class:`Impl`, declared next to its kernel::

    PAGED_ATTENTION = Op("paged_attention")

    @PAGED_ATTENTION.implement("cuda", devices=("cuda",), requires=cpp_kernel(
        "paged_attention", "CUDA"), why_not=_cuda_why_not)
    def _(q, k_cache, ...):                       # the op's checked arguments
        return torch.ops.frugal.paged_attention(q, k_cache, ...)

An implementation says where it runs (device types), what it needs of the installation
(``requires() -> reason or None``), why it cannot take a given call (``why_not(*args) -> reason
or None``) and, for the tuner, the launch configs or knobs it can be run with
(``space(*args) -> list of dicts``; ``run(*args, config=...)`` takes one). ``auto`` takes the
first implementation that can run, in the op's order for the device type (fastest first by the
evidence available), unless tuning data for this device names the fastest verified one
(``frugal.tuning``). An explicit backend that cannot run raises BackendError with the reason.
Adding a backend to an op is one ``implement`` declaration plus its kernel.
"""

import dataclasses
from typing import Callable, Optional

from . import dispatch, tuning
from .errors import BackendError

DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
OPS = {}
# (op, backend): what the implementation lacks in this installation (None: nothing). Asked once,
# at registration, so that selection reads a dict (which torch.compile traces) and never asks
# the dispatcher at run time.
_MISSING = {}


def refresh():
    """Ask every implementation's ``requires`` again (after building or loading kernels)."""
    for op_ in OPS.values():
        for impl in op_.impls.values():
            _MISSING[op_.name, impl.backend] = impl.requires() if impl.requires else None


@dataclasses.dataclass(frozen=True)
class Impl:
    """One backend of an op. ``run(*args, **kwargs)`` computes the op on checked arguments."""

    op: str
    backend: str
    run: Callable
    devices: Optional[tuple]
    requires: Optional[Callable] = None
    why_not: Optional[Callable] = None
    space: Optional[Callable] = None
    describe: Optional[str] = None
    knob_table: Optional[str] = None  # C++ CPU kernels: the tuned table of their knobs

    def unavailable(self, device, *args, **kwargs):
        """Why this implementation cannot run these arguments on ``device`` (None: it can)."""
        why = dispatch.unavailable(self.backend, device)
        if why is None and self.devices is not None and device.type not in self.devices:
            where = " or ".join(self.devices)
            why = f"backend={self.backend!r} runs on {where} tensors; got device {device}"
        if why is None:
            why = _MISSING.get((self.op, self.backend))
        if why is None and self.why_not is not None:
            reason = self.why_not(*args, **kwargs)
            why = None if reason is None else f"backend={self.backend!r}: {reason}"
        return why


class Op:
    """An op's implementations and how one is chosen. See the module docstring."""

    def __init__(self, name, order=None):
        if name in OPS:
            raise ValueError(f"registry: an op named {name!r} is already registered")
        self.name = name
        self.order = dict(order or DEFAULT_ORDER)
        self.impls = {}
        self._orders = {}  # _order's answers by device type, with the order entry they used
        self.tune = None  # a frugal.tuning.TuneSpec: how `frugal tune` exercises the op
        OPS[name] = self

    def implement(self, backend, *, devices=None, requires=None, why_not=None, space=None,
                  describe=None):
        """Decorator: the decorated function is ``backend``'s ``run``. ``devices``: the device
        types it runs on (None: any, as PyTorch ops do; Triton's default is CUDA, and CPU
        tensors under the interpreter or a launch capture)."""
        if devices is None and backend == "triton":
            devices = ("cuda", "cpu")

        def register(run):
            self.register(Impl(self.name, backend, run,
                               None if devices is None else tuple(devices), requires, why_not,
                               space, describe))
            return run

        return register

    def register(self, impl):
        """Add ``impl``; what it requires of the installation is asked now (see
        :func:`refresh`)."""
        if impl.backend not in dispatch.BACKENDS[1:]:
            raise ValueError(f"registry: {self.name}: backend must be one of "
                             f"{dispatch.BACKENDS[1:]}; got {impl.backend!r}")
        if impl.backend in self.impls:
            raise ValueError(f"registry: {self.name} already has backend {impl.backend!r}")
        self.impls[impl.backend] = impl
        self._orders.clear()
        _MISSING[self.name, impl.backend] = impl.requires() if impl.requires else None
        return impl

    def unregister(self, backend):
        """Remove a backend (tests that register a dummy one)."""
        del self.impls[backend]
        self._orders.clear()
        del _MISSING[self.name, backend]

    @property
    def backends(self):
        return tuple(self.impls)

    def _order(self, device):
        dev = device.type
        asked = self.order.get(dev, ())
        cached = self._orders.get(dev)
        if cached is not None and cached[0] is asked:  # the same self.order entry
            return cached[1]
        ranked = [b for b in asked if b in self.impls]
        rest = [b for b, impl in self.impls.items() if b not in ranked and b != "torch"
                and (impl.devices is None or dev in impl.devices)]
        tail = ["torch"] if "torch" in self.impls and "torch" not in ranked else []
        order = tuple(ranked + rest + tail)
        self._orders[dev] = (asked, order)
        return order

    def candidates(self, device, *args, **kwargs):
        """The implementations that can run these arguments on ``device``, in ``auto``'s order
        (what ``frugal tune`` times)."""
        return [self.impls[b] for b in self._order(device)
                if self.impls[b].unavailable(device, *args, **kwargs) is None]

    def select(self, device, backend="auto", *args, explain=False, **kwargs):
        """The Impl to run (a :class:`frugal.Choice` with the reason when ``explain``)."""
        if backend not in dispatch.BACKENDS:
            raise BackendError(f"{self.name}: backend must be one of "
                               f"{', '.join(map(repr, dispatch.BACKENDS))}; got {backend!r}")
        skipped, tuned = [], None
        if backend != "auto":
            if backend not in self.impls:
                raise BackendError(f"{self.name}: backend={backend!r} is not implemented for "
                                   f"this op; it has {', '.join(map(repr, self.impls))}")
            why = self.impls[backend].unavailable(device, *args, **kwargs)
            if why is not None:
                raise BackendError(f"{self.name}: {why}")
            impl = self.impls[backend]
        else:
            order = self._order(device)
            tuned = _tuned_choice(self, device, args, kwargs)
            if tuned is not None and tuned.backend in order:
                order = (tuned.backend, *(b for b in order if b != tuned.backend))
            for name in order:
                why = self.impls[name].unavailable(device, *args, **kwargs)
                if why is None:
                    impl = self.impls[name]
                    break
                skipped.append(f"{name}: {why}")
            else:
                raise BackendError(f"{self.name}: no backend can run on device {device}: "
                                   + "; ".join(skipped))
        if explain or dispatch.debugging():
            how = "asked for" if backend != "auto" else f"auto on {device.type}"
            if tuned is not None and tuned.backend == impl.backend:
                how += f", tuned ({tuned.source})"
            note = f"; skipped {'; '.join(skipped)}" if skipped else ""
            if impl.knob_table is not None and self.tune is not None:
                from . import knobs

                values, entry = knobs.tuned_values(impl.knob_table, self.tune.size_of(args))
                if values:
                    note += "; knobs " + ", ".join(f"{k}={v}" for k, v in values.items()) + \
                        f" ({entry})"
            text = impl.describe or dispatch.describe(impl.backend)
            choice = dispatch.Choice(self.name, impl.backend, f"{how}: {text}{note}")
            dispatch.log(choice)
            if explain:
                return choice
        return impl


def _tuned_choice(op, device, args, kwargs):
    """The backend tuning data for this device names for this call, if any (frugal.tuning)."""
    return tuning.preferred(op, device, args, kwargs)


def op(name):
    """The registered Op ``name``."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"registry: no op named {name!r}; registered: "
                       f"{', '.join(OPS)}") from None


def cpp_kernel(schema, dispatch_key):
    """A ``requires`` for an implementation that is a kernel of frugal._C: why
    ``frugal::<schema>`` has no ``dispatch_key`` ("CPU", "CUDA") kernel in this build."""
    def requires():
        import torch

        from . import _ext

        if _ext.ext() is None:
            return _ext.ext_error()
        if not (hasattr(torch.ops.frugal, schema)
                and torch._C._dispatch_has_kernel_for_dispatch_key(f"frugal::{schema}",
                                                                   dispatch_key)):
            return (f"frugal._C has no {dispatch_key} kernel for frugal::{schema} (rebuild the "
                    f"extension: pip install -e .)")
        return None

    return requires
