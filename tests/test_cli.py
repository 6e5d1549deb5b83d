import subprocess
import sys

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
