"""Bad input, found by trying the code as a new user would: each case is refused with one line that names the
flag, field or file and the value expected; through the CLI with exit status 2 and nothing else on stderr,
through the Python API as one of the project's error types (``qwen2_jax.errors``). Anything else is a bug and
keeps its traceback."""

import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

import qwen2_jax
from qwen2_jax import cli, training
from qwen2_jax.cli import generate as cli_generate
from qwen2_jax.tools.aot import AotError
from qwen2_jax.model.config import ConfigError, Qwen2MoeConfig
from qwen2_jax.convert import ConvertError, convert, write_hf_checkpoint
from qwen2_jax.errors import InputError, Qwen2JaxError
from qwen2_jax.model.hf_files import CheckpointError
from qwen2_jax.inference.sampling import check_sampling_args
from qwen2_jax.sharding import make_mesh, parse_spec
from qwen2_jax.inference.tokenizer import build_qwen2_tokenizer_files

# The real vocabulary (the real tokenizer's ids fit), everything else tiny; a short context.
CONFIG = Qwen2MoeConfig(
    vocab_size=151936, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128, eos_token_id=(151643,))
VALID = {"model_type": "qwen2_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
         "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
         "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hugging Face checkpoint with the real Qwen tokenizer."""
    path = tmp_path_factory.mktemp("ckpt")
    write_hf_checkpoint(CONFIG, path, dtype="float32", seed=0)
    tokenizer = build_qwen2_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, path / name)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    """The same checkpoint converted to Orbax (the tokenizer files come along)."""
    out = tmp_path_factory.mktemp("converted") / "out"
    convert(checkpoint, out, progress=False)
    return out


@pytest.fixture(autouse=True)
def no_debug_tracebacks(monkeypatch):
    """Bad input is reported in one line unless QWEN2_JAX_DEBUG asks for the traceback."""
    monkeypatch.delenv("QWEN2_JAX_DEBUG", raising=False)


