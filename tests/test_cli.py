import os
import subprocess
import sys

import pytest
from frugal import _ext, cli
from frugal.cli import main


def test_info_prints_the_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "frugal 0.1.0" in out
    assert "on cpu: quantize_per_token: backend=" in out


def test_python_m_frugal_runs_info():
    done = subprocess.run([sys.executable, "-m", "frugal", "info"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "quantize_per_token: backend=" in done.stdout


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    assert "quantize_per_token" in capsys.readouterr().out


def test_bench_unknown_sweep_fails_clearly(capsys):
    assert main(["bench", "--sweep", "nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "unknown sweep 'nonexistent'" in err and "quantize_per_token" in err


def test_check_forwards_its_arguments(monkeypatch):
    import frugal.check

    seen = []
    monkeypatch.setattr(frugal.check, "main", lambda argv: seen.append(argv) or 0)
    assert main(["check", "--arch", "sm_90", "--help"]) == 0
    assert seen == [["--arch", "sm_90", "--help"]]


def test_bench_cpu_isa_reruns_itself_with_the_caps(monkeypatch, capsys):
    """--cpu-isa LEVEL re-executes the same command with frugal's and torch's libraries capped
    at LEVEL (they read the caps as they load); the rerun, marked, does not re-execute."""
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(cli.os, "execve", fake_execve)
    monkeypatch.setattr(sys, "argv", ["frugal", "bench", "--cpu-isa", "avx2", "--list"])
    monkeypatch.delenv("FRUGAL_BENCH_CPU_ISA", raising=False)
    with pytest.raises(SystemExit):
        main(["bench", "--cpu-isa", "avx2", "--list"])
    (path, argv, env), = calls
    assert path == sys.executable and argv[1:] == ["-m", "frugal", "bench", "--cpu-isa", "avx2",
                                                   "--list"]
    for key, value in cli.CPU_FAMILIES["avx2"].items():
        assert env[key] == value
    assert env["FRUGAL_BENCH_CPU_ISA"] == "avx2"
    monkeypatch.setenv("FRUGAL_BENCH_CPU_ISA", "avx2")
    assert main(["bench", "--cpu-isa", "avx2", "--list"]) == 0 and len(calls) == 1
    assert main(["bench", "--cpu-isa", "avx512", "--device", "cuda"]) == 2
    assert "--cpu-isa is for CPU runs" in capsys.readouterr().err


def test_cpu_isa_caps_take_effect_in_a_fresh_process():
    """The caps of --cpu-isa avx2, set before torch loads: ATen and frugal's C++ kernels run
    their AVX2 paths, and the bench header says so."""
    if _ext.ext() is None or _ext.ext().detected_cpu_isa() == "scalar":
        pytest.skip("needs a CPU with AVX2 and the extension")
    env = dict(os.environ, **cli.CPU_FAMILIES["avx2"], FRUGAL_BENCH_CPU_ISA="avx2")
    code = ("import frugal, torch; from frugal.bench.runner import _cpu_isa; "
            "print(frugal._ext.ext().cpu_isa()); print(_cpu_isa())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    path, header = done.stdout.splitlines()[-2:]
    assert path == "avx2"
    assert "torch ATen: AVX2" in header and "--cpu-isa avx2" in header
    assert "FBGEMM_ENABLE_INSTRUCTIONS=AVX2" in header
