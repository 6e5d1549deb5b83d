"""Loads frugal._C (C++ CPU kernels, CUDA kernels when built with them) once, at import, and
remembers why it could not be loaded, so a backend that needs it can say so."""

try:
    from . import _C
    _ERROR = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    _ERROR = f"frugal._C failed to import ({e}); reinstall with `pip install -e .`"


def ext():
    """The compiled module, or None."""
    return _C


def ext_error():
    """Why the compiled module is missing (None when it loaded)."""
    return _ERROR


def with_cuda():
    return _C is not None and bool(_C.with_cuda)
