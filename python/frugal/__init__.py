"""frugal: kernels that keep LLM inference and training cost from exploding as tokens grow."""

import torch  # noqa: F401  (loads libtorch before frugal._C)

from . import errors, reference
from .dispatch import BACKENDS, Choice, explain, set_debug
from .errors import BackendError, DeviceError, DTypeError, FrugalError, ShapeError
from .quantize import dequantize, quantize_per_token

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "Choice",
    "DTypeError",
    "DeviceError",
    "FrugalError",
    "ShapeError",
    "dequantize",
    "errors",
    "explain",
    "quantize_per_token",
    "reference",
    "set_debug",
]
