"""Loads frugal._C (C++ CPU kernels, CUDA kernels when built with them) and remembers why it
could not be loaded, so a backend that needs it can say so."""

import functools


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from . import _C
    except ImportError as e:  # not built, or built against another torch
        return None, f"frugal._C failed to import ({e}); reinstall with `pip install -e .`"
    return _C, None


def ext():
    """The compiled module, or None."""
    return _load()[0]


def ext_error():
    """Why the compiled module is missing (None when it loaded)."""
    return _load()[1]


def with_cuda():
    mod = ext()
    return mod is not None and bool(mod.with_cuda)
