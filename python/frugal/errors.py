"""frugal's exceptions. Each subclasses the built-in a caller would catch anyway (ValueError,
TypeError, RuntimeError), and every message names the argument, what was expected and what
was given: ``quantize_per_token: x must be float32, float16 or bfloat16; got torch.int32``."""

import math

import torch

# |scale| * log2(e) must stay a finite float32: the kernels fold log2(e) into the scale.
MAX_SCALE = 2.0**126


class FrugalError(Exception):
    """Base class of every error frugal raises on purpose."""


class ShapeError(FrugalError, ValueError):
    """A tensor has the wrong number of dims or sizes that do not fit together."""


class DTypeError(FrugalError, TypeError):
    """A tensor (or a dtype argument) has a dtype the op does not take."""


class DeviceError(FrugalError, ValueError):
    """Tensors are on devices that differ, or on a device the op cannot serve."""


class BackendError(FrugalError, RuntimeError):
    """The backend asked for cannot run these inputs here; the message says why."""


def _dtype_list(dtypes):
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")


def check_dtype(op, name, t, allowed):
    check_tensor(op, name, t)
    if t.dtype not in allowed:
        raise DTypeError(f"{op}: {name} must be {_dtype_list(allowed)}; got {t.dtype}")


def check_dtype_arg(op, name, dtype, allowed):
    if dtype not in allowed:
        raise DTypeError(f"{op}: {name} must be {_dtype_list(allowed)}; got {dtype}")


def check_min_dim(op, name, t, min_dim, layout):
    if t.dim() < min_dim:
        raise ShapeError(
            f"{op}: {name} must have at least {min_dim} dim(s) {layout}; "
            f"got a {t.dim()}-d tensor of shape {tuple(t.shape)}"
        )


def check_same_device(op, **tensors):
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise DeviceError(
                f"{op}: {name} must be on the same device as {first_name} ({first.device}); "
                f"got {t.device}"
            )


def check_scale(op, scale):
    """A softmax scale: None (the op's default) or a finite number of magnitude at most
    MAX_SCALE, so no kernel sees an inf or NaN scale and returns all-NaN for it."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be None or a number; got {scale!r}")
    if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
        raise ValueError(f"{op}: scale must be a finite number with |scale| <= 2**126 (a "
                         f"float32 after folding in log2(e)); got {scale!r}")
