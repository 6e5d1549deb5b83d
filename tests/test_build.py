"""The extension as built: C++ CPU kernels with runtime ISA dispatch, CUDA kernels compiled
for sm_80 and sm_90a (when nvcc and a CUDA build of torch are present, even with no GPU) with
no register spills and no stack frame."""

import os
import shutil

import pytest
import torch
from conftest import cpu_isas

from frugal import _ext, build_info

SANITIZED_RUN = os.environ.get("FRUGAL_SANITIZE") == "1"  # `make sanitize`: a CPU-only build
CUDA_BUILD_POSSIBLE = (torch.version.cuda is not None and os.environ.get("FRUGAL_NO_CUDA") != "1"
                       and not SANITIZED_RUN
                       and (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")))


def test_extension_loads_and_registers_ops():
    assert _ext.ext() is not None, _ext.ext_error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("frugal::quantize_per_token", "CPU")


def test_sanitized_build_only_under_make_sanitize():
    # `make sanitize` runs the tests with FRUGAL_SANITIZE=1 against its own build (ASan, UBSan);
    # every other run must load the normal one.
    assert _ext.ext().sanitized == SANITIZED_RUN, _ext.ext().__file__


def test_cpu_isa_dispatch():
    mod = _ext.ext()
    assert mod.detected_cpu_isa() in ("scalar", "avx2", "avx512", "avx512_vnni")
    before = mod.cpu_isa()
    try:
        assert mod.set_cpu_isa("scalar") == "scalar"
        assert mod.cpu_isa() == "scalar"
        # Asking for more than the CPU has is clamped to what it has.
        assert mod.set_cpu_isa("avx512_vnni") == mod.detected_cpu_isa()
        with pytest.raises(ValueError, match="isa: expected one of .*got 'sse9'"):
            mod.set_cpu_isa("sse9")
    finally:
        mod.set_cpu_isa(before)
    assert cpu_isas()[-1] == mod.detected_cpu_isa()


@pytest.mark.skipif(not CUDA_BUILD_POSSIBLE, reason="no CUDA build here (no nvcc, a CPU-only "
                    "torch, FRUGAL_NO_CUDA=1 or FRUGAL_SANITIZE=1)")
def test_cuda_kernels_built_for_sm80_and_sm90a():
    assert _ext.with_cuda(), "nvcc and a CUDA torch are present, but frugal._C has no CUDA kernels"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("frugal::quantize_per_token", "CUDA")
    rows = build_info.cuda_kernel_resources()
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    archs = {"sm_" + a.replace(".", "") for a in wanted.replace(",", ";").split(";")}
    assert {r["arch"] for r in rows} == archs
    names = {r["kernel"] for r in rows}
    assert any("quantize_per_token" in n for n in names)
    for arch in archs:  # every kernel exists for every target
        assert {r["kernel"] for r in rows if r["arch"] == arch} == names
    for r in rows:
        assert r["STACK"] == 0 and r["LOCAL"] == 0, f"stack frame or spills: {r}"
        assert 0 < r["REG"] <= 255, r
