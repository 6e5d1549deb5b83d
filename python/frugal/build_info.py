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


def cpu_model():
    """The CPU's model name (/proc/cpuinfo; the platform's processor or machine elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


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


# Per-SM limits of the occupancy report: registers, threads, resident blocks, shared memory per
# SM and the most one block may opt into (bytes). Every block also holds 1 KiB of shared memory
# reserved by the system on sm_80+ (cuobjdump counts it in an sm_90 kernel's SHARED already).
SM_LIMITS = {
    "sm_80": dict(regs=65536, threads=2048, blocks=32, smem=164 * 1024, smem_block=163 * 1024),
    "sm_90": dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024, smem_block=227 * 1024),
}
_REG_UNIT = 256        # registers are allocated per warp in units of 256
_SMEM_UNIT = 128       # shared memory is allocated in units of 128 bytes
_SMEM_RESERVED = 1024  # per block, sm_80+


def _demangle(name):
    """The C++ name of a mangled kernel symbol (libstdc++'s demangler, already loaded by torch)."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
    fn = lib.__cxa_demangle
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    status = ctypes.c_int()
    ptr = fn(name.encode(), None, None, ctypes.byref(status))
    if status.value != 0 or not ptr:
        return name
    text = ctypes.string_at(ptr).decode()
    ctypes.CDLL(None).free(ctypes.c_void_p(ptr))
    return text


def _short_name(demangled):
    """``void ns::(anonymous namespace)::kernel<A, B>(Params)`` -> ``kernel<A, B>``; a CUTLASS
    launch wrapper (``cutlass::Kernel2<K>``, ``cutlass::device_kernel<K>``) gives K's name, with
    namespaces dropped from its template arguments: ``int8_gemm_sm80<signed char, half_t,
    ScaledEpilogue, TileSmall>``."""
    text = demangled.split(" ", 1)[1] if demangled.startswith("void ") else demangled
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the parameter list starts at the first '(' outside <>
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and not text[i:].startswith("(anonymous namespace)"):
            end = i
            break
    head = text[:end]
    base = head.split("<", 1)[0].rsplit("::", 1)[-1]
    if base in _CUTLASS_WRAPPERS and "<" in head:
        inner = head[head.index("<") + 1:head.rindex(">")].strip()
        return re.sub(r"(?:\(anonymous namespace\)::|\b[A-Za-z_]\w*::)+", "",
                      _short_name(inner)).replace("> >", ">>")
    return base + (head[head.index("<"):] if "<" in head else "")


_CUTLASS_WRAPPERS = ("Kernel2", "device_kernel")
# CUTLASS kernels compiled as empty stubs for targets they never run on (int8_matmul_sm80.cuh,
# int8_matmul_sm90.cuh): the 2.x W8A8 kernels on sm_90a, the 3.x kernels elsewhere.
_STUBS = (("int8_gemm_sm80<signed char,", lambda arch: arch == "sm_90a"),
          ("int8_gemm_sm90<", lambda arch: arch != "sm_90a"))


def _is_stub(name, arch):
    return any(name.startswith(prefix) and on(arch) for prefix, on in _STUBS)


def _launch_configs():
    """{short kernel name: (threads, dynamic shared memory)} as the launchers use them (the
    binary keeps neither): the attention kernels' from the same source compiled into
    frugal._cuda_emu, the CUTLASS kernels' from frugal._C."""
    rows = []
    try:
        from . import _cuda_emu

        rows += _cuda_emu.kernel_configs()
    except ImportError:
        pass
    mod = _ext.ext()
    if mod is not None and hasattr(mod, "cuda_kernel_configs"):
        rows += mod.cuda_kernel_configs()
    return {c["kernel"]: (c["threads"], c["dynamic_smem"]) for c in rows}


def occupancy(arch, regs, threads, smem_bytes):
    """Resident blocks per SM and the fraction of the SM's warps they fill, for a block of
    ``threads`` threads using ``regs`` registers each and ``smem_bytes`` of shared memory (static
    + dynamic), as the CUDA occupancy calculator computes it (without its per-sub-partition
    rounding). 0 blocks: the block cannot launch on ``arch``."""
    lim = SM_LIMITS["sm_90" if arch.startswith("sm_90") else "sm_80"]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // _REG_UNIT) * _REG_UNIT
    smem = -(-(smem_bytes + _SMEM_RESERVED) // _SMEM_UNIT) * _SMEM_UNIT
    if smem_bytes > lim["smem_block"] or threads > 1024:
        return 0, 0.0
    blocks = min(lim["blocks"], lim["threads"] // (warps * 32),
                 lim["regs"] // (regs_per_warp * warps), lim["smem"] // smem)
    return blocks, blocks * warps * 32 / lim["threads"]


def cuda_kernel_report(library=None):
    """Per CUDA kernel and target: registers, shared memory, stack, spills and theoretical
    occupancy (what ``frugal check`` prints for the CUDA build).

    Returns
    -------
    list of dict: ``{"arch", "kernel" (C++ name, e.g. ``paged_decode_kernel<__half, __half,
    128>``), "registers", "static_smem", "dynamic_smem", "threads", "stack", "spill_bytes"
    (local memory per thread, where spills go: no kernel here has local arrays),
    "blocks_per_sm", "occupancy"}``; threads, dynamic_smem, blocks_per_sm and occupancy are
    None for a kernel whose launch configuration is not recorded (no launcher's table names
    it). The empty stubs of CUTLASS kernels on targets they never run on are left out.
    """
    configs = _launch_configs()
    rows = []
    for r in cuda_kernel_resources(library):
        name = _short_name(_demangle(r["kernel"]))
        if _is_stub(name, r["arch"]):
            continue
        threads, dynamic = configs.get(name, (None, None))
        static = r["SHARED"] - (_SMEM_RESERVED if r["arch"].startswith("sm_90") else 0)
        blocks = occ = None
        if threads is not None:
            blocks, occ = occupancy(r["arch"], r["REG"], threads, static + dynamic)
        rows.append({"arch": r["arch"], "kernel": name, "registers": r["REG"],
                     "static_smem": static, "dynamic_smem": dynamic, "threads": threads,
                     "stack": r["STACK"], "spill_bytes": r["LOCAL"], "blocks_per_sm": blocks,
                     "occupancy": occ})
    return sorted(rows, key=lambda row: (row["kernel"], row["arch"]))


def format_cuda_report(rows):
    """cuda_kernel_report() rows as an aligned plain-text table."""
    header = ["kernel", "arch", "regs", "smem", "threads", "stack", "spill", "blocks/SM", "occ"]
    lines = [header]
    for r in rows:
        smem = r["static_smem"] + (r["dynamic_smem"] or 0)
        lines.append([r["kernel"], r["arch"], str(r["registers"]), str(smem),
                      "-" if r["threads"] is None else str(r["threads"]), str(r["stack"]),
                      str(r["spill_bytes"]),
                      "-" if r["blocks_per_sm"] is None else str(r["blocks_per_sm"]),
                      "-" if r["occupancy"] is None else f"{r['occupancy']:.0%}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)
