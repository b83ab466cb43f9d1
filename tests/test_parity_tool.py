"""``qwen2-jax parity`` on a small random checkpoint (tests/hf_reference.py's ``sparse_step2``: dense layers 0
and 2, sparse layers 1 and 3), and scripts/parity_table.py in its tiny mode."""

import json
import os
import subprocess
import sys

import pytest

from hf_reference import parity_model
from qwen2_jax import cli
from qwen2_jax.tools import parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE = (False, True, False, True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _, directory = parity_model("sparse_step2", tmp_path_factory.mktemp("ckpt"))
    return directory


def run_parity(capsys, *argv):
    code = cli.main(["parity", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def full_run(checkpoint, tmp_path_factory):
    """The default run (float32 against float64), with its JSON, table and plot."""
    out = tmp_path_factory.mktemp("out")
    proc = subprocess.run([sys.executable, "-m", "qwen2_jax.cli", "parity", checkpoint, "--json", str(out / "r.json"),
                           "--plot", str(out / "r.png")], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, QWEN2_JAX_CACHE_DIR=str(out / "jax-cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "r.json") as f:
        return json.load(f), proc.stdout, out / "r.png"


def test_report_has_every_op_of_every_layer_within_float32_rounding_of_float64(full_run):
    result, table, _ = full_run
    assert (result["layers"], result["checkpoint_layers"], result["dtype"], result["reference"]) == (
        4, 4, "float32", "float64")
    for i, sparse in enumerate(SPARSE):
        ops = [row["op"] for row in result["ops"] if row["layer"] == i]
        assert ops == (list(parity.LAYER_OPS) if sparse else ["attention", "mlp", "residual"]), (i, ops)
    assert result["ops"][-1]["op"] == "logits"
    for row in result["ops"]:
        # ours and transformers' float32 alike: a few float32 ulps of the float64 truth, on every token
        assert row["error"] < 5e-6 and row["transformers_float32_error"] < 5e-6, row
        assert row["tokens"] == result["tokens"] == 80, row  # 32 + 24 + 16 + 8 random ids
        assert row.get("topk_agreement", 1.0) == 1.0, row
    logits = result["logits"]
    assert logits["error"] < 5e-6 and logits["kl_max"] < 1e-10 and logits["top1_agreement"] == 1.0, logits
    assert result["first_jump"] is None
    assert "first jump: none" in table and "<- first jump" not in table
    assert sum(line.split()[:2] == ["3", "router"] for line in table.splitlines()) == 1


def test_plot_is_written_as_a_png(full_run):
    with open(full_run[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("layer, module, op", [
    (1, ("self_attn", "o_proj", "weight"), "attention"),
    (1, ("mlp", "gate", "weight"), "router"),
    (3, ("mlp", "experts", "down_proj"), "experts"),
    (3, ("mlp", "shared_expert", "up_proj", "weight"), "shared_expert"),
    (2, ("mlp", "down_proj", "weight"), "mlp"),
])
def test_first_jump_marks_the_layer_and_op_of_a_weight_corrupted_on_our_side(checkpoint, capsys, monkeypatch,
                                                                             layer, module, op):
    # Both sides read the checkpoint, so the corruption goes into our model only, after loading: as a bug would.
    load = parity.load_ours

    def corrupted(directory, cfg, dtype):
        model = load(directory, cfg, dtype)
        node = model.model.layers[layer]
        for name in module:
            node = getattr(node, name)
        node[...] = node[...] * 1.01
        return model

    monkeypatch.setattr(parity, "load_ours", corrupted)
    code, out, err = run_parity(capsys, checkpoint, "--reference", "float32", "--json", "-")
    assert code == 0, err
    result = json.loads(out)
    assert result["first_jump"]["layer"] == layer and result["first_jump"]["op"] == op, result["first_jump"]
    marked = [line for line in err.splitlines() if line.endswith("<- first jump")]
    assert len(marked) == 1 and marked[0].split()[:2] == [str(layer), op], marked
    assert f"first jump: layer {layer} {op}" in err


def test_layers_truncates_both_sides_to_the_first_layers(checkpoint, full_run, capsys):
    code, out, err = run_parity(capsys, checkpoint, "--layers", "2", "--json", "-")
    assert code == 0, err
    result = json.loads(out)  # stdout holds only the JSON; the table went to stderr
    assert (result["layers"], result["checkpoint_layers"]) == (2, 4) and "2 of 4 layers" in err
    rows = [row for row in result["ops"] if row["op"] != "logits"]
    assert {row["layer"] for row in rows} == {0, 1}
    # the first two layers are the full model's, tensor for tensor: the same errors to the last bit
    full = {(row["layer"], row["op"]): row for row in full_run[0]["ops"]}
    for row in rows:
        assert row["error"] == full[row["layer"], row["op"]]["error"], row
    assert result["logits"]["error"] < 5e-6 and result["first_jump"] is None


def test_bfloat16_against_float32_reports_bfloat16_sized_errors_and_no_jump(checkpoint, capsys):
    code, out, err = run_parity(capsys, checkpoint, "--dtype", "bfloat16", "--reference", "float32", "--json", "-")
    assert code == 0, err
    result = json.loads(out)
    errors = [row["error"] for row in result["ops"]]
    assert 1e-3 < max(errors) < 1e-1 and "transformers_float32_error" not in result["ops"][0]
    assert result["logits"]["top1_agreement"] > 0.9 and result["first_jump"] is None


def test_prompts_file_lines_are_token_ids_without_a_tokenizer(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1 2 3 4\n\n5 6\n")
    code, out, err = run_parity(capsys, checkpoint, "--prompts", str(prompts), "--layers", "1", "--json", "-")
    assert code == 0, err
    result = json.loads(out)
    assert result["input_ids"] == [[1, 2, 3, 4], [5, 6]] and result["tokens"] == 6


def test_prompts_file_lines_are_text_with_the_checkpoints_tokenizer(checkpoint, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path / "ckpt"
    directory.mkdir()
    for name in os.listdir(checkpoint):
        os.symlink(os.path.join(checkpoint, name), directory / name)
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 5, "world": 7}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nworld hello hello\n")
    code, out, err = run_parity(capsys, str(directory), "--prompts", str(prompts), "--layers", "1", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["input_ids"] == [[5, 7], [7, 5, 5]]


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "{missing}: does not exist"),
    (["{empty}"], "no config.json"),
    (["{ckpt}", "--layers", "0"], "--layers is 0; expected at least 1"),
    (["{ckpt}", "--layers", "5"], "--layers is 5; expected 1 to 4 (num_hidden_layers of"),
    (["{ckpt}", "--prompts", "{missing}"], "--prompts {missing}: cannot read (No such file or directory)"),
    (["{ckpt}", "--prompts", "{empty}"], "--prompts {empty}: cannot read (Is a directory)"),
    (["{ckpt}", "--prompts", "{words}"], "--prompts {words} line 2: expected space-separated token ids"),
    (["{ckpt}", "--prompts", "{big}"], "--prompts {big} line 1: token id 128 is outside the vocabulary [0, 128)"),
    (["{ckpt}", "--length", "0"], "--length is 0; expected at least 1"),
    (["{ckpt}", "--json", "{missing}/r.json"], "--json {missing}/r.json: no such directory {missing}"),
])
def test_bad_input_is_one_line_naming_the_flag_and_exit_status_2(checkpoint, tmp_path, capsys, argv, message):
    paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "ckpt": checkpoint,
             "words": str(tmp_path / "words.txt"), "big": str(tmp_path / "big.txt")}
    os.mkdir(paths["empty"])
    with open(paths["words"], "w") as f:
        f.write("1 2\nhello world\n")
    with open(paths["big"], "w") as f:
        f.write("1 128\n")
    code, out, err = run_parity(capsys, *[a.format(**paths) for a in argv])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("qwen2-jax parity: error: "), err
    assert message.format(**paths) in err, err


def test_the_package_and_the_command_line_parser_import_without_torch():
    code = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
            "import qwen2_jax, qwen2_jax.tools.parity, qwen2_jax.cli; qwen2_jax.cli.build_parser(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_parity_table_script_prints_a_row_per_configuration():
    proc = subprocess.run([sys.executable, "scripts/parity_table.py", "--configs", "default_topk2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = [line for line in proc.stdout.splitlines() if line.startswith("| default_topk2 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, ratio = float(cells[2]), float(cells[4])
    assert 0 < ours < 1e-6 and ratio <= 2.0, row
