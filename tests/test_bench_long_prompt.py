"""scripts/bench_long_prompt.py in its tiny mode: a long prompt prefilled in pieces beside decoding streams, every
stream's inter-token gaps split by phase around it."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG, STREAMS, BUDGET, LONG_MAX = 300, 2, 64, 3


def test_tiny_mode_measures_every_streams_gaps_around_a_long_prompt_prefilled_in_pieces(tmp_path):
    out_json = tmp_path / "long.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "scripts/bench_long_prompt.py", "--config", "tiny", "--long-prompt", str(LONG),
         "--streams", str(STREAMS), "--max-num-batched-tokens", str(BUDGET), "--max-model-len", "512",
         "--long-max-tokens", str(LONG_MAX), "--before", "4", "--after", "4", "--work-dir", str(tmp_path / "ckpt"),
         "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| --max-num-batched-tokens | phase |" in proc.stdout and "| 64 | during |" in proc.stdout

    result = json.loads(out_json.read_text())
    assert result["streams"] == STREAMS and result["long_prompt"] == LONG and len(result["runs"]) == 1
    run = result["runs"][0]
    assert run["max_num_batched_tokens"] == BUDGET and run["preemptions"] == 0

    # the long prompt: all its tokens, its prefill in pieces within the budget less the decoding rows (62): of 48, the
    # longest piece the engine compiles beside a full decode step (64 less 16 slots)
    long = run["long"]
    assert long["tokens"] == LONG_MAX and long["finish"] == "length" and long["ttft_s"] > 0
    assert max(long["piece_tokens"]) == 48 and long["prefill_calls"] == math.ceil(LONG / 48)

    # every stream decoded through all three phases and was aborted; each gap counted once, in one phase
    phases = run["phases"]
    assert set(phases) == {"before", "during", "after", "lives"}
    for stream in run["streams"]:
        assert stream["finish"] == "abort" and stream["itl_count"] == stream["tokens"] - 1
        assert stream["tokens_before_arrival"] >= 5  # its first token and --before 4 more
    assert phases["lives"]["count"] == sum(s["itl_count"] for s in run["streams"])
    assert phases["lives"]["count"] == sum(phases[p]["count"] for p in ("before", "during", "after"))
    assert phases["before"]["count"] >= STREAMS * 4 and phases["after"]["count"] >= STREAMS * 4
    assert phases["during"]["count"] >= STREAMS  # at least a gap per stream ends in the prefill's window
    for p in phases.values():
        assert 0 < p["median_ms"] <= p["p90_ms"] <= p["p99_ms"] <= p["max_ms"]
    assert all(v > 0 for v in run["ratios"].values())
    assert run["ratios"]["lives_p99_over_median"] == phases["lives"]["p99_ms"] / phases["lives"]["median_ms"]
