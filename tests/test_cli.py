"""``qwen2-jax generate``, ``chat`` and ``demo`` end to end on a tiny checkpoint with the real Qwen tokenizer."""

import importlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

import qwen2_jax
from qwen2_jax import cli
from qwen2_jax.cli import generate as cli_generate
from qwen2_jax.tools import demo
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.convert import write_hf_checkpoint
from qwen2_jax.inference.generate import GenerationConfig
from qwen2_jax.inference.tokenizer import build_qwen2_tokenizer_files, load_tokenizer

# The real vocabulary (so the real tokenizer's ids fit), everything else tiny; a short context for the
# too-long-prompt checks.
CONFIG = Qwen2MoeConfig(
    vocab_size=151936, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128, eos_token_id=(151643,))
END_TOKENS = (151643, 151645)  # config.json's <|endoftext|>, then the tokenizer's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_qwen2_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("ckpt")
    write_hf_checkpoint(CONFIG, path, dtype="float32", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return str(path)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return qwen2_jax.from_pretrained(checkpoint, dtype="float32"), load_tokenizer(checkpoint)


def run_cli(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def text_of(tokenizer, ids):
    return tokenizer.decode([t for t in ids if t not in END_TOKENS])


def test_generate_streams_the_generated_text_to_stdout_and_figures_to_stderr(checkpoint, loaded, capsys):
    model, tokenizer = loaded
    code, out, err = run_cli(capsys, "generate", checkpoint, "--prompt", "Hello, world", "--max-new-tokens", "12")
    assert code == 0
    prompt = tokenizer.encode("Hello, world")
    expected = qwen2_jax.generate(model, [prompt], max_new_tokens=12, eos_token_ids=END_TOKENS)[0]
    assert out == text_of(tokenizer, expected) + "\n"
    assert f"prompt {len(prompt)} tokens, generated {len(expected)} tokens; time to first token" in err
    assert "tokens/s" in err


def test_generate_with_chat_wraps_the_prompt_in_the_chat_template(checkpoint, loaded, capsys):
    model, tokenizer = loaded
    code, out, err = run_cli(capsys, "generate", checkpoint, "--prompt", "你好", "--chat", "--max-new-tokens", "6",
                             "--temperature", "0.8", "--top-k", "5", "--seed", "3")
    assert code == 0
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                           tokenize=True)
    expected = qwen2_jax.generate(model, [prompt], max_new_tokens=6, temperature=0.8, top_k=5, seed=3,
                                  eos_token_ids=END_TOKENS)[0]
    assert out == text_of(tokenizer, expected) + "\n"
    assert f"prompt {len(prompt)} tokens" in err


def flags(*argv):
    return cli.build_parser().parse_args(["generate", "CKPT", "--prompt", "x", *argv])


def test_sampling_defaults_come_from_the_generation_config_and_flags_override_them():
    qwen = GenerationConfig(eos_token_id=(151645, 151643), do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                            repetition_penalty=1.05)
    settings = cli_generate.sampling_settings(flags(), qwen)
    assert settings == dict(max_new_tokens=cli_generate.DEFAULT_MAX_NEW_TOKENS, temperature=0.7, top_k=20, top_p=0.8,
                            repetition_penalty=1.05, seed=0, truncate=False, prefill_chunk=2048,
                            eos_token_ids=(151645, 151643))
    settings = cli_generate.sampling_settings(
        flags("--temperature", "0", "--top-p", "0.5", "--eos-token-id", "7", "--eos-token-id", "8",
              "--max-new-tokens", "9", "--seed", "4"), qwen)
    assert (settings["temperature"], settings["top_p"], settings["eos_token_ids"], settings["max_new_tokens"],
            settings["seed"]) == (0.0, 0.5, (7, 8), 9, 4)
    # without a generation config: greedy, as transformers; end tokens from config.json and the tokenizer
    settings = cli_generate.sampling_settings(flags(), None, default_eos=(1, 2))
    assert settings["temperature"] == 0.0 and settings["eos_token_ids"] == (1, 2)
    # a generation config that does not sample means greedy, whatever its temperature
    assert cli_generate.sampling_settings(flags(), GenerationConfig(temperature=0.7))["temperature"] == 0.0


@pytest.mark.parametrize("argv,message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--prompt", "word " * 200], "prompt 0 has 201 tokens; with max_new_tokens 8 it exceeds the context of 128"),
])
def test_bad_generation_flags_are_a_one_line_error(checkpoint, capsys, argv, message):
    code, out, err = run_cli(capsys, "generate", checkpoint, "--prompt", "hi", "--max-new-tokens", "8", *argv)
    assert code == 2
    assert err.startswith("qwen2-jax generate: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_path_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    for path, message in [(tmp_path / "missing", "not a checkpoint directory"), (tmp_path, "no config.json")]:
        code, _, err = run_cli(capsys, "generate", str(path), "--prompt", "hi")
        assert code == 2 and message in err and err.count("\n") == 1


def test_truncate_keeps_the_last_tokens_of_a_prompt_too_long_for_the_context(checkpoint, loaded, capsys):
    model, tokenizer = loaded
    text = "word " * 200
    code, out, err = run_cli(capsys, "generate", checkpoint, "--prompt", text, "--max-new-tokens", "8", "--truncate")
    assert code == 0
    expected = qwen2_jax.generate(model, [tokenizer.encode(text)[-120:]], max_new_tokens=8, eos_token_ids=END_TOKENS)
    assert out == text_of(tokenizer, expected[0]) + "\n"
    assert "prompt truncated from 201 to its last 120 tokens" in err and "prompt 120 tokens" in err


def test_the_cli_reports_bad_input_without_a_traceback_as_a_process():
    result = subprocess.run([sys.executable, "-m", "qwen2_jax.cli", "generate", "/nonexistent/ckpt", "--prompt", "hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == "qwen2-jax generate: error: /nonexistent/ckpt: not a checkpoint directory\n"


def prompt_sizes(err):
    return [int(line.split()[1]) for line in err.splitlines() if line.startswith("prompt ")]


def test_chat_keeps_the_history_and_reset_clears_it(checkpoint, capsys, monkeypatch):
    code, out, err = run_cli(capsys, "chat", checkpoint, "--max-new-tokens", "5",
                             stdin="Hello\nHow are you?\n/reset\nHello\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert code == 0
    first, second, third = prompt_sizes(err)
    assert second > first + 5  # the first exchange is part of the second prompt
    assert third == first and "(history cleared)" in err
    answers = out.splitlines()
    assert len(answers) == 3 and answers[0] == answers[2]


def test_chat_ctrl_c_stops_the_answer_but_not_the_chat(checkpoint, capsys, monkeypatch):
    real = cli_generate.generate_stream
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        for i, new in enumerate(real(*args, **kwargs)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt
            yield new

    monkeypatch.setattr(cli_generate, "generate_stream", interrupted_once)
    code, out, err = run_cli(capsys, "chat", checkpoint, "--max-new-tokens", "6", stdin="Hello\nAgain\n",
                             monkeypatch=monkeypatch)
    assert code == 0 and len(calls) == 2
    assert "(stopped)\nprompt " in err and "generated 2 tokens" in err  # the figures of the stopped answer
    first, second = prompt_sizes(err)
    assert second > first  # the partial answer stayed in the history


def test_demo_builds_its_checkpoint_once_and_says_the_weights_are_random(tokenizer_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN2_JAX_HOME", str(tmp_path))
    # the real tokenizer build (tested in test_tokenizer.py) takes ~10 s: reuse this module's copy
    tokenizer = importlib.import_module("qwen2_jax.inference.tokenizer")
    monkeypatch.setattr(tokenizer, "build_qwen2_tokenizer_files",
                        lambda out: shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True))
    stale = tmp_path / "demo" / ".build-999999999-x"  # left by a killed build (no such process)
    stale.mkdir(parents=True)
    code, out, err = run_cli(capsys, "demo", "--max-new-tokens", "5")
    assert code == 0
    assert "building the demo checkpoint" in err and "RANDOM weights" in err
    assert out.startswith(f"user: {demo.DEFAULT_PROMPT}\nassistant: ")
    directory = demo.demo_dir()
    assert directory.startswith(str(tmp_path))
    assert os.path.isdir(os.path.join(directory, "params"))  # converted to Orbax
    with open(os.path.join(directory, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [151645, 151643]
    assert [p for p in os.listdir(os.path.dirname(directory)) if p.startswith(".build-")] == []

    code, again, err = run_cli(capsys, "demo", "--max-new-tokens", "5")
    assert code == 0 and "building" not in err and again == out  # cached, and seeded


def test_the_demo_cache_is_keyed_by_the_parameter_layout(tmp_path, monkeypatch):
    # A release that stores a parameter differently (as lm_head once changed from a kernel to HF's weight)
    # must build a fresh demo checkpoint, not fail to load the cached one.
    monkeypatch.setenv("QWEN2_JAX_HOME", str(tmp_path))
    directory = demo.demo_dir()
    assert directory == demo.demo_dir()
    assert os.path.basename(directory).startswith(f"v{demo.DEMO_VERSION}-")
    monkeypatch.setattr(demo, "DEMO_CONFIG", demo.DEMO_CONFIG.replace(moe_intermediate_size=32))
    assert demo.demo_dir() != directory
