"""The ``qwen2-jax`` command line (help, version, flags) and ``generate``, ``chat`` and ``demo`` end to end on a
tiny checkpoint with the real Qwen tokenizer."""

import argparse
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import qwen2_jax
from qwen2_jax import cli
from qwen2_jax.cli import common
from qwen2_jax.cli import demo as cli_demo
from qwen2_jax.cli import generate as cli_generate
from qwen2_jax.inference import generate as generate_module
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
    for path, message in [(tmp_path / "missing", "missing: does not exist"), (tmp_path, "no config.json")]:
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
    assert result.stderr == ("qwen2-jax generate: error: /nonexistent/ckpt: does not exist (expected a checkpoint "
                             "directory)\n")


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
    real = generate_module.generate_stream
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        for i, new in enumerate(real(*args, **kwargs)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt
            yield new

    monkeypatch.setattr(generate_module, "generate_stream", interrupted_once)
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
    assert out.startswith(f"user: {cli_demo.DEFAULT_PROMPT}\nassistant: ")
    directory = demo.demo_dir()
    assert directory.startswith(str(tmp_path))
    assert os.path.isdir(os.path.join(directory, "params"))  # converted to Orbax
    with open(os.path.join(directory, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [151645, 151643]
    assert [p for p in os.listdir(os.path.dirname(directory)) if p.startswith(".build-")] == []
    # what to pass to the other commands: this checkpoint, and how to get a Hugging Face one too
    assert f"Orbax:        {directory}" in err and "qwen2-jax demo --hf-dir DIR" in err

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


# ---- the command line itself: help, version, flags ----------------------------------------------------------
HEAVY = ("jax", "numpy", "flax", "torch", "transformers", "fastapi", "uvicorn")


def test_help_and_version_of_every_command_answer_without_importing_jax_numpy_torch_or_fastapi():
    code = ("import contextlib, io, sys\n"
            "from qwen2_jax import cli\n"
            "answers = []\n"
            f"for argv in [['--help'], ['--version'], *[[c, '--help'] for c in cli.COMMANDS]]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n"
            "            cli.main(argv)\n"
            "        except SystemExit as e:\n"
            "            answers.append((argv[0], e.code, len(out.getvalue()) > 0))\n"
            f"print(answers, [m for m in {HEAVY!r} if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers, imported = proc.stdout.rsplit("] [", 1)
    assert imported.strip() == "]", f"--help imported {imported}"
    assert answers.count(", 0, True)") == 2 + len(cli.COMMANDS)  # each printed its text and exited 0


def test_version_prints_the_package_version():
    proc = subprocess.run([sys.executable, "-m", "qwen2_jax.cli", "--version"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout == f"qwen2-jax {qwen2_jax.__version__}\n" == "qwen2-jax 0.3.0\n"


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_the_top_level_help_says_what_the_tool_does_and_lists_every_command_in_a_line(capsys):
    text = help_text(capsys)
    assert "Qwen2-57B-A14B" in text and "local directories" in text
    assert "huggingface-cli download Qwen/Qwen2-57B-A14B-Instruct --local-dir DIR" in text
    assert "each subcommand lives in its own module" not in text  # no longer the module docstring's first line
    for name, (_, line) in cli.COMMANDS.items():
        assert f"\n    {name} " in text and line.split()[0] in text


def subcommands():
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_each_command_help_describes_what_it_reads_and_writes_with_an_example(capsys):
    for name in cli.COMMANDS:
        text = help_text(capsys, name)
        description = subcommands()[name].description
        assert description.splitlines()[0] in text, name
        assert len(description.split()) > 60, name  # a paragraph, not a line
        assert f"qwen2-jax {name}" in description.split("example")[1], name  # at least one example


def test_every_flag_of_every_command_has_help_that_states_its_default():
    for name, parser in subcommands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue  # serve's flags from before vLLM's names, refused (tests/test_serve_startup.py)
            assert action.help, (name, action.dest)
            if action.option_strings and action.required is False:
                assert "default" in action.help, (name, action.option_strings)


def test_the_quantize_choices_are_stated_identically_in_every_command_and_the_readme():
    taking = {name for name, parser in subcommands().items()
              for action in parser._actions if "--quantize" in action.option_strings
              and common.QUANTIZE_CHOICES in action.help}
    assert taking == {"generate", "chat", "serve", "convert", "bench", "aot"}
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        rows = [line for line in f if line.startswith("| `qwen2-jax ")]
    for name in taking:
        [row] = [r for r in rows if r.startswith(f"| `qwen2-jax {name} ") or r.startswith(f"| `qwen2-jax {name}`")]
        assert "[--quantize int8\\|fp8\\|int8:BLOCK]" in row, row


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_generate_chat_and_serve_take_quantize(command):
    argv = [command, "CKPT", "--quantize", "int8:128"] + (["--prompt", "x"] if command == "generate" else [])
    assert cli.build_parser().parse_args(argv).quantize == "int8:128"


# ---- what generate and chat say on stderr --------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    """The checkpoint converted with --quantize int8: a checkpoint that is quantized as it is stored."""
    from qwen2_jax.convert import convert

    out = tmp_path_factory.mktemp("int8") / "ckpt"
    convert(checkpoint, out, quantize="int8", progress=False)
    return str(out)


def loaded_line(err: str, checkpoint: str) -> re.Match:
    return re.search(rf"^loaded {re.escape(checkpoint)} \((\S+), ([0-9.]+) (MB|GB) on the device\) in [0-9.]+ s$", err,
                     re.MULTILINE)


def test_the_loaded_line_states_the_weights_type_and_bytes(checkpoint, quantized, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "generate", checkpoint, "--prompt", "hi", "--max-new-tokens", "2")
    float_line = loaded_line(err, checkpoint)
    assert code == 0 and float_line and float_line[1] == "float32", err
    code, _, err = run_cli(capsys, "generate", quantized, "--prompt", "hi", "--max-new-tokens", "2")
    stored = loaded_line(err, quantized)
    assert code == 0 and stored and stored[1] == "int8", err  # not "(float32)": the weights are int8
    code, _, err = run_cli(capsys, "chat", checkpoint, "--quantize", "int8", "--max-new-tokens", "2",
                           stdin="hi\n", monkeypatch=monkeypatch)
    on_load = loaded_line(err, checkpoint)
    assert code == 0 and on_load and on_load[1] == "int8", err
    assert float(stored[2]) == float(on_load[2]) < float(float_line[2])  # all MB: the tiny model


def test_a_quantized_checkpoint_asked_to_quantize_again_is_one_line(quantized, capsys):
    code, _, err = run_cli(capsys, "generate", quantized, "--prompt", "hi", "--quantize", "int8",
                           "--max-new-tokens", "2")
    assert code == 2 and err == (f"qwen2-jax generate: error: {quantized}: already quantized (int8); load it without "
                                 f"--quantize\n")


def test_serve_loads_with_quantize(checkpoint, capsys, monkeypatch):
    from qwen2_jax.errors import InputError
    from qwen2_jax.inference.serving import engine

    def stop(model, **settings):  # stands in for the engine, and stops the command before it serves
        raise InputError("not serving in this test")

    monkeypatch.setattr(engine, "Engine", stop)
    code, _, err = run_cli(capsys, "serve", checkpoint, "--quantize", "int8", "--max-model-len", "64", "--port", "0")
    assert code == 2 and "not serving in this test" in err
    assert loaded_line(err, checkpoint)[1] == "int8"


def test_the_cli_defaults_are_the_libraries(checkpoint):
    from qwen2_jax.cli import serve
    from qwen2_jax.inference.serving import engine, server

    assert cli_generate.PREFILL_CHUNK == generate_module.PREFILL_CHUNK
    assert serve.DEFAULT_MAX_LEN == server.DEFAULT_MAX_LEN
    assert serve.DEFAULT_BATCH_WAIT_MS == engine.DEFAULT_BATCH_WAIT_MS


def test_prompts_are_padded_to_powers_of_two_then_to_whole_chunks():
    lengths = {n: generate_module.padded_prompt_length(n, 2048) for n in (1, 16, 17, 1000, 2048, 2049, 5000)}
    assert lengths == {1: 16, 16: 16, 17: 32, 1000: 1024, 2048: 2048, 2049: 4096, 5000: 6144}


def test_chat_says_it_compiles_once_for_each_new_prompt_length(checkpoint, capsys, monkeypatch):
    long = "word " * 40
    code, _, err = run_cli(capsys, "chat", checkpoint, "--max-new-tokens", "2",
                           stdin=f"Hello\n/reset\nHello\n/reset\n{long}\n", monkeypatch=monkeypatch)
    assert code == 0
    compiling = [int(m) for m in re.findall(r"^compiling for prompts of up to (\d+) tokens\.\.\.$", err, re.MULTILINE)]
    first, _, third = prompt_sizes(err)
    assert compiling == [generate_module.padded_prompt_length(n, 2048) for n in (first, third)]  # not twice for "Hello"
    assert compiling[0] < compiling[1]
    assert err.index("compiling for prompts") < err.index("prompt ")  # said before the wait, not after


# ---- the demo's checkpoints ----------------------------------------------------------------------------------
def test_demo_hf_dir_writes_the_hugging_face_checkpoint_and_names_both(tokenizer_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN2_JAX_HOME", str(tmp_path / "home"))
    tokenizer = importlib.import_module("qwen2_jax.inference.tokenizer")
    monkeypatch.setattr(tokenizer, "build_qwen2_tokenizer_files",
                        lambda out: shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True))
    hf = tmp_path / "demo-hf"
    code, out, err = run_cli(capsys, "demo", "--max-new-tokens", "3", "--hf-dir", str(hf))
    assert code == 0, err
    orbax = demo.demo_dir()
    assert f"wrote the demo's Hugging Face checkpoint in {hf}" in err
    assert f"Orbax:        {orbax}" in err and f"Hugging Face: {hf}" in err  # the paths to pass on
    assert sorted(os.listdir(hf)) == ["config.json", "generation_config.json", "model.safetensors",
                                      "tokenizer.json", "tokenizer_config.json"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # nothing left beside it
    # the weights the Orbax checkpoint was converted from: the same model, and the same answer
    import jax
    import numpy as np
    from flax import nnx

    a, b = (jax.tree.leaves(nnx.state(qwen2_jax.from_pretrained(d, dtype="float32"))) for d in (hf, orbax))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    code, again, err = run_cli(capsys, "demo", "--max-new-tokens", "3", "--hf-dir", str(hf))
    assert code == 0 and again == out and f"kept the demo's Hugging Face checkpoint in {hf}" in err


def test_demo_refuses_an_hf_dir_that_holds_something_else_and_leaves_it_as_it_was(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN2_JAX_HOME", str(tmp_path))
    os.makedirs(demo.demo_dir())  # stands in for a built demo checkpoint: nothing is loaded before the error below
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--hf-dir", str(other))
    assert code == 2 and err.count("\n") == 1
    assert f"--hf-dir {other}: already exists and is not the demo's Hugging Face checkpoint" in err
    assert os.listdir(other) == ["notes.txt"]
