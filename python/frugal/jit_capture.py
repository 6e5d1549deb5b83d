"""What the Triton JIT really builds: kernel launches captured from the real launch code.

:func:`capture` runs callables -- public API calls with ``backend="triton"`` on CPU tensors --
with Triton's launch intercepted. Each kernel launch is recorded as a :class:`Launch`: the
kernel, its grid, and every argument reduced to what the JIT specializes on (a tensor: its
dtype and whether its address is a multiple of 16 bytes; an int, float, bool, string or None:
its value; the launch options). Nothing compiles and nothing runs, so a capture costs
microseconds per call.

:func:`compile_launch` rebuilds a launch's arguments (mock tensors with the recorded dtype and
address alignment, the recorded scalars) and hands them to the kernel's own ``JITFunction`` in
warm-up mode under a driver that reports a GPU target and launches nothing. The kernel is thus
compiled exactly as the installed Triton's JIT would compile that call on that GPU -- its
value-1 and divisibility-16 specializations included -- which a hand-written
(signature, constexprs) list cannot promise, and which the interpreter (ints as tensors, no
specialization) never shows. Only ``JITFunction.run(*args, grid, warmup, **kwargs)`` and
``triton.runtime.driver.set_active`` are relied on; both exist from Triton 3.2 to 3.8, so the
same records compile under the oldest Triton frugal supports (``frugal check --floor``).
Capturing also works under the interpreter (``TRITON_INTERPRET=1``: the launch of an
``InterpretedFunction`` is recorded the same way), so tests capture in-process; compiling needs
the real ``JITFunction`` and runs in a process without the interpreter.

Launch limits are checked at capture time: a grid of more than 2**31 - 1 programs on axis x or
more than 65535 on y or z fails the call, as the CUDA launch would.
"""

import contextlib
import dataclasses
import importlib
import inspect
import json
import threading

import torch

MAX_GRID = (2**31 - 1, 65535, 65535)
_ALIGN = 16  # bytes: the JIT's pointer divisibility specialization
_local = threading.local()

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                               torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                               torch.bool)}


class GridError(ValueError):
    """A kernel launch asks for more programs on a grid axis than CUDA allows."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the JIT sees it.

    ``module`` / ``name`` locate the ``@triton.jit`` function; ``args`` and ``kwargs`` hold the
    encoded arguments (see :func:`encode`); ``grid`` the launch grid; ``call`` a label of the
    public call that made the launch.
    """

    module: str
    name: str
    args: tuple
    kwargs: tuple  # sorted (name, encoded value) pairs
    grid: tuple
    call: str = ""

    def to_json(self):
        return {"module": self.module, "name": self.name, "args": list(self.args),
                "kwargs": [list(kv) for kv in self.kwargs], "grid": list(self.grid),
                "call": self.call}

    @classmethod
    def from_json(cls, data):
        def freeze(v):
            return tuple(freeze(x) for x in v) if isinstance(v, list) else v

        return cls(data["module"], data["name"], freeze(data["args"]),
                   tuple((k, freeze(v)) for k, v in data["kwargs"]), tuple(data["grid"]),
                   data.get("call", ""))

    @property
    def kernel(self):
        return f"{self.module}.{self.name}"

    def fn(self):
        """The ``@triton.jit`` function (imported afresh in a compile worker)."""
        return getattr(importlib.import_module(self.module), self.name)

    def spec_key(self):
        """What the JIT's compiled-kernel cache would key this launch on, in Triton-neutral
        terms: equal keys compile to the same binary."""
        params = _params(self.fn())
        values = dict(zip(params, self.args))
        values.update((k, v) for k, v in self.kwargs if k in params)
        parts = tuple((name, _specialization(values.get(name), info))
                      for name, info in params.items())
        options = tuple((k, decode(v)) for k, v in self.kwargs if k not in params)
        return (self.kernel, parts, options)

    def constexpr_key(self):
        """The kernel's constexpr variant: constexpr parameter values, pointer dtypes and
        presence, and the ints the JIT turns into constants (value 1). Divisibility and launch
        options aside."""
        _, parts, _ = self.spec_key()
        return (self.kernel, tuple((n, s[:2]) for n, s in parts
                                   if s[0] in ("c", "t", "one", "none")))


@dataclasses.dataclass(frozen=True)
class _Param:
    constexpr: bool
    no_value: bool  # do_not_specialize: no value-1 / divisibility specialization
    no_align: bool  # do_not_specialize_on_alignment


def _params(fn):
    """{name: _Param} of a ``@triton.jit`` function, compiled (JITFunction) or interpreted."""
    if hasattr(fn, "params"):
        return {p.name: _Param(p.is_constexpr, bool(p.do_not_specialize),
                               bool(getattr(p, "do_not_specialize_on_alignment", False)))
                for p in fn.params}
    # An InterpretedFunction keeps only the Python function and the decorator's arguments.
    sig = inspect.signature(fn.fn)
    names = list(sig.parameters)

    def listed(key):
        return {names[i] if isinstance(i, int) else i for i in fn.kwargs.get(key) or ()}

    no_value, no_align = listed("do_not_specialize"), listed("do_not_specialize_on_alignment")
    return {name: _Param("constexpr" in str(p.annotation), name in no_value, name in no_align)
            for name, p in sig.parameters.items()}


def _specialization(value, param):
    """(kind, ...) of one argument as the JIT specializes it."""
    if param.constexpr:
        return ("c", value[1] if isinstance(value, (list, tuple)) else value)
    if value is None:
        return ("none",)
    kind = value[0]
    if kind == "t":
        return ("t", value[1], value[2] and not param.no_align)
    if kind == "i":
        v = value[1]
        width = "i32" if -2**31 <= v < 2**31 else ("u64" if v >= 2**63 else "i64")
        if param.no_value:
            return ("i", width)
        if v == 1:
            return ("one",)
        return ("i", width, v % 16 == 0)
    if kind == "f":
        return ("f",)
    return tuple(value)


