"""Int8 linear layers and whole-model quantization.

``Int8Linear`` holds an int8 weight [N, K] with one float32 scale per output channel, computed
once by :meth:`Int8Linear.from_float`. Two modes:

* ``"dynamic"`` (W8A8): each forward quantizes the activations per token and runs the int8 GEMM
  with dequantization and bias fused into its epilogue. Best when compute matters (prefill).
* ``"weight_only"``: activations stay in their float dtype and the int8 weight is converted in
  registers, so only 1 byte per weight is read: best for decode (few tokens, memory-bound).

In dynamic mode on the CPU the module holds its weight only in the C++ kernel's packed layout
(``int8_pack_weight``), and the forward is a single op that quantizes each row of x as the GEMM
packs it (``int8_dynamic_linear_packed``); see :class:`Int8Linear` for what that means for
``weight_int8``.
"""

import dataclasses
import fnmatch

import torch
from torch import nn

from . import _ext
from .errors import (
    DTypeError,
    ShapeError,
    check_dtype,
    check_dtype_arg,
    check_min_dim,
    check_tensor,
)
from .int8_matmul import (
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

    The weight: ``weight_int8`` (int8 [out_features, in_features]) with ``weight_scale``
    (float32 [out_features]). In dynamic mode on the CPU (with the C++ kernels built and
    ``backend`` "auto" or "cpu") the module keeps the weight *only* in the GEMM's packed layout,
    so there is no second copy that could go stale. Then:

    * reading ``weight_int8`` returns a fresh [out_features, in_features] tensor unpacked from
      it (on every read): writing into that tensor (``copy_``, ``.data``, ``.numpy()``) changes
      the tensor, not the module;
    * to change the weight, assign it (``m.weight_int8 = w``, which packs it) or load a
      state_dict (which holds ``weight_int8`` unpacked, as ever, with ``weight_scale`` and
      ``bias``).

    Elsewhere (weight-only mode, GPU tensors, other backends) ``weight_int8`` is the tensor the
    kernels read, so an in-place write reaches the forward there too. Either way the forward
    computes with exactly the weight that ``weight_int8`` and ``state_dict()`` report.
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
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        # The weight: packed (the C++ kernel's layout) or rows (int8 [N, K]), never both.
        self._packed = self._rows = None
        self._store(torch.zeros(out_features, in_features, dtype=torch.int8, device=device))

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
        out.weight_int8 = wq
        out.weight_scale.copy_(ws)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode!r}")

    @property
    def weight_int8(self):
        """int8 [out_features, in_features]; unpacked afresh on each read when packed."""
        if self._packed is None:
            return self._rows
        return _unpack_weight(self._packed, self.out_features, self.in_features)

    @weight_int8.setter
    def weight_int8(self, w):
        check_dtype("Int8Linear", "weight_int8", w, (torch.int8,))
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ShapeError(f"Int8Linear: weight_int8 must have shape (out_features, "
                             f"in_features) = {(self.out_features, self.in_features)}; got "
                             f"{tuple(w.shape)}")
        self._store(w.detach().to(self.weight_scale.device, copy=True))

    def _store(self, w):
        """Keeps w (int8 [N, K], owned by the module) as the weight, packed where the forward
        runs the packed kernel."""
        packs = (self.mode == "dynamic" and w.device.type == "cpu" and _ext.ext() is not None
                 and self.backend in ("auto", "cpu"))
        if packs:  # (a packed weight of 8 MiB or more sits on 2 MiB pages: see below)
            self._packed, self._rows = torch.ops.frugal.int8_pack_weight(w), None
        elif w.device.type == "cpu":
            # Few rows read the weight as it is, streaming it from memory: on 2 MiB pages when
            # it takes 8 MiB or more (1.2-1.3x faster than through 4 KiB pages).
            from .paged_ops import empty_cache

            rows = empty_cache(w.shape, w.dtype, w.device)
            self._packed, self._rows = None, rows.copy_(w)
        else:
            self._packed, self._rows = None, w

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .cpu(), ...: the weight is not a buffer; move it and re-store it.
        w = fn(self.weight_int8)
        super()._apply(fn, recurse)
        self._store(w)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight_int8"] = self.weight_int8
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight_int8"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in unexpected_keys:  # not a buffer, so nn.Module does not know it
            unexpected_keys.remove(key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        try:
            self.weight_int8 = state_dict[key]
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{key}: {e}")

    def forward(self, x):
        check_tensor("Int8Linear", "x", x)
        check_min_dim("Int8Linear", "x", x, 1, "[..., in_features]")
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"Int8Linear: x.shape[-1] must be in_features={self.in_features}; "
                             f"got shape {tuple(x.shape)}")
        if self.mode == "weight_only":
            return int8_weight_only_matmul(x, self.weight_int8, self.weight_scale, self.bias,
                                           backend=self.backend)
        if self._packed is not None:
            # The packed weight exists only where the C++ kernel runs this forward (_store):
            # one op, each row of x quantized as the GEMM packs it, no int8 copy of x.
            check_dtype("Int8Linear", "x", x, _FLOATS)
            y = torch.ops.frugal.int8_dynamic_linear_packed(
                x.reshape(-1, self.in_features), self._packed, self.weight_scale, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        xq, xs = quantize_per_token(x, backend=self.backend)
        return int8_matmul(xq, self.weight_int8, xs, self.weight_scale, self.bias, x.dtype,
                           backend=self.backend)


def _unpack_weight(packed, n, k):
    """int8 [n, k] from an int8_pack_weight buffer, whose layout (csrc/cpu/int8_matmul.cpp) is a
    64-byte header, int32 [Npad] column sums, then groups of 64 columns (the last one Npad % 64
    wide when that is not 0) stored [K4][width][4], with Npad = n rounded up to 16 and
    K4 = ceil(k / 4)."""
    n_pad, k4 = -(-n // 16) * 16, -(-k // 4)
    data = packed[64 + 4 * n_pad:]
    full = n_pad // 64 * 64
    parts = [data[:full * k4 * 4].view(full // 64, k4, 64, 4).transpose(1, 2).reshape(full, 4 * k4)]
    if n_pad > full:
        last = n_pad - full
        parts.append(data[full * k4 * 4:].view(k4, last, 4).transpose(0, 1).reshape(last, 4 * k4))
    return torch.cat(parts)[:n, :k].contiguous()


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
