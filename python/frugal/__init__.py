"""frugal: kernels that keep LLM inference and training cost from exploding as tokens grow."""

import torch  # noqa: F401  (loads libtorch before frugal._C)

from . import errors, masks, reference
from .block_mask import BlockMask, SparseLayout
from .knobs import cpu_knobs
from .dispatch import BACKENDS, Choice, explain, set_debug
from .errors import BackendError, DeviceError, DTypeError, FrugalError, ShapeError
from .int8_matmul import (
    INT8_MAX_K,
    int8_matmul,
    int8_mm,
    int8_weight_only_matmul,
    quantize_per_channel,
)
from .merge_attention_states import merge_attention_states
from .nn import Int8Linear, QuantizeReport, quantize_model
from .paged_kv_cache import (
    CacheFullError,
    CacheUsage,
    KVFootprint,
    PagedKVCache,
    SequenceError,
    StepPlan,
    kv_footprint,
)
from .paged_ops import BlockTableError, paged_append, paged_attention, paged_prefill_attention
from .quantize import dequantize, quantize_per_token
from .sparse_attention import HEAD_DIMS, sparse_attention

from . import tune_specs  # noqa: E402, F401  (registers how `frugal tune` exercises each op)

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "HEAD_DIMS",
    "SparseLayout",
    "masks",
    "sparse_attention",
    "BACKENDS",
    "BlockTableError",
    "CacheFullError",
    "CacheUsage",
    "KVFootprint",
    "PagedKVCache",
    "SequenceError",
    "StepPlan",
    "kv_footprint",
    "merge_attention_states",
    "paged_append",
    "paged_attention",
    "paged_prefill_attention",
    "BackendError",
    "Choice",
    "cpu_knobs",
    "DTypeError",
    "DeviceError",
    "FrugalError",
    "INT8_MAX_K",
    "Int8Linear",
    "QuantizeReport",
    "ShapeError",
    "dequantize",
    "errors",
    "explain",
    "int8_matmul",
    "int8_mm",
    "int8_weight_only_matmul",
    "quantize_per_channel",
    "quantize_model",
    "quantize_per_token",
    "reference",
    "set_debug",
]