def encode(x):
    """An argument in JSON-able form: ("t", dtype, aligned) for a tensor, ("i", v), ("f", v),
    ("b", v), ("s", v), or None."""
    if isinstance(x, torch.Tensor):
        return ("t", str(x.dtype), x.data_ptr() % _ALIGN == 0)
    if isinstance(x, bool):
        return ("b", x)
    if isinstance(x, int):
        return ("i", int(x))
    if isinstance(x, float):
        return ("f", x)
    if isinstance(x, str):
        return ("s", x)
    if x is None:
        return None
    if hasattr(x, "value") and type(x).__name__ == "constexpr":
        return encode(x.value)
    raise TypeError(f"jit_capture: cannot record a launch argument of type {type(x).__name__}")


class MockPointer:
    """A tensor argument rebuilt for compilation: dtype and an address with the recorded
    16-byte alignment (what the JIT reads of a tensor)."""

    def __init__(self, dtype, aligned):
        self.dtype = _DTYPES[dtype]
        self._ptr = 4096 if aligned else 4096 + 2

    def data_ptr(self):
        return self._ptr

    @staticmethod
    def wrap_dtype(arg):  # Triton's warmup() maps dtypes through this; ours are pointers
        return arg


def decode(value):
    """Inverse of :func:`encode`, tensors as :class:`MockPointer`."""
    if value is None:
        return None
    kind = value[0]
    if kind == "t":
        return MockPointer(value[1], value[2])
    return value[1]


def _record(fn, args, grid, kwargs):
    if callable(grid):
        raise TypeError(f"jit_capture: {fn.__name__} was launched with a callable grid; frugal's "
                        f"launchers pass tuples")
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if not 1 <= size <= limit and size != 0:
            raise GridError(f"{fn.__name__}: grid axis {'xyz'[axis]} has {size} programs; CUDA "
                            f"allows at most {limit}")
    target = fn.fn
    launch = Launch(target.__module__, target.__name__, tuple(encode(a) for a in args),
                    tuple(sorted((k, encode(v)) for k, v in kwargs.items())), grid,
                    getattr(_local, "label", ""))
    _local.launches.append(launch)


@contextlib.contextmanager
def capture(device_key=None, num_sms=None):
    """Inside, every Triton kernel launch is recorded instead of run (the context's value is
    the list of :class:`Launch`), and ``backend="triton"`` is accepted for CPU tensors.
    ``device_key`` = (GPU name, arch) and ``num_sms`` stand for the GPU whose config files and
    SM count the launchers consult (default: default.json and the launchers' SM count)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from frugal.kernels import _launch

    from . import dispatch

    if getattr(_local, "launches", None) is not None:
        raise RuntimeError("jit_capture.capture() does not nest")
    classes = [cls for cls in (JITFunction, InterpretedFunction) if hasattr(cls, "run")]
    originals = [cls.run for cls in classes]
    key_fn, sms_fn = _launch.device_key, _launch.num_sms

    def patched(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            _record(self, args, grid, kwargs)
            return None

        return run

    _local.launches = []
    for cls, original in zip(classes, originals):
        cls.run = patched(original)
    dispatch.triton_on_cpu = True
    if device_key is not None:
        _launch.device_key = lambda device: device_key
    if num_sms is not None:
        _launch.num_sms = lambda device: num_sms
    try:
        yield _local.launches
    finally:
        for cls, original in zip(classes, originals):
            cls.run = original
        dispatch.triton_on_cpu = False
        _launch.device_key, _launch.num_sms = key_fn, sms_fn
        _local.launches = None


@contextlib.contextmanager
def label(text):
    """Labels the launches recorded inside (the public call that made them)."""
    previous = getattr(_local, "label", "")
    _local.label = text
    try:
        yield
    finally:
        _local.label = previous


def unique(launches):
    """The launches with distinct :meth:`Launch.spec_key`, first occurrence kept, each with the
    number of calls that asked for it."""
    seen = {}
    for launch in launches:
        key = launch.spec_key()
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [launch, 1]
    return [(launch, n) for launch, n in seen.values()]


class _CompileDriver:
    """A driver that reports a GPU target and has no device: enough for the JIT to bind,
    specialize and compile in warm-up mode (which launches nothing)."""

    def __init__(self, capability):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)
        self.device = ("frugal-check", capability)  # the JIT's per-device caches key on it

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):
        raise RuntimeError(f"jit_capture: compiling for a GPU target without a GPU; the JIT "
                           f"asked the driver for {name!r}")


def compile_launch(launch, capability):
    """Compile one launch for compute capability ``capability`` (80, 90, ...) with the
    installed Triton's own JIT; returns its ``CompiledKernel``."""
    from triton.runtime.driver import driver

    fn = launch.fn()
    args = [decode(a) for a in launch.args]
    kwargs = {k: decode(v) for k, v in launch.kwargs}
    # Restore whatever was active; reset_active() would create the default driver, which
    # fails without a GPU. (Triton 3.2 keeps it in .active, later ones in ._active.)
    slot = "_active" if "_active" in vars(driver) else "active"
    previous = vars(driver)[slot]
    driver.set_active(_CompileDriver(capability))
    try:
        return fn.run(*args, grid=launch.grid, warmup=True, **kwargs)
    finally:
        setattr(driver, slot, previous)


def dump(launches, path):
    with open(path, "w") as f:
        json.dump([launch.to_json() for launch in launches], f)


def load(path):
    with open(path) as f:
        return [Launch.from_json(item) for item in json.load(f)]
