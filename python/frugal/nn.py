"""Int8 linear layers and whole-model quantization.

``Int8Linear`` holds an int8 weight [N, K] with one float32 scale per output channel, computed
once by :meth:`Int8Linear.from_float`. Two modes:

* ``"dynamic"`` (W8A8): each forward quantizes the activations per token and runs the int8 GEMM
  with dequantization and bias fused into its epilogue. Best when compute matters (prefill).
* ``"weight_only"``: activations stay in their float dtype and the int8 weight is converted in
  registers, so only 1 byte per weight is read: best for decode (few tokens, memory-bound).

On CPU the weight is also repacked once into the C++ kernel's layout (kept beside the module,
not in its state_dict, and rebuilt if the weight changes), and the dynamic forward is a single
op that quantizes each row of x as the GEMM packs it (``int8_dynamic_linear_packed``).
"""

import dataclasses
import fnmatch

import torch
from torch import nn

from .dispatch import select
from .errors import DTypeError, ShapeError, check_dtype, check_dtype_arg
from .int8_matmul import (
    _BACKENDS,
    _ORDER,
    INT8_MAX_K,
    int8_matmul,
    int8_weight_only_matmul,
    quantize_per_channel,
)
from .quantize import quantize_per_token

MODES = ("dynamic", "weight_only")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class Int8Linear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` with an int8 weight.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    mode : "dynamic" (W8A8, per-token activation quantization) or "weight_only".
    backend : backend of the int8 kernels ("auto", "triton", "cpu", "torch").
    device, dtype : device of the buffers and dtype of the bias.
    """

    def __init__(self, in_features, out_features, bias=True, mode="dynamic", backend="auto",
                 device=None, dtype=torch.float32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Int8Linear: mode must be one of {MODES}; got {mode!r}")
        if not 0 < in_features <= INT8_MAX_K:
            raise ShapeError(f"Int8Linear: in_features must be in [1, {INT8_MAX_K}] (int32 "
                             f"accumulation limit); got {in_features}")
        check_dtype_arg("Int8Linear", "dtype", dtype, _FLOATS)
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.backend = backend
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features,
                                                        dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._packed = None  # (key, packed weight) for the C++ CPU kernel

    @classmethod
    def from_float(cls, linear, mode="dynamic", backend="auto"):
        """Quantize an ``nn.Linear`` once (per output channel); the result is a new module."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_float: linear must be an nn.Linear; got "
                            f"{type(linear).__name__}")
        w = linear.weight.detach()
        if w.dtype not in _FLOATS:
            raise DTypeError(f"Int8Linear.from_float: linear.weight must be float32, float16 or "
                             f"bfloat16; got {w.dtype}")
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, mode,
                  backend, device=w.device, dtype=w.dtype)
        wq, ws = quantize_per_channel(w)
        out.weight_int8.copy_(wq)
        out.weight_scale.copy_(ws)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode!r}")

    def _packed_weight(self):
        w = self.weight_int8
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.frugal.int8_pack_weight(w))
        return self._packed[1]

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"Int8Linear: x.shape[-1] must be in_features={self.in_features}; "
                             f"got shape {tuple(x.shape)}")
        if self.mode == "weight_only":
            return int8_weight_only_matmul(x, self.weight_int8, self.weight_scale, self.bias,
                                           backend=self.backend)
        name = select("int8_matmul", x.device, self.backend, _ORDER, _BACKENDS)
        if name == "cpu" and not torch.compiler.is_compiling():
            # One op: each row of x is quantized as the GEMM packs it, with no int8 copy of x.
            check_dtype("Int8Linear", "x", x, _FLOATS)
            y = torch.ops.frugal.int8_dynamic_linear_packed(
                x.reshape(-1, self.in_features), self._packed_weight(), self.weight_scale,
                self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        xq, xs = quantize_per_token(x, backend=self.backend)
        return int8_matmul(xq, self.weight_int8, xs, self.weight_scale, self.bias, x.dtype,
                           backend=name)


@dataclasses.dataclass
class QuantizeReport:
    """What :func:`quantize_model` did: qualified names swapped, and skipped with the reason."""

    swapped: list
    skipped: dict

    def __str__(self):
        lines = [f"swapped {len(self.swapped)} nn.Linear layer(s) for Int8Linear"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def quantize_model(model, skip=(), mode="dynamic", backend="auto"):
    """Swap every ``nn.Linear`` in ``model`` for an :class:`Int8Linear`, in place.

    Parameters
    ----------
    model : nn.Module
    skip : iterable of fnmatch patterns over qualified module names (e.g. ``"lm_head"``,
        ``"*.gate"``), or a callable ``(name, module) -> bool`` returning True to skip.
    mode, backend : as for :class:`Int8Linear`.

    Returns
    -------
    QuantizeReport with ``swapped`` (names) and ``skipped`` ({name: reason}).
    """
    if mode not in MODES:
        raise ValueError(f"quantize_model: mode must be one of {MODES}; got {mode!r}")
    if callable(skip):
        skip_fn = skip
    else:
        patterns = [skip] if isinstance(skip, str) else list(skip)
        skip_fn = lambda name, _m: any(fnmatch.fnmatchcase(name, p) for p in patterns)  # noqa: E731
    report = QuantizeReport([], {})
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    for name, linear in targets:
        if skip_fn(name, linear):
            report.skipped[name] = "matched skip"
        elif linear.in_features > INT8_MAX_K:
            report.skipped[name] = f"in_features={linear.in_features} > {INT8_MAX_K}"
        elif linear.weight.dtype not in _FLOATS:
            report.skipped[name] = f"weight dtype {linear.weight.dtype}"
        else:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, Int8Linear.from_float(linear, mode, backend))
            report.swapped.append(name)
    if isinstance(model, nn.Linear):
        report.skipped[""] = "the model itself is an nn.Linear: use Int8Linear.from_float"
    return report


__all__ = ["Int8Linear", "QuantizeReport", "quantize_model"]
