"""The extension as built: C++ CPU kernels with runtime ISA dispatch, CUDA kernels compiled
for sm_80 and sm_90a, with compute_80 PTX for newer GPUs (when nvcc and a CUDA build of torch
are present, even with no GPU), with no register spills and no stack frame: the paged and
sparse attention kernels and the CUTLASS int8 GEMMs."""

import os
import shutil

import pytest
import torch
from conftest import ISA_ORDER, cpu_isas

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
    assert mod.detected_cpu_isa() in ISA_ORDER
    before = mod.cpu_isa()
    try:
        assert mod.set_cpu_isa("scalar") == "scalar"
        assert mod.cpu_isa() == "scalar"
        # Asking for more than the CPU has is clamped to what it has.
        assert mod.set_cpu_isa("amx_int8") == mod.detected_cpu_isa()
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
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    archs = {"sm_" + a.replace("+PTX", "").replace(".", "")
             for a in wanted.replace(",", ";").split(";")}
    assert {r["arch"] for r in rows} == archs
    names = {r["kernel"] for r in rows}
    assert any("quantize_per_token" in n for n in names)
    for arch in archs:  # every kernel exists for every target
        assert {r["kernel"] for r in rows if r["arch"] == arch} == names
    for r in rows:
        assert r["STACK"] == 0 and r["LOCAL"] == 0, f"stack frame or spills: {r}"
        assert 0 < r["REG"] <= 255, r


def test_occupancy_model():
    # 128 threads of 99 registers with 50 KiB of shared memory: shared memory allows 3 blocks
    # on sm_80 (164 KiB) and 4 on sm_90 (228 KiB); registers would allow 5.
    assert build_info.occupancy("sm_80", 99, 128, 51200) == (3, 3 * 128 / 2048)
    assert build_info.occupancy("sm_90a", 99, 128, 51200) == (4, 4 * 128 / 2048)
    assert build_info.occupancy("sm_80", 255, 256, 0)[0] == 1     # 255 -> 256 registers a thread
    assert build_info.occupancy("sm_80", 32, 64, 0)[0] == 32      # the resident-block limit
    assert build_info.occupancy("sm_80", 32, 128, 164 * 1024) == (0, 0.0)  # cannot launch
    assert build_info._short_name(build_info._demangle(
        "_ZN6frugal4cuda12_GLOBAL__N_119paged_decode_kernelI6__halfaLi128EEEvNS1_10AttnParamsE")
    ) == "paged_decode_kernel<__half, signed char, 128>"


@pytest.mark.skipif(not CUDA_BUILD_POSSIBLE, reason="no nvcc or a CPU-only torch: no CUDA build")
def test_paged_kernels_fit_sm80_and_sm90a():
    emu = pytest.importorskip("frugal._cuda_emu", reason="frugal._cuda_emu is not built")
    wanted = {c["kernel"] for c in emu.kernel_configs() if c["kernel"].startswith("paged_")}
    rows = [r for r in build_info.cuda_kernel_report() if r["kernel"].startswith("paged_")]
    archs = {r["arch"] for r in rows}
    assert archs == {"sm_80", "sm_90a"} or os.environ.get("TORCH_CUDA_ARCH_LIST")
    for arch in archs:  # every launcher's kernel is in the binary, and nothing else
        assert {r["kernel"] for r in rows if r["arch"] == arch} == wanted
    for r in rows:
        assert r["stack"] == 0 and r["spill_bytes"] == 0, f"stack frame or spills: {r}"
        assert r["blocks_per_sm"] >= 1, f"cannot launch: {r}"
        # Decode over 16-bit or int8 caches up to D = 128 keeps >= 12 warps per SM streaming
        # (docs/cuda_kernels.md: ~2 tiles in flight per warp cover HBM latency with 12 warps).
        if r["kernel"].startswith("paged_decode_kernel<__") and ", 256," not in r["kernel"]:
            assert r["blocks_per_sm"] * r["threads"] // 32 >= 12, r


def _wanted_archs():
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return None if wanted else {"sm_80", "sm_90a"}


@pytest.mark.skipif(not CUDA_BUILD_POSSIBLE, reason="no nvcc or a CPU-only torch: no CUDA build")
def test_ptx_for_newer_gpus():
    """compute_80 PTX of every CUDA translation unit is embedded, so GPUs newer than sm_90
    JIT-compile the sm_80 code (the CUTLASS 2.x GEMMs, the attention kernels)."""
    import subprocess

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("TORCH_CUDA_ARCH_LIST overrides the targets")
    listing = subprocess.run([build_info.cuobjdump(), "-lptx", _ext.ext().__file__],
                             capture_output=True, text=True, check=True).stdout
    for unit in ("paged_attention", "sparse_attention", "quantize", "int8_matmul_sm80",
                 "int8_matmul_weight_only"):
        if unit.startswith("int8") and not build_info._launch_configs():
            continue
        assert f"{unit}.sm_80.ptx" in listing, (unit, listing)


@pytest.mark.skipif(not CUDA_BUILD_POSSIBLE, reason="no nvcc or a CPU-only torch: no CUDA build")
def test_sparse_and_cutlass_kernels_fit_sm80_and_sm90a():
    """The sparse attention forward (every dtype x head dim) and the CUTLASS GEMMs (2.x W8A8 on
    sm_80, 3.x W8A8 on sm_90a, 2.x weight-only on both; two tiles each) are in the binary,
    with launch configurations, no stack, no spills, and at least one CTA per SM."""
    emu = pytest.importorskip("frugal._cuda_emu", reason="frugal._cuda_emu is not built")
    sparse = {c["kernel"] for c in emu.kernel_configs() if c["kernel"].startswith("sparse_")}
    assert len(sparse) == 20  # (fp16, bf16) x 5 head dims x (without, with score modifiers)
    rows = build_info.cuda_kernel_report()
    archs = _wanted_archs() or {r["arch"] for r in rows}
    by_arch = {a: {r["kernel"] for r in rows if r["arch"] == a} for a in archs}
    for arch in archs:
        assert sparse <= by_arch[arch], arch
    gemms = [r for r in rows if r["kernel"].startswith("int8_gemm_")]
    if torch._C._dispatch_has_kernel_for_dispatch_key("frugal::int8_mm", "CUDA"):
        for arch in archs & {"sm_80", "sm_90a"}:
            names = {r["kernel"] for r in gemms if r["arch"] == arch}
            family = "int8_gemm_sm90<" if arch == "sm_90a" else "int8_gemm_sm80<signed char"
            assert sum(n.startswith(family) for n in names) == 8, (arch, names)  # 4 out x 2 tiles
            assert sum("ChannelScaledEpilogue" in n for n in names) == 4, (arch, names)
    for r in gemms + [r for r in rows if r["kernel"] in sparse]:
        assert r["stack"] == 0 and r["spill_bytes"] == 0, f"stack frame or spills: {r}"
        assert r["threads"] is not None, f"no launch configuration recorded: {r}"
        assert r["blocks_per_sm"] >= 1, f"cannot launch: {r}"
