"""Shared fixtures. Tests that take a device run on every device present: CPU always, CUDA
when there is a GPU (else those cases are skipped with a reason). Without a GPU, Triton kernels
run under the interpreter (TRITON_INTERPRET=1) on CPU tensors."""

import os
import sys

import pytest
import torch

# `python -m pytest` puts the working directory first on sys.path. From the repository root that
# lets frugal's kernels/ folder (installed as frugal.kernels) hide the `kernels` package that
# transformers 5 imports; nothing is imported from the root itself.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit kernel is defined (frugal.kernels imports lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import frugal  # noqa: E402
from frugal import _ext  # noqa: E402

DEVICES = ["cpu", "cuda"]


def backends_for(device):
    """Every backend that should run on ``device`` here."""
    if device == "cuda":
        return ["cuda", "triton", "torch"]
    names = ["torch"]
    if _ext.ext() is not None:
        names.insert(0, "cpu")
    if os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device on this machine; the same test runs on GPU tensors where one is")
    return request.param


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """frugal tune's files in a fresh directory, nothing tuned loaded before or after."""
    from frugal import tuning

    monkeypatch.setenv("FRUGAL_CONFIG_DIR", str(tmp_path))
    tuning.forget()
    yield tmp_path
    tuning.forget()


@pytest.fixture
def poison():
    """Fill every fresh allocation (torch.empty, at::empty) with NaN / the integer max, so an
    output element a kernel forgets to write fails the comparison."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


ISA_ORDER = ["scalar", "avx2", "avx512", "avx512_vnni", "amx_int8"]


def cpu_isas():
    """CPU instruction-set levels this machine can run, narrowest first."""
    mod = _ext.ext()
    if mod is None:
        return []
    return ISA_ORDER[: ISA_ORDER.index(mod.detected_cpu_isa()) + 1]


def _use_isa(name):
    """Runs the C++ kernels at level `name` until resumed; amx_int8 on a CPU without it runs
    the int8 GEMMs' AMX tile code on the tile emulation (csrc/cpu/amx.h) instead."""
    mod = _ext.ext()
    emulate = name == "amx_int8" and name not in cpu_isas()
    if name not in cpu_isas() and not emulate:
        pytest.skip(f"this CPU lacks {name}")
    previous = mod.cpu_isa()
    mod.set_cpu_isa(name)
    was_emulating = mod.set_cpu_amx_emulation(emulate)
    try:
        yield name if not emulate else "amx_int8 (emulated)"
    finally:
        mod.set_cpu_amx_emulation(was_emulating)
        mod.set_cpu_isa(previous)


@pytest.fixture(params=ISA_ORDER[:4])
def cpu_isa(request):
    """Runs a test once per CPU kernel path (C++ runtime ISA dispatch); amx_int8 only changes
    the int8 GEMMs, whose tests use int8_isa."""
    yield from _use_isa(request.param)


@pytest.fixture(params=ISA_ORDER)
def int8_isa(request):
    """cpu_isa plus amx_int8: the AMX tiles where the CPU has them, else their emulation."""
    yield from _use_isa(request.param)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: small models run many small ops, on which two OpenMP
    threads of a shared 2-core machine mostly wait for each other (3x slower when loaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


__all__ = ["HAS_CUDA", "ISA_ORDER", "backends_for", "cpu_isas", "frugal"]


@pytest.fixture
def emu():
    """frugal._cuda_emu (the CUDA kernels run on the CPU) planning as on an H100: 132 SMs, 2
    resident blocks, 512-position partitions, forward schedule; restored afterwards."""
    emu = pytest.importorskip("frugal._cuda_emu", reason="frugal._cuda_emu is not built")
    before = emu.configure()
    emu.configure(num_sms=132, blocks_per_sm=2, min_partition=512, schedule="forward", seed=0)
    yield emu
    emu.configure(**{k: before[k] for k in ("num_sms", "blocks_per_sm", "min_partition",
                                              "schedule", "seed")})
