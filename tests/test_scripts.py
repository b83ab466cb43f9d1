"""Every measurement script in scripts/ runs in a tiny mode, so that none rots unnoticed (each is run as a
process from the repository root, as its docstring says to)."""

import json
import os
import re
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


def test_product_script_times_each_weight_first_and_last_at_each_row_count():
    out = run("scripts/bench_product.py", "--config", "tiny", "--rows", "1,4", "--repeats", "2")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "|---" not in line][1:]
    assert len(rows) == 12 and any(line.startswith("| lm_head [") for line in rows)  # 6 kinds of weight x 2 counts
    assert all(float(line.split("|")[5]) > 0 for line in rows)


def test_compare_checkouts_script_times_two_checkouts_in_turns():
    out = run("scripts/compare_checkouts.py", ".", ".", "--config", "tiny", "--rounds", "1", "--new-tokens", "3",
              "--prompt-len", "8", "--prefill-len", "32")
    assert "| batch | before | after | after / before |" in out and "| 8 |" in out
    assert "time to first token, 32-token prompt" in out


def test_compare_checkouts_script_times_the_engine_start_up_with_an_empty_and_a_filled_cache():
    out = run("scripts/compare_checkouts.py", ".", ".", "--config", "tiny", "--rounds", "1", "--engine-slots", "1",
              "--engine-max-len", "16")
    assert "serving engine start-up" in out and "1 slots x 16 positions" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| empty", "| filled"))]
    assert [r[0] for r in rows] == ["| empty", "| filled"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_compare_checkouts_script_refuses_engine_settings_the_engine_cannot_run_in_one_line():
    proc = subprocess.run([sys.executable, "scripts/compare_checkouts.py", ".", ".", "--config", "tiny",
                           "--engine-slots", "1", "--engine-max-len", "1"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "max_model_len must be an integer >= 2, got 1" in proc.stderr.strip().splitlines()[-1]


def test_long_context_memory_script_reports_peak_memory_by_prompt_length():
    out = run("scripts/long_context_memory.py", "--lengths", "512,1024", "--chunk", "256", "--layers", "1")
    assert "| 512 |" in out and "| 1,024 |" in out and "peak RSS" in out


def test_bench_generate_startup_script_times_two_fresh_processes_on_the_demo_checkpoint():
    out = run("scripts/bench_generate_startup.py", "--tiny")
    runs = [line for line in out.splitlines() if line.startswith("run ")]
    assert [r.split(":")[0] for r in runs] == ["run 1", "run 2"]
    assert all("first text" in r and "generated 4 tokens; time to first token" in r for r in runs)


def test_bench_convert_script_converts_two_depths_in_subprocesses_and_reports_peak_memory():
    out = run("scripts/bench_convert.py", "--tiny")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["4"])]
    assert [r[0] for r in rows] == ["1", "4"] and all(float(r[-1]) > 0 for r in rows)  # layers .. peak RSS MiB
    assert "peak RSS ratio" in out and "tiny mode: the bounds are about multi-GB checkpoints; not enforced" in out


def test_finetune_demo_script_trains_evaluates_and_saves_in_its_tiny_mode(tmp_path):
    out = run("scripts/finetune_demo.py", "--tiny", "--save", str(tmp_path / "state"))
    assert "step    3  loss" in out and "done: 3 steps" in out and "copy accuracy on 256 held-out sequences" in out
    assert os.path.isdir(tmp_path / "state") and os.listdir(tmp_path / "state")


def test_bench_script_runs_qwen2_jax_bench_from_the_checkout(tmp_path):
    out = run("scripts/bench.py", "--config", "tiny", "--layers", "1", "--new-tokens", "2", "--prompt-len", "8",
              "--prefill-len", "16", "--batches", "1", "--rounds", "1", "--no-hf", "--work-dir", str(tmp_path / "work"),
              "--json", str(tmp_path / "bench.json"), "--plot", "")
    assert "| decode tokens/s, batch 1 |" in out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["hf"] is None and result["jax"]["median"]["decode_b1_tokens_per_s"] > 0


def test_scripts_use_only_the_public_api():
    private = []
    for name in sorted(os.listdir(os.path.join(ROOT, "scripts"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "scripts", name)) as f:
                private += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(f, 1)
                            if re.search(r"\._[a-z]", line)]
    assert private == []


def test_bench_attention_script_times_both_paths_of_a_decode_step():
    out = run("scripts/bench_attention.py", "--slots", "4096", "--filled", "512,3000", "--repeats", "2")
    assert "| 512 |" in out and "| 3,000 |" in out


def test_quant_accuracy_script_reports_kl_top1_routers_and_layer_errors():
    out = run("scripts/quant_accuracy.py", "--tiny")
    assert "KL mean" in out and "router top-k" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("int8 ", "int8:16 "))]
    assert [r[0] for r in rows] == ["int8", "int8:16"]
    assert all(0 < float(r[1]) < 1e-3 and float(r[3]) > 0.9 for r in rows)  # KL mean, top-1


