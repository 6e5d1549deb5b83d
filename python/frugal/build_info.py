"""What frugal._C was built with: CPU instruction sets and, for the CUDA kernels, the targets
and per-kernel resource usage (registers, stack, spill memory) read back from the binary with
cuobjdump, so that a build for sm_80 / sm_90a can be checked on a machine with no GPU."""

import glob
import os
import re
import shutil
import subprocess

import torch

from . import _ext


def cuobjdump():
    """Path of cuobjdump (pip's nvidia-cuda-cuobjdump, $CUDA_HOME/bin or PATH), or None."""
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    found = sorted(glob.glob(os.path.join(nvidia, "*", "bin", "cuobjdump")))
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found += [os.path.join(cuda_home, "bin", "cuobjdump"), shutil.which("cuobjdump") or ""]
    return next((p for p in found if p and os.access(p, os.X_OK)), None)


_ARCH = re.compile(r"^arch = (sm_\w+)", re.M)
_FUNC = re.compile(r"^\s*Function (\S+):\s*\n\s*(.+)$", re.M)


def cuda_kernel_resources(library=None):
    """Resource usage of every CUDA kernel in frugal._C.

    Returns
    -------
    list of dict: ``{"arch", "kernel", "REG", "STACK", "SHARED", "LOCAL"}`` (bytes, except REG),
    one per kernel and target. LOCAL > 0 means local memory (register spills or local arrays).
    """
    library = library or _ext.ext().__file__
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found: pip install nvidia-cuda-cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True,
                         text=True, check=True).stdout
    rows = []
    # One section per embedded cubin: "arch = sm_80" ... "Function name:\n  REG:.. STACK:..".
    sections = _ARCH.split(out)[1:]
    for arch, body in zip(sections[::2], sections[1::2]):
        for name, usage in _FUNC.findall(body):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage))
            rows.append({
                "arch": arch,
                "kernel": name,
                **{k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")},
            })
    return rows
