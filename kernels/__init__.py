"""Triton kernels of frugal, importable as ``frugal.kernels``.

Each module holds one op: private ``@triton.jit`` kernels, then plain launchers (check, allocate,
launch), then ``check_specs()``, which lists every (kernel, launch config, dtype) the launchers
may compile so that ``frugal check`` can build them all for real GPU targets without a GPU.
Kernels never import the public API (``frugal.*`` outside this package).
"""

# Modules whose check_specs() `frugal check` compiles.
KERNEL_MODULES = ("quantize", "int8_matmul", "paged_attention", "sparse_attention")
