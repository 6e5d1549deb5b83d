"""Triton kernels of frugal, importable as ``frugal.kernels``.

Each module holds one op: private ``@triton.jit`` kernels, then plain launchers (check, allocate,
launch), and ``CHECK_KERNELS`` (a label per kernel and whether it must use tensor cores) for
``frugal check``, which compiles what the JIT builds for the launches of a declared matrix of
public calls (``frugal.check_calls``). Kernels never import the public API (``frugal.*`` outside
this package).
"""

# Modules whose kernels `frugal check` labels (CHECK_KERNELS).
KERNEL_MODULES = ("quantize", "int8_matmul", "paged_attention", "sparse_attention")