def refused(capsys, *argv) -> str:
    """Runs the CLI in-process; asserts exit status 2 and exactly one line on stderr; returns that line."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith(f"qwen2-jax {argv[0]}: error: "), err
    return err


def one_line(e) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def copy_with(src, tmp_path, *, config=None, files=None, remove=()):
    """A copy of the checkpoint ``src`` with config.json fields changed, files written and files removed."""
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    if config:
        raw = json.loads((dst / "config.json").read_text())
        raw.update(config)
        (dst / "config.json").write_text(json.dumps(raw))
    for name, text in (files or {}).items():
        (dst / name).write_text(text)
    for name in remove:
        os.remove(dst / name)
    return dst


# ---- the error types -----------------------------------------------------------------------------------
def test_every_project_error_is_a_qwen2_jax_error_and_still_a_value_error():
    for error in (InputError, ConfigError, CheckpointError, ConvertError, AotError):
        assert issubclass(error, Qwen2JaxError) and issubclass(error, ValueError)
    assert qwen2_jax.InputError is InputError and qwen2_jax.Qwen2JaxError is Qwen2JaxError


# ---- config.json: every field a user can get wrong ------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", 0, "num_attention_heads is 0; expected an integer >= 1"),
    ("num_attention_heads", 4.0, "num_attention_heads is 4.0; expected an integer >= 1"),
    ("num_key_value_heads", 0, "num_key_value_heads is 0; expected an integer >= 1"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("vocab_size", 0, "vocab_size is 0; expected an integer >= 1"),
    ("vocab_size", True, "vocab_size is True; expected an integer >= 1"),
    ("hidden_size", -32, "hidden_size is -32; expected an integer >= 1"),
    ("hidden_size", "32", "hidden_size is '32'; expected an integer >= 1"),
    ("hidden_size", 4, "head_dim (hidden_size 4 // num_attention_heads 4) is 1; expected at least 2"),
    ("intermediate_size", 0, "intermediate_size is 0; expected an integer >= 1"),
    ("moe_intermediate_size", -1, "moe_intermediate_size is -1; expected an integer >= 1"),
    ("shared_expert_intermediate_size", 0, "shared_expert_intermediate_size is 0; expected an integer >= 1"),
    ("num_hidden_layers", 0, "num_hidden_layers is 0; expected an integer >= 1"),
    ("num_experts", -4, "num_experts is -4; expected an integer >= 0"),
    ("num_experts_per_tok", 0, "num_experts_per_tok is 0; expected an integer >= 1"),
    ("num_experts_per_tok", 5, "num_experts_per_tok 5 must be in [1, num_experts=4]"),
    ("decoder_sparse_step", 0, "decoder_sparse_step is 0; expected an integer >= 1"),
    ("max_position_embeddings", 0, "max_position_embeddings is 0; expected an integer >= 1"),
    ("head_dim", 0, "head_dim is 0; expected an integer >= 2"),
    ("head_dim", 7, "head_dim 7 must be even for rotary embeddings"),
    ("head_dim", "8", "head_dim is '8'; expected an integer >= 2"),
    ("mlp_only_layers", 1, "mlp_only_layers is 1; expected a list of layer indices"),
    ("mlp_only_layers", ["1"], "mlp_only_layers entry is '1'; expected an integer >= 0"),
    ("mlp_only_layers", [2], "mlp_only_layers [2] outside [0, 2)"),
    ("rms_norm_eps", 0, "rms_norm_eps is 0; expected a finite number > 0"),
    ("rms_norm_eps", math.nan, "rms_norm_eps is nan; expected a finite number > 0"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps is '1e-6'; expected a finite number > 0"),
    ("router_aux_loss_coef", -0.1, "router_aux_loss_coef is -0.1; expected a finite number >= 0"),
    ("norm_topk_prob", "false", "norm_topk_prob is 'false'; expected true or false"),
    ("tie_word_embeddings", 1, "tie_word_embeddings is 1; expected true or false"),
    ("qkv_bias", "yes", "qkv_bias is 'yes'; expected true or false"),
    ("use_sliding_window", "no", "use_sliding_window is 'no'; expected true or false"),
    ("rope_theta", -1, "rope_theta is -1; expected a finite number > 0"),
    ("rope_theta", "1e6", "rope_theta is '1e6'; expected a finite number > 0"),
    ("rope_parameters", [{"rope_type": "default"}], "rope_parameters is [{'rope_type': 'default'}]; expected an object"),
    ("rope_scaling", "yarn", "rope_scaling is 'yarn'; expected an object"),
    ("rope_scaling", {"type": "yarn", "factor": 0}, "rope_scaling.factor is 0; expected a finite number > 0"),
    ("rope_scaling", {"type": "yarn", "factor": "2"}, "rope_scaling.factor is '2'; expected a finite number > 0"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "attention_factor": -1},
     "rope_parameters.attention_factor is -1; expected a finite number > 0"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "truncate": "yes"},
     "rope_parameters.truncate is 'yes'; expected true or false"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": "64"},
     "original_max_position_embeddings is '64'; expected an integer >= 1"),
    ("layer_types", "full_attention", "layer_types is 'full_attention'; expected a list with one entry per layer"),
    ("layer_types", ["full_attention"], "layer_types has 1 entries; expected one per layer (num_hidden_layers 2)"),
    ("eos_token_id", "<|endoftext|>", "eos_token_id holds '<|endoftext|>'; expected token ids"),
    ("eos_token_id", [1, None], "eos_token_id holds None; expected token ids"),
    ("eos_token_id", 2**40, "eos_token_id holds 1099511627776; expected token ids: integers in [0, 2**31)"),
    ("bos_token_id", 1.5, "bos_token_id is 1.5; expected an integer"),
    ("pad_token_id", "0", "pad_token_id is '0'; expected an integer"),
    ("rms_norm_eps", 10**400, "rms_norm_eps is 1000000000000000000"),  # a JSON integer beyond float range
])
def test_a_config_field_of_the_wrong_type_or_range_is_refused_naming_it(field, value, message):
    with pytest.raises(ConfigError) as e:
        Qwen2MoeConfig.from_dict({**VALID, field: value})
    assert message in one_line(e) and len(str(e.value)) < 200


def test_fields_that_transformers_fills_in_when_null_are_accepted():
    cfg = Qwen2MoeConfig.from_dict({**VALID, "num_key_value_heads": None, "head_dim": None, "mlp_only_layers": None,
                                    "pad_token_id": -1})  # Hub configs do hold pad_token_id -1
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.mlp_only_layers, cfg.pad_token_id) == (4, 8, (), -1)


def test_a_config_built_in_python_is_checked_by_validate():
    for changes, message in [(dict(num_key_value_heads=0), "num_key_value_heads is 0"),
                             (dict(mlp_only_layers=[0]), "mlp_only_layers is [0]; expected a tuple"),
                             (dict(rope_theta=math.inf), "rope_theta is inf"),
                             (dict(eos_token_id=(-1,)), "eos_token_id holds -1")]:
        with pytest.raises(ConfigError) as e:
            Qwen2MoeConfig(**changes).validate()
        assert message in one_line(e)


def test_a_config_json_that_is_a_directory_is_refused_naming_it(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError) as e:
        Qwen2MoeConfig.from_json(tmp_path)
    assert f"{tmp_path / 'config.json'}: cannot read config.json" in one_line(e)


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "config.json: num_attention_heads is 0; expected an integer >= 1"),
    ({"mlp_only_layers": 1}, "config.json: mlp_only_layers is 1; expected a list of layer indices"),
    ({"rope_parameters": [10000.0]}, "config.json: rope_parameters is [10000.0]; expected an object"),
])
def test_the_cli_refuses_a_bad_config_json_in_one_line_naming_file_and_field(checkpoint, tmp_path, capsys, changes,
                                                                            message):
    bad = copy_with(checkpoint, tmp_path, config=changes)
    assert message in refused(capsys, "generate", bad, "--prompt", "hi")


def test_convert_refuses_a_bad_config_json_in_one_line_and_writes_nothing(checkpoint, tmp_path, capsys):
    bad = copy_with(checkpoint, tmp_path, config={"num_key_value_heads": 0})
    err = refused(capsys, "convert", bad, tmp_path / "out")
    assert "config.json: num_key_value_heads is 0; expected an integer >= 1" in err
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ---- generate's flags -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--prompt", "\udcff"], "--prompt is not valid UTF-8 text (byte 0xff at character 0)"),  # argv byte 0xff
    (["--prompt", "ok \ud800"], "--prompt is not valid UTF-8 text (lone surrogate U+D800 at character 3)"),
    (["--eos-token-id", str(2**32)], f"--eos-token-id {2**32} is not a token id"),
    (["--eos-token-id", "-1"], "--eos-token-id -1 is not a token id"),
    (["--eos-token-id", "151936"], "--eos-token-id 151936 is outside the vocabulary: expected an integer in [0, 151936)"),
    (["--temperature", "inf"], "--temperature must be >= 0 and finite (0 means greedy), got inf"),
    (["--temperature", "nan"], "--temperature must be >= 0 and finite (0 means greedy), got nan"),
    (["--temperature=-inf"], "--temperature must be >= 0 and finite"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--repetition-penalty", "inf"], "--repetition-penalty must be > 0 and finite (1 means off), got inf"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
    (["--max-new-tokens", "128"], "max_new_tokens 128 leaves no room for a prompt in the context of 128 tokens"),
    (["--max-new-tokens", str(10**12)], f"max_new_tokens {10**12} leaves no room for a prompt"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1, got 0"),
    (["--mesh", "data=1000"], "mesh spec 'data=1000': axis sizes multiply to 1000 but there are"),
    (["--mesh", "pipeline=2"], "mesh spec 'pipeline=2': unknown axis 'pipeline'"),
    (["--mesh", "data=x"], "mesh spec 'data=x': 'data=x' is not AXIS=SIZE"),
])
def test_a_bad_generate_flag_is_refused_in_one_line_naming_it(checkpoint, capsys, argv, message):
    assert message in refused(capsys, "generate", checkpoint, "--prompt", "hi", "--max-new-tokens", "4", *argv)


@pytest.mark.parametrize("argv, message", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
    (["--max-model-len", "1"], "--max-model-len must be at least 2, got 1"),
    (["--max-model-len", "100000"], "--max-model-len 100000 exceeds the model's context of"),
    (["--max-num-batched-tokens", "8"], "--max-num-batched-tokens must be at least 16, got 8"),
    (["--max-waiting", "-1"], "--max-waiting must be an integer >= 0, got -1"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be a number of milliseconds in [0, 10000], got -1.0"),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms must be a number of milliseconds in [0, 10000], got nan"),
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
])
def test_a_bad_serve_flag_is_refused_in_one_line_before_the_model_loads(checkpoint, capsys, argv, message):
    assert message in refused(capsys, "serve", checkpoint, *argv)


def test_chat_refuses_a_system_message_that_is_not_utf8(checkpoint, capsys):
    assert "--system is not valid UTF-8 text (byte 0xfe at character 2)" in refused(
        capsys, "chat", checkpoint, "--system", "hi\udcfe")


def test_the_demo_refuses_a_bad_prompt_before_building_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN2_JAX_HOME", str(tmp_path))
    assert "--prompt is not valid UTF-8 text" in refused(capsys, "demo", "--prompt", "\udcff")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text, message", [
    ("{not json", "generation_config.json: cannot read generation config (Expecting property name"),
    ('{"eos_token_id": [151643, null]}', "generation_config.json: not a valid generation config"),
    ('{"eos_token_id": "<|im_end|>"}', "generation_config.json: not a valid generation config"),
    ('{"do_sample": true, "temperature": "hot"}',
     "generation_config.json: temperature must be >= 0 and finite (0 means greedy), got 'hot'"),
    ('{"do_sample": true, "top_p": 0}', "generation_config.json: top_p must be in (0, 1], got 0"),
    ('{"max_new_tokens": "10"}', "generation_config.json: max_new_tokens must be >= 1, got '10' (expected an integer)"),
])
def test_a_bad_generation_config_is_refused_naming_the_file(checkpoint, tmp_path, capsys, text, message):
    bad = copy_with(checkpoint, tmp_path, files={"generation_config.json": text})
    assert f"{bad}/{message}" in refused(capsys, "generate", bad, "--prompt", "hi")


def test_a_generation_config_value_overridden_by_its_flag_is_not_checked(checkpoint, tmp_path, capsys):
    bad = copy_with(checkpoint, tmp_path, files={"generation_config.json": '{"do_sample": true, "top_p": 0}'})
    assert "--top-p must be in (0, 1], got 2.0" in refused(capsys, "generate", bad, "--prompt", "hi", "--top-p", "2")


def test_a_checkpoint_without_its_tokenizer_is_refused_naming_the_file(checkpoint, tmp_path, capsys):
    bad = copy_with(checkpoint, tmp_path, remove=["tokenizer.json"])
    assert f"{bad}/tokenizer.json: tokenizer file not found" in refused(capsys, "generate", bad, "--prompt", "hi")


def test_a_tokenizer_whose_ids_exceed_the_vocabulary_is_refused_before_loading(checkpoint, tmp_path, capsys):
    small = tmp_path / "small"
    write_hf_checkpoint(CONFIG.replace(vocab_size=1000), small, dtype="float32", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, small / name)
    err = refused(capsys, "generate", small, "--prompt", "Hello world")
    assert "the tokenizer gives token id 9707, outside the model's vocabulary [0, 1000)" in err


def test_a_checkpoint_path_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_text("")
    assert "model.safetensors: not a checkpoint directory" in refused(
        capsys, "generate", tmp_path / "model.safetensors", "--prompt", "hi")


# Every command that reads a checkpoint directory, with what it needs besides the path.
READERS = {"generate": ["--prompt", "hi"], "chat": [], "serve": [], "parity": [], "convert": ["{tmp}/out"]}
HUB_ID = "Qwen/Qwen2-57B-A14B-Instruct"


@pytest.mark.parametrize("command", list(READERS))
def test_a_hugging_face_hub_id_says_this_tool_reads_local_directories_and_how_to_download_one(
        command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./Qwen here
    err = refused(capsys, command, HUB_ID, *[a.format(tmp=tmp_path) for a in READERS[command]])
    assert f"error: {HUB_ID}: no such directory; it looks like a Hugging Face Hub id" in err
    assert "reads local checkpoint directories only" in err
    assert f"`huggingface-cli download {HUB_ID} --local-dir DIR`" in err
    assert os.listdir(tmp_path) == []  # convert wrote nothing


@pytest.mark.parametrize("command", list(READERS))
def test_a_path_that_does_not_exist_says_so(command, tmp_path, capsys):
    missing = tmp_path / "models" / "qwen"
    err = refused(capsys, command, missing, *[a.format(tmp=tmp_path) for a in READERS[command]])
    assert f"error: {missing}: does not exist (expected a checkpoint directory)\n" in err


def test_a_local_owner_name_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # models/ is here: models/qwen is a local path with a typo, not a Hub id
    err = refused(capsys, "generate", "models/qwen", "--prompt", "hi")
    assert "models/qwen: does not exist" in err and "Hub" not in err


@pytest.mark.parametrize("command", list(READERS))
def test_a_directory_that_is_not_a_checkpoint_says_so(command, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("")
    err = refused(capsys, command, tmp_path / "photos", *[a.format(tmp=tmp_path) for a in READERS[command]])
    assert f"{tmp_path / 'photos'}: a directory but not a checkpoint: no config.json" in err
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def test_from_pretrained_says_the_same_about_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        qwen2_jax.from_pretrained(HUB_ID)
    assert "looks like a Hugging Face Hub id" in one_line(e) and "huggingface-cli download" in one_line(e)


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "convert", "bench", "aot"])
def test_an_unknown_quantization_type_is_one_line_in_every_command(command, checkpoint, tmp_path, capsys):
    where = {"generate": [checkpoint, "--prompt", "hi"], "chat": [checkpoint], "serve": [checkpoint],
             "convert": [checkpoint, tmp_path / "out"],
             "bench": ["--config", "tiny", "--no-hf", "--work-dir", tmp_path],
             "aot": []}[command]
    err = refused(capsys, command, *where, "--quantize", "int4")
    assert "quantization type 'int4' is not supported; expected one of ['fp8', 'int8']" in err
    assert not os.path.exists(tmp_path / "out")


# ---- chat input that cannot be tokenized ----------------------------------------------------------------
def test_chat_says_a_line_of_stdin_is_not_utf8_and_goes_on(checkpoint, capsys, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe oops\n/exit\n"), encoding="utf-8")  # strict, as a UTF-8 locale
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.main(["chat", str(checkpoint), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "error: the input is not valid UTF-8 text (invalid start byte); type it again" in err
    assert "Traceback" not in err


def test_chat_refuses_a_line_with_undecodable_bytes_and_goes_on(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("caf\udce9\n/exit\n"))  # stdin with surrogateescape (a C locale)
    assert cli.main(["chat", str(checkpoint), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "error: the input is not valid UTF-8 text (byte 0xe9 at character 3); type it again" in err
    assert "prompt " not in err  # nothing was generated from it


# ---- damaged Orbax checkpoints ---------------------------------------------------------------------------
def largest_data_file(params):
    """The biggest file of the OCDBT database: the embedding's data, which every restore reads."""
    files = [f for f in glob.glob(f"{params}/**/d/*", recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def damaged(converted, tmp_path, damage):
    dst = tmp_path / "orbax"
    shutil.copytree(converted, dst)
    damage(dst / "params")
    return dst


DAMAGE = {
    "data file missing": (lambda p: os.remove(largest_data_file(p)),
                          r"the data file of (model\.embed_tokens\.embedding|lm_head\.weight) \(c/\d+/\d+\) is missing"),
    "data file truncated": (lambda p: os.truncate(largest_data_file(p), 1000),
                            r"the data file of \S+ \(c/\d+/\d+\) is cut short or unreadable \(OUT_OF_RANGE: "),
    "index node missing": (lambda p: os.remove(glob.glob(f"{p}/d/*")[0]),
                           r"its OCDBT index cannot be read \(NOT_FOUND: "),
    "manifest missing": (lambda p: os.remove(p / "manifest.ocdbt"),
                         r"not a complete Orbax checkpoint: manifest\.ocdbt is missing"),
    "metadata missing": (lambda p: os.remove(p / "_METADATA"), r"not a complete Orbax checkpoint: _METADATA is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_orbax_checkpoint_is_a_checkpoint_error_naming_it(converted, tmp_path, case):
    damage, message = DAMAGE[case]
    path = damaged(converted, tmp_path, damage)
    with pytest.raises(CheckpointError) as e:
        qwen2_jax.from_pretrained(path, dtype="float32")
    assert re.match(rf"{re.escape(str(path / 'params'))}: {message}", one_line(e)), one_line(e)
    assert one_line(e).endswith("convert the Hugging Face checkpoint again (qwen2-jax convert)")


def test_a_missing_orbax_data_file_is_one_line_from_the_cli_process_and_nothing_else(converted, tmp_path):
    path = damaged(converted, tmp_path, DAMAGE["data file missing"][0])
    proc = subprocess.run([sys.executable, "-m", "qwen2_jax.cli", "generate", str(path), "--prompt", "hi",
                           "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and re.search(DAMAGE["data file missing"][1], lines[0]), proc.stderr[-3000:]


def test_an_orbax_index_node_missing_leaves_no_event_loop_errors_behind(converted, tmp_path):
    path = damaged(converted, tmp_path, DAMAGE["index node missing"][0])
    proc = subprocess.run([sys.executable, "-m", "qwen2_jax.cli", "generate", str(path), "--prompt", "hi",
                           "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "its OCDBT index cannot be read (NOT_FOUND" in proc.stderr, proc.stderr[-3000:]


# ---- the Python API --------------------------------------------------------------------------------------
def test_from_pretrained_refuses_a_mesh_spec_string_and_says_how_to_make_a_mesh(checkpoint):
    with pytest.raises(InputError) as e:
        qwen2_jax.from_pretrained(checkpoint, mesh="data=1")
    assert "mesh must be a jax.sharding.Mesh, got str 'data=1'" in one_line(e)
    assert 'qwen2_jax.sharding.make_mesh("data=1,expert=4,tensor=2")' in one_line(e)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float16"), "dtype 'float16' is not supported; expected one of ['bfloat16', 'float32']"),
    (dict(dtype="int8"), "dtype 'int8' is not supported"),
    (dict(dtype=object()), "is not a dtype; expected 'bfloat16' or 'float32'"),
])
def test_from_pretrained_refuses_a_bad_dtype(checkpoint, kwargs, message):
    with pytest.raises(InputError) as e:
        qwen2_jax.from_pretrained(checkpoint, **kwargs)
    assert message in one_line(e)


def test_from_pretrained_refuses_a_path_that_is_not_a_path():
    with pytest.raises(InputError) as e:
        qwen2_jax.from_pretrained(42)
    assert "path must be a checkpoint directory (a str or os.PathLike), got int" in one_line(e)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=math.inf), "temperature must be >= 0 and finite (0 means greedy), got inf"),
    (dict(temperature=-math.inf), "temperature must be >= 0 and finite"),
    (dict(temperature=math.nan), "temperature must be >= 0 and finite"),
    (dict(temperature="0.7"), "temperature must be >= 0 and finite (0 means greedy), got '0.7'"),
    (dict(temperature=None), "temperature must be >= 0 and finite"),
    (dict(top_k=math.inf), "top_k must be an integer >= 0 (0 means off), got inf"),
    (dict(top_k=math.nan), "top_k must be an integer >= 0"),
    (dict(top_k="5"), "top_k must be an integer >= 0"),
    (dict(top_k=True), "top_k must be an integer >= 0"),
    (dict(top_p=math.nan), "top_p must be in (0, 1], got nan"),
    (dict(top_p=math.inf), "top_p must be in (0, 1], got inf"),
    (dict(top_p=None), "top_p must be in (0, 1], got None"),
    (dict(repetition_penalty=math.inf), "repetition_penalty must be > 0 and finite (1 means off), got inf"),
    (dict(repetition_penalty=math.nan), "repetition_penalty must be > 0 and finite"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0 and finite"),
])
def test_sampling_values_that_are_not_finite_or_not_numbers_are_input_errors(kwargs, message):
    values = dict(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0) | kwargs
    with pytest.raises(InputError) as e:
        check_sampling_args(**values)
    assert message in one_line(e)


def test_generate_refuses_an_infinite_temperature_before_running_anything():
    model = qwen2_jax.init_random(Qwen2MoeConfig.from_dict(VALID), seed=0)
    with pytest.raises(InputError) as e:
        qwen2_jax.generate(model, [[1, 2]], max_new_tokens=2, temperature=math.inf)
    assert "temperature must be >= 0 and finite" in one_line(e)


@pytest.mark.parametrize("spec, message", [
    ("data=1000", "mesh spec 'data=1000': axis sizes multiply to 1000 but there are"),
    ("data=1,data=1", "mesh spec 'data=1,data=1': axis 'data' given twice"),
    ("tensor=-1", "'tensor=-1' is not AXIS=SIZE"),
    ("data:1", "'data:1' is not AXIS=SIZE"),
    (4, "mesh spec must be a string such as 'data=1,expert=4,tensor=2', got int"),
])
def test_a_bad_mesh_spec_is_an_input_error(spec, message):
    with pytest.raises(InputError) as e:
        make_mesh(spec)
    assert message in one_line(e)


def test_parse_spec_refuses_none():
    with pytest.raises(InputError) as e:
        parse_spec(None)
    assert "mesh spec must be a string" in one_line(e)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_decay=math.nan), "weight_decay must be a finite number >= 0; got nan"),
    (dict(weight_decay="0.1"), "weight_decay must be a finite number >= 0; got '0.1'"),
    (dict(max_grad_norm="1"), "max_grad_norm must be positive or None; got '1'"),
    (dict(end_learning_rate="0"), "end_learning_rate must be in [0, learning_rate=1e-05]; got '0'"),
    (dict(total_steps=0), "total_steps must be a positive integer; got 0"),
])
def test_a_bad_train_config_is_an_input_error(kwargs, message):
    with pytest.raises(InputError) as e:
        training.TrainConfig(**kwargs)
    assert message in one_line(e)


