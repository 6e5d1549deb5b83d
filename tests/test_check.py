"""``frugal check``: the rules on synthetic rows, real compiles of kernels made to break them,
the launch capture, and the full check of every launch the call matrix makes, for sm_80 and
sm_90.

Compiling needs ``@triton.jit`` kernels, not the interpreted ones that TRITON_INTERPRET=1 (set
by conftest without a GPU) makes, so real compiles run in a subprocess without it; running this
file as a script compiles its own kernels and prints the rows as JSON. Capturing launches works
under the interpreter, in-process.
"""

import collections
import json
import os
import subprocess
import sys

import frugal
import pytest
import torch
import triton
import triton.language as tl
from frugal import check, check_calls, jit_capture

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


def _real_launches():
    """(name, launch, tensor cores expected) of kernels made to pass or break the rules."""
    a = torch.empty(64, 64, dtype=torch.float16)
    c = torch.empty(64, 64, dtype=torch.float32)
    x = torch.empty(8192, dtype=torch.float32)
    with jit_capture.capture() as launches:
        _dot_kernel[(1,)](a, a, c, 64, BM=64, BN=64, BK=32, num_warps=4, num_stages=3)
        _outer_product_kernel[(1,)](a, a, c, 64, BM=64, BN=64, BK=32, num_warps=4,
                                    num_stages=3)
        # 64x256 and 256x64 fp16 tiles, 6 stages: 196608 B of shared memory > sm_80's 166912.
        _dot_kernel[(1,)](a, a, c, 64, BM=64, BN=64, BK=256, num_warps=4, num_stages=6)
        # 8192 fp32 per warp: 256 live values per thread, more than 255 registers
        _row_norm_kernel[(1,)](x, x, 8192, BLOCK=8192, num_warps=1, num_stages=1)
    names = ("dot", "outer_product", "deep_pipeline", "row_norm")
    return list(zip(names, launches, (True, True, True, False)))


def _row(**overrides):
    row = {"error": None, "shared": 16384, "regs": 64, "stack": 0, "local": 0, "num_warps": 4,
           "tensor_cores": False, "tc_instructions": []}
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
    failures, _ = check.evaluate(_row(stack=8, local=8), "sm_90")
    assert failures == ["stack frame 8 B, local memory 8 B (register spills)"]
    assert check.evaluate(_row(local=4), "sm_80")[0]


def test_floor_rows_fail_only_on_compile_errors():
    row = _row(stack=8, shared=200000, tensor_cores=True)
    failures, notes = check.evaluate(row, "sm_80", floor=True)
    assert failures == [] and len(notes) == 3
    row = _row(error="CompilationError: at 1:2:\nboom")
    assert check.evaluate(row, "sm_80", floor=True) == (["compile error: boom"], [])


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
               shared=None, regs=None, stack=None, local=None)
    assert check.evaluate(row, "sm_80") == (["compile error: NameError('y')"], [])


def test_table_aligns_columns_and_shows_failures():
    ok = {**_row(), "kernel": "k", "config": "c", "target": "sm_80", "dtype": "fp16",
          "compile_s": 0.5, "failures": [], "notes": [], "ok": True}
    ok["spec"] = "M=1"
    bad = {**ok, "kernel": "longer_kernel", "shared": None, "regs": None, "stack": None,
           "local": None, "error": "boom", "failures": ["compile error: boom"], "ok": False}
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


def test_unknown_kernel_is_a_clear_usage_error(capfd):
    with pytest.raises(SystemExit):
        check.main(["--kernel", "no_such_kernel"])
    err = capfd.readouterr().err
    assert "no_such_kernel" in err and "quantize_per_token" in err


