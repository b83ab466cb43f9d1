"""The benchmarks run end to end in their tiny modes (so they cannot rot) and report in their documented format.
Speeds are never asserted: the targets are benchmark figures (docs/performance.md), not tests."""

import json
import os
import subprocess
import sys

import pytest

from qwen2_jax import cli
from qwen2_jax.tools.bench import bench_config, decode_step_bytes, expected_distinct_experts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--config", "tiny", "--layers", "1", "--new-tokens", "2", "--prompt-len", "8", "--prefill-len", "16",
             "--batches", "1,2", "--rounds", "1"]


def _bench(tmp_path, *extra):
    out = tmp_path / "out"
    argv = ["bench", *TINY_ARGS, "--work-dir", str(tmp_path / "work"), "--json", str(out / "bench.json"),
            "--plot", str(out / "bench.png"), *extra]
    return cli.main(argv), out


def test_step_bytes_of_the_full_model_at_batch_one_are_the_issues_27_4_gb():
    step = decode_step_bytes(bench_config("qwen2-57b-a14b-instruct"), 1, itemsize=2)
    assert step["distinct_experts_per_layer"] == 8
    assert round(step["total_bytes"] / 1e9, 1) == 27.4


def test_distinct_experts_grow_from_top_k_to_all_experts_with_the_batch():
    assert expected_distinct_experts(64, 8, 1) == 8
    counts = [expected_distinct_experts(64, 8, b) for b in (1, 8, 64, 512)]
    assert counts == sorted(counts) and 63 < counts[-1] <= 64


def test_bench_compares_both_sides_prints_the_table_and_writes_json_and_plot(tmp_path, capsys):
    code, out = _bench(tmp_path)
    printed = capsys.readouterr().out
    assert code == 0
    assert "| measure | JAX | transformers | JAX advantage | target | met |" in printed
    for row in ("| decode tokens/s, batch 1 |", "| decode tokens/s, batch 2 |", "| prefill tokens/s |",
                "| time to first token (s) |", "| compile time (s, all shapes) |", "| peak RSS (GiB) |"):
        assert row in printed
    assert "decode step floor, batch 1:" in printed and "memory bandwidth:" in printed
    result = json.loads((out / "bench.json").read_text())
    assert result["hf"]["transformers"] and result["hf"]["threads"] == result["threads"]
    assert set(result["jax"]["median"]) >= {"decode_b1_tokens_per_s", "decode_b2_tokens_per_s", "ttft_s",
                                            "prefill_tokens_per_s"}
    assert result["floor"]["bytes"] == decode_step_bytes(bench_config("tiny", 1), 1, 4)["total_bytes"]
    # Same weights, float32, greedy: both sides choose the same tokens.
    assert result["greedy_rows_equal"] == {"1": 1.0, "2": 1.0}
    assert (out / "bench.png").stat().st_size > 0


def test_bench_without_transformers_says_so_and_measures_the_jax_side(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "no_torch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('No module named torch')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))  # the transformers process inherits it
    code, out = _bench(tmp_path, "--plot", "")
    captured = capsys.readouterr()
    assert code == 0
    assert "torch/transformers not installed" in captured.err
    assert "measuring the JAX side only" in captured.out
    result = json.loads((out / "bench.json").read_text())
    assert result["hf"] is None and result["jax"]["median"]["decode_b1_tokens_per_s"] > 0


@pytest.mark.parametrize("flag, value, message", [
    ("--batches", "0,1", "--batches must be positive integers"),
    ("--new-tokens", "1", "--new-tokens must be >= 2"),
    ("--prefill-len", "5000", "--prefill-len + 1 = 5001 exceeds the config's max_position_embeddings 4096"),
])
def test_bad_bench_arguments_end_in_one_line_and_exit_2(tmp_path, capsys, flag, value, message):
    code, out = _bench(tmp_path, flag, value)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_gpu_bench_script_runs_its_tiny_mode_on_cpu_and_reports(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([os.path.join(ROOT, "scripts", "gpu_bench.sh"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "| batch | tokens/s | ms/step | GB read/step | roofline tokens/s | share of roofline | target |" in text
    assert "1 layers, JAX port against transformers" in text
    assert "| decode tokens/s, batch 1 |" in text and "| time to first token (ms) |" in text
    result = json.loads(out.read_text())
    labels = [r["label"] for r in result["jax"]["results"]]
    assert labels == ["full", "1 layers"]
    full = result["jax"]["results"][0]
    assert full["decode"]["1"]["roofline_share"] > 0 and full["prefill_tokens_per_s"] > 0
    # The serving engine: two requests at once into two slots, its decode rate with both busy set against
    # generate's at batch 2.
    engine = full["engine"]
    assert engine["slots"] == 2 and engine["requests"] == 2 and engine["decode_tokens_per_s"] > 0
    assert "serving engine, 2 requests of 8 + 6 tokens at once: decode" in text and "of generate at batch 2" in text
    assert result["hf"]["decode"]["1"]["tokens_per_s"] > 0