def test_convert_refuses_an_unknown_dtype_as_an_input_error(checkpoint, tmp_path):
    with pytest.raises(InputError) as e:
        convert(checkpoint, tmp_path / "out", dtype="float16")
    assert "dtype 'float16' is not supported" in one_line(e)
    assert os.listdir(tmp_path) == []


# ---- what the CLI does with errors that are not bad input -----------------------------------------------
@pytest.mark.parametrize("error", [KeyError("layers"), RuntimeError("internal"), ValueError("a bug, not bad input")])
def test_an_unexpected_error_propagates_with_its_traceback(monkeypatch, error):
    def broken(name, args):
        raise error

    monkeypatch.setattr(cli_generate, "run", broken)
    with pytest.raises(type(error)) as e:
        cli.main(["generate", "CKPT", "--prompt", "hi"])
    assert e.value is error


def test_an_unexpected_error_shows_its_traceback_from_the_cli_process(tmp_path):
    code = ("import sys; from qwen2_jax import cli, cli_generate; "
            "cli_generate.run = lambda name, args: {}['no such key']; sys.exit(cli.main())")
    proc = subprocess.run([sys.executable, "-c", code, "generate", "CKPT", "--prompt", "hi"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'no such key'" in proc.stderr


def test_qwen2_jax_debug_shows_the_traceback_of_bad_input(monkeypatch, capsys):
    monkeypatch.setenv("QWEN2_JAX_DEBUG", "1")
    with pytest.raises(CheckpointError, match="/nonexistent/ckpt: does not exist"):
        cli.main(["generate", "/nonexistent/ckpt", "--prompt", "hi"])
    monkeypatch.setenv("QWEN2_JAX_DEBUG", "0")  # off again
    assert "does not exist" in refused(capsys, "generate", "/nonexistent/ckpt", "--prompt", "hi")


def test_qwen2_jax_debug_shows_the_traceback_from_the_cli_process():
    proc = subprocess.run([sys.executable, "-m", "qwen2_jax.cli", "generate", "/nonexistent/ckpt", "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, QWEN2_JAX_DEBUG="1"))
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "CheckpointError: /nonexistent/ckpt: does not exist" in proc.stderr


def test_a_non_utf8_prompt_byte_from_the_command_line_is_one_line_from_the_process(checkpoint):
    proc = subprocess.run([sys.executable, "-m", "qwen2_jax.cli", "generate", str(checkpoint), "--prompt", b"\xff"],
                          capture_output=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == b"qwen2-jax generate: error: --prompt is not valid UTF-8 text (byte 0xff at character 0)\n"


def test_aot_refuses_a_bad_config_json_before_compiling_anything(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({**VALID, "num_attention_heads": 0}))
    assert f"{tmp_path / 'config.json'}: num_attention_heads is 0; expected an integer >= 1" in refused(
        capsys, "aot", "--config", tmp_path)


def test_a_bad_flag_value_is_one_line_naming_the_flag_with_exit_status_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["aot", "--engine", "copy"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("qwen2-jax aot: error: argument --engine: invalid choice: 'copy' (choose from "
                                       "'decode', 'prefill', 'piece')\n")


def test_aot_refuses_a_piece_step_without_its_length(capsys):
    assert "--engine piece needs --prompt-len" in refused(capsys, "aot", "--engine", "piece")