def test_floor_needs_its_triton(capfd, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--floor"])
    assert exit_info.value.code == 2
    assert f"triton=={check.FLOOR_TRITON}" in capfd.readouterr().err


# ----------------------------------------------------------------------------- launch capture

def _keys(launches):
    return {launch.spec_key() for launch in launches}


def test_capture_records_the_jits_specialization_and_runs_nothing():
    x = torch.full((64,), float("nan"))
    y = torch.full((64,), float("nan"))
    with jit_capture.capture() as launches:
        for n in (1, 32, 33):
            _row_norm_kernel[(1,)](x, y, n, BLOCK=64)
        _row_norm_kernel[(1,)](x[1:], y, 32, BLOCK=64)
    assert len(launches) == 4
    keys = [dict(launch.spec_key()[1]) for launch in launches]
    # An int of 1 is a constant to the JIT; others specialize on divisibility by 16.
    assert keys[0]["N"] == ("one",)
    assert keys[1]["N"] == ("i", "i32", True) and keys[2]["N"] == ("i", "i32", False)
    assert keys[1]["x_ptr"] == ("t", "torch.float32", True)
    assert keys[3]["x_ptr"] == ("t", "torch.float32", False)  # 4 bytes past an aligned base
    assert keys[1]["BLOCK"] == ("c", 64)
    assert len(jit_capture.unique(launches)) == 4
    assert torch.isnan(y).all()  # nothing ran
    # A do_not_specialize argument keeps only its integer width: M = 1 is no constant.
    a = torch.randint(-9, 9, (1, 4096), dtype=torch.int8)
    b = torch.randint(-9, 9, (4096, 4096), dtype=torch.int8)
    with jit_capture.capture() as launches:
        frugal.int8_mm(a, b, backend="triton")
    assert dict(launches[0].spec_key()[1])["M"] == ("i", "i32")


def test_capture_labels_launches_and_round_trips_json(tmp_path):
    x = torch.randn(3, 100)
    with jit_capture.capture() as launches, jit_capture.label("q"):
        frugal.quantize_per_token(x, backend="triton")
    jit_capture.dump(launches, tmp_path / "l.json")
    back = jit_capture.load(tmp_path / "l.json")
    assert back == launches and back[0].call == "q"
    assert _keys(back) == _keys(launches)


def test_capture_enforces_cuda_grid_limits():
    @triton.jit
    def _noop(x_ptr):
        pass

    x = torch.empty(1)
    with jit_capture.capture():
        _noop[(2**31 - 1, 65535, 65535)](x)
        with pytest.raises(jit_capture.GridError, match="axis y has 65536 programs"):
            _noop[(1, 65536)](x)
        with pytest.raises(jit_capture.GridError, match="axis x"):
            _noop[(2**31,)](x)


def test_sparse_attention_many_heads_fits_the_grid():
    # B * Hq = 70000 query heads of one token each: more than grid axis y's 65535.
    q = torch.randn(700, 100, 1, 32, dtype=torch.float16)
    k = torch.randn(700, 100, 1, 32, dtype=torch.float16)
    with jit_capture.capture() as launches:
        frugal.sparse_attention(q, k, k, frugal.masks.causal(1), backend="triton")
    for launch in launches:
        assert all(size <= limit for size, limit in zip(launch.grid, jit_capture.MAX_GRID))


def test_every_constexpr_variant_users_reach_is_in_the_matrix():
    with jit_capture.capture() as matrix:
        check_calls.run()
    declared = {launch.constexpr_key() for launch in matrix}
    with jit_capture.capture() as drawn:
        check_calls.reachable(seed=0, n=40)
    missing = {launch.constexpr_key(): launch.call for launch in drawn} .items()
    missing = [(call, key) for key, call in missing if key not in declared]
    assert not missing, f"{len(missing)} variants reachable but not in frugal.check_calls: " \
        f"{missing[:3]}"


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
        assert rows["row_norm", arch]["stack"] > 0
        assert any("register spills" in f for f in rows["row_norm", arch]["failures"])
    deep = rows["deep_pipeline", "sm_80"]
    assert deep["shared"] > 166912
    assert any(f.startswith("shared memory") for f in deep["failures"])


@pytest.mark.slow
def test_every_launch_of_the_matrix_compiles_for_sm_80_and_sm_90(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "-m", "frugal.check", "--arch", "sm_80,sm_90", "--json", str(out)],
        env=_ENV, capture_output=True, text=True, timeout=1200,
    )
    rows = json.loads(out.read_text()) if out.exists() else []
    failed = [f"{r['kernel']} {r['config']} {r['dtype']} {r['spec']} {r['target']} "
              f"(from {r['call']}): {r['failures']}" for r in rows if not r["ok"]]
    assert done.returncode == 0, "\n".join(failed[:10]) or done.stderr[-2000:]
    assert f"\n{len(rows)} launches compiled with Triton, 0 failed\n" in done.stdout
    if "CUDA C++ kernels (frugal._C, nvcc):" in done.stdout:  # the CUDA build's report
        assert done.stdout.rstrip().endswith("with a stack frame, spills or no room to launch")
        assert " 0 with a stack frame" in done.stdout

    # Each target compiles what the matrix launches on a GPU of that arch (its config files).
    # (A call may launch two kernels: split-K's GEMM and its reduction.)
    expected = collections.Counter((launch.call, arch) for arch in ("sm_80", "sm_90")
                                   for launch, _ in check.capture_matrix(arch))
    assert len(rows) == sum(expected.values())
    assert collections.Counter((r["call"], r["target"]) for r in rows) == expected
    for r in rows:
        assert r["regs"] > 0 and r["shared"] >= 0 and r["compile_s"] > 0, r


if __name__ == "__main__":
    print(json.dumps([{**check.compile_launch(launch, arch, tensor_cores=tc), "kernel": name}
                      for name, launch, tc in _real_launches() for arch in ("sm_80", "sm_90")]))
