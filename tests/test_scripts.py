"""Every measurement script in scripts/ runs in a tiny mode, so that none rots unnoticed (each is run as a
process from the repository root, as its docstring says to)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("decode", [False, True])
def test_compile_time_script_times_each_depth(decode):
    out = run("scripts/compile_time.py", "--config", "tiny", "--layers", "1,2", "--seq", "16",
              *(["--decode"] if decode else []))
    assert "| 1 |" in out and "| 2 |" in out and "ratio 2 / 1 layers" in out


@pytest.mark.parametrize("views", [True, False])
def test_profile_step_script_sums_a_traced_step_by_kind(views):
    out = run("scripts/profile_step.py", "--config", "tiny", "--calls", "1", *([] if views else ["--no-views"]))
    assert ("per-expert views" if views else "stacked experts") in out and "expert dispatch loops" in out


def test_moe_dispatch_script_times_every_implementation():
    out = run("scripts/bench_moe_dispatch.py", "--config", "tiny", "--tokens", "1,16", "--repeats", "1")
    header = next(line for line in out.splitlines() if line.startswith("| tokens"))
    assert all(f"{impl} (ms)" in header for impl in ("dense", "gather", "loop", "grouped", "ragged"))
    assert "| 16 |" in out


def test_compare_checkouts_script_times_two_checkouts_in_turns():
    out = run("scripts/compare_checkouts.py", ".", ".", "--config", "tiny", "--rounds", "1", "--new-tokens", "3",
              "--prompt-len", "8")
    assert "| batch | before | after | after / before |" in out and "| 8 |" in out
