"""``frugal check``: the rules on synthetic rows, real compiles of kernels made to break them, and
the full check of every kernel config for sm_80 and sm_90.

Compiling needs ``@triton.jit`` kernels, not the interpreted ones that TRITON_INTERPRET=1 (set
by conftest without a GPU) makes, so real compiles run in a subprocess without it; running this
file as a script compiles its own kernels and prints the rows as JSON.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from frugal import check

_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def _outer_product_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr):
    # A matmul by rank-1 updates: matmul-shaped, but no tl.dot, so no tensor cores.
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(0, K):
        a = tl.load(a_ptr + rm * K + k).to(tl.float32)
        b = tl.load(b_ptr + k * BN + rn).to(tl.float32)
        acc += a[:, None] * b[None, :]
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def _row_norm_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(y_ptr + offs, x / tl.sum(x * x), mask=offs < N)


def _matmul_spec(name, fn, tiles, num_warps, num_stages):
    return {
        "kernel": name, "fn": fn,
        "signature": {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32",
                      "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
        "constexprs": dict(zip(("BM", "BN", "BK"), tiles)),
        "num_warps": num_warps, "num_stages": num_stages, "dtype": "fp16",
        "config": f"tiles={tiles}", "tensor_cores": True,
    }


def _real_specs():
    return [
        _matmul_spec("dot", _dot_kernel, (64, 64, 32), 4, 3),
        _matmul_spec("outer_product", _outer_product_kernel, (64, 64, 32), 4, 3),
        # 64x256 and 256x64 fp16 tiles, 6 stages: 196608 B of shared memory > sm_80's 166912.
        _matmul_spec("deep_pipeline", _dot_kernel, (64, 64, 256), 4, 6),
        {  # 8192 fp32 per warp: 256 live values per thread, more than 255 registers
            "kernel": "row_norm", "fn": _row_norm_kernel,
            "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": 8192}, "num_warps": 1, "num_stages": 1, "dtype": "fp32",
            "config": "BLOCK=8192,warps=1", "tensor_cores": False,
        },
    ]


def _row(**overrides):
    row = {"error": None, "shared": 16384, "regs": 64, "spill_stores": 0, "spill_loads": 0,
           "stack": 0, "num_warps": 4, "tensor_cores": False, "tc_instructions": []}
    return {**row, **overrides}


def test_a_row_within_limits_passes():
    assert check.evaluate(_row(), "sm_80") == ([], [])
    assert check.evaluate(_row(shared=166912, regs=255, num_warps=8), "sm_80") == ([], [])


def test_shared_memory_limit_is_per_target():
    failures, _ = check.evaluate(_row(shared=200000), "sm_80")
    assert failures == ["shared memory 200000 B > 166912 B per block on sm_80"]
    assert check.evaluate(_row(shared=200000), "sm_90") == ([], [])
    assert check.evaluate(_row(shared=200000), "sm_86")[0]


def test_spills_fail():
    failures, _ = check.evaluate(_row(spill_stores=8, spill_loads=4), "sm_90")
    assert failures == ["spills 8 B stores + 4 B loads"]
    assert check.evaluate(_row(spill_loads=4), "sm_80")[0]


def test_register_limits_per_thread_and_per_sm():
    assert check.evaluate(_row(regs=256), "sm_80")[0][0] == "256 registers > 255 per thread"
    # 129 registers x 512 threads = 66048 > 65536 registers per SM
    failures, _ = check.evaluate(_row(regs=129, num_warps=16), "sm_90")
    assert failures == ["129 registers x 512 threads > 65536 per SM"]
    assert check.evaluate(_row(regs=128, num_warps=16), "sm_90") == ([], [])


def test_matmul_without_tensor_cores_fails():
    for arch, expected in (("sm_80", "mma"), ("sm_90", "wgmma")):
        failures, _ = check.evaluate(_row(tensor_cores=True), arch)
        assert failures == [f"matmul-shaped but no tensor-core instructions ({expected} expected)"]
    assert check.evaluate(_row(tensor_cores=True, tc_instructions=["mma"]), "sm_80") == ([], [])
    assert check.evaluate(_row(tensor_cores=True, tc_instructions=["wgmma"]), "sm_90") == ([], [])


def test_mma_on_sm_90_passes_but_is_reported():
    row = _row(tensor_cores=True, tc_instructions=["mma"])
    assert check.evaluate(row, "sm_90") == ([], ["mma, not wgmma"])


def test_compile_error_fails_with_its_last_line():
    row = _row(error="CompilationError: at 3:4:\n    x = y\n    ^\nNameError('y')\n",
               shared=None, regs=None, spill_stores=None, spill_loads=None)
    assert check.evaluate(row, "sm_80") == (["compile error: NameError('y')"], [])


def test_table_aligns_columns_and_shows_failures():
    ok = {**_row(), "kernel": "k", "config": "c", "target": "sm_80", "dtype": "fp16",
          "compile_s": 0.5, "failures": [], "notes": [], "ok": True}
    bad = {**ok, "kernel": "longer_kernel", "shared": None, "regs": None, "spill_stores": None,
           "spill_loads": None, "error": "boom", "failures": ["compile error: boom"], "ok": False}
    lines = check.format_table([ok, bad]).splitlines()
    assert lines[0].split()[:4] == ["kernel", "config", "target", "dtype"]
    assert len({line.index("sm_80") for line in lines[1:]}) == 1
    assert lines[1].endswith("ok") and lines[2].endswith("FAIL: compile error: boom")


def test_unknown_arch_is_a_clear_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--arch", "sm_80,sm_70"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "got sm_70" in err and "sm_80, sm_86" in err and "sm_120" in err
    with pytest.raises(ValueError, match="sm_70"):
        check.run(archs=("sm_70",))


def test_unknown_kernel_is_a_clear_usage_error(capsys):
    with pytest.raises(SystemExit):
        check.main(["--kernel", "no_such_kernel"])
    err = capsys.readouterr().err
    assert "no_such_kernel" in err and "quantize_per_token" in err


@pytest.mark.slow
def test_real_compiles_find_tensor_cores_shared_memory_and_spills():
    done = subprocess.run([sys.executable, __file__], env=_ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {(r["kernel"], r["target"]): r for r in json.loads(done.stdout)}

    assert rows["dot", "sm_80"]["tc_instructions"] == ["mma"]
    assert rows["dot", "sm_90"]["tc_instructions"] == ["wgmma"]
    assert rows["dot", "sm_80"]["ok"] and rows["dot", "sm_90"]["ok"]
    for arch in ("sm_80", "sm_90"):
        assert rows["outer_product", arch]["tc_instructions"] == []
        assert any("tensor-core" in f for f in rows["outer_product", arch]["failures"])
        assert rows["row_norm", arch]["spill_stores"] > 0
        assert any(f.startswith("spills") for f in rows["row_norm", arch]["failures"])
    deep = rows["deep_pipeline", "sm_80"]
    assert deep["shared"] > 166912
    assert any(f.startswith("shared memory") for f in deep["failures"])


@pytest.mark.slow
def test_every_kernel_config_compiles_for_sm_80_and_sm_90(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "-m", "frugal.check", "--arch", "sm_80,sm_90", "--json", str(out)],
        env=_ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert done.stdout.rstrip().endswith(f"{len(rows)} configs compiled, 0 failed")

    from frugal.kernels import KERNEL_MODULES

    expected = {
        (spec["kernel"], spec["config"], spec["dtype"], arch)
        for module in KERNEL_MODULES
        for spec in importlib.import_module(f"frugal.kernels.{module}").check_specs()
        for arch in ("sm_80", "sm_90")
    }
    assert expected
    assert {(r["kernel"], r["config"], r["dtype"], r["target"]) for r in rows} == expected
    for r in rows:
        assert r["regs"] > 0 and r["shared"] >= 0 and r["compile_s"] > 0, r


if __name__ == "__main__":
    print(json.dumps([check.compile_spec(spec, arch)
                      for spec in _real_specs() for arch in ("sm_80", "sm_90")]))