def test_bench_serve_script_loads_our_server_at_each_concurrency_in_its_tiny_mode(tmp_path):
    out = run("scripts/bench_serve.py", "--tiny", "--work-dir", str(tmp_path / "work"), "--json",
              str(tmp_path / "serve.json"), "--plot", str(tmp_path / "serve.png"))
    assert "| qwen2-jax | 1 | 4 / 0 |" in out and "| qwen2-jax | 4 | 8 / 0 |" in out
    result = json.loads((tmp_path / "serve.json").read_text())
    # the KV memory of 4 rows of --max-model-len 64 (8 to 40 prompt tokens + 4 to 12 output tokens fit in 64):
    # tiny's 2 layers x 2 (keys, values) x 2 KV heads x head_dim 16 x 4 bytes a position, in pages of 16 positions
    assert result["kv_bytes_per_token"] == 512 and result["kv_cache_memory"] == 4 * 64 * 512
    assert "--kv-cache-memory 131072" in out and "--disable-log-requests" in out
    assert result["ours"]["kv_cache_line"].startswith("KV cache: 16 pages of 16 tokens")
    levels = result["servers"]["qwen2-jax"]
    # every request got exactly the tokens it asked for (ignore_eos), its length drawn in [4, 12] from the seed
    asked = [level["output_tokens_asked"] for level in levels]
    assert [level["output_tokens"] for level in levels] == asked
    assert asked == [sum(level["output_lens"]) for level in levels]
    for level, n in zip(levels, (4, 8)):
        assert len(level["output_lens"]) == len(level["prompt_lens"]) == n
        assert all(4 <= k <= 12 for k in level["output_lens"]) and all(8 <= k <= 40 for k in level["prompt_lens"])
        assert len(set(level["output_lens"])) > 1 and len(set(level["prompt_lens"])) > 1
    # the engine's own counters over each level: every prompt prefilled in some call, 4 tokens in 3 steps or more;
    # 4 requests fit in the memory of 4 rows, so none was preempted
    assert [1 <= level["prefill_calls"] <= level["completed"] for level in levels] == [True, True]
    assert all(level["decode_steps"] >= 3 and level["preemptions"] == 0 for level in levels)
    assert all(level["kv_pages_total"] == 16 for level in levels)
    assert result["generate_b8_decode_tokens_per_s"] > 0 and os.path.isfile(tmp_path / "serve.png")


def test_bench_prefix_cache_script_times_prompts_with_a_finished_moved_running_or_queued_requests_tokens_cached(tmp_path):
    out = run("scripts/bench_prefix_cache.py", "--config", "tiny", "--context", "48", "--answer", "4", "--new", "8",
              "--repeats", "1", "--max-model-len", "128", "--max-num-batched-tokens", "32", "--work-dir", str(tmp_path))
    # 48 + 4 answered - 1 unfed = 51 tokens: their 3 full pages of 16
    assert "| next turn | alone | 48 |" in out and "| nothing cached | alone | 0 |" in out
    assert "| next turn, another request between | alone | 48 |" in out
    assert "| question on a read document | beside a reader | 48 |" in out
    assert "| question behind its document | sent with another | 48 |" in out
    assert "| nothing shared | beside a reader | 0 |" in out
    assert "| behind an unrelated prompt | sent with another | 0 |" in out


@pytest.mark.parametrize("flags, message", [
    (("--context", "100", "--answer", "20", "--new", "8", "--max-model-len", "128"),
     "--context 100 + --answer 20 + --new 8 + 1 (the token asked for) = 129 exceeds --max-model-len 128"),
    (("--max-model-len", "128", "--max-num-batched-tokens", "8"), "--max-num-batched-tokens must be an integer >= 16"),
    (("--new", "0",), "--new must be >= 1, got 0")])
def test_bench_prefix_cache_script_refuses_lengths_that_do_not_fit_before_building_anything(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, "scripts/bench_prefix_cache.py", "--config", "tiny", "--context", "48",
                           "--work-dir", str(tmp_path / "work"), *flags], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "work").exists()
