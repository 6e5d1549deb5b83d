"""transformers models on frugal: one call, ``apply_frugal(model)``, and the model trains and
prefills on :func:`frugal.sparse_attention`; :class:`BatchGenerator` (or :func:`generate`)
serves it from a :class:`frugal.PagedKVCache` with continuous batching.

Needs transformers 5 (``pip install "frugal[transformers]"``); ``import frugal`` alone never
imports it.
"""

import importlib.util
import os


def _import_transformers():
    """transformers, or an ImportError that says how to get it (or why it cannot load)."""
    try:
        import transformers
        import transformers.modeling_utils  # noqa: F401  (transformers imports lazily)
    except ImportError as e:
        spec = importlib.util.find_spec("kernels")
        origin = os.path.dirname(spec.origin or "") if spec is not None else ""
        if os.path.exists(os.path.join(origin, "sparse_attention.py")):
            raise ImportError(f"frugal.integrations.transformers: transformers imports the "
                              f"`kernels` package, but frugal's source folder {origin} comes "
                              f"first on sys.path (Python started in the repository root); "
                              f"run from another directory") from e
        raise ImportError("frugal.integrations.transformers needs transformers 5: "
                          "pip install \"frugal[transformers]\"") from e
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"frugal.integrations.transformers needs transformers 5; found "
                          f"{transformers.__version__}")


_import_transformers()

from .attention import (FrugalFallbackWarning, FrugalMask, FrugalReport, apply_frugal,
                        frugal_attention)
from .generator import (BatchGenerator, Completion, GeneratorStats, Sample, SamplingParams,
                        generate, sample_token)
from .paged import PagedModel, PagedStep
from .tensor_parallel import RowParallelLinear, tensor_parallel
from .tiny import FAMILIES, tiny_config, tiny_model

__all__ = [
    "FAMILIES",
    "BatchGenerator",
    "Completion",
    "FrugalFallbackWarning",
    "FrugalMask",
    "FrugalReport",
    "GeneratorStats",
    "PagedModel",
    "PagedStep",
    "RowParallelLinear",
    "Sample",
    "SamplingParams",
    "apply_frugal",
    "frugal_attention",
    "generate",
    "sample_token",
    "tensor_parallel",
    "tiny_config",
    "tiny_model",
]
