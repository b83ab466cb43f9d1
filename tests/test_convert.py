"""The converter: an HF directory becomes an Orbax checkpoint that restores to exactly the same parameters,
bad input is refused before anything is written (one line through the CLI, nothing left on disk), and a
conversion killed mid-way leaves nothing loadable."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import qwen2_jax
import qwen2_jax.cli
from hf_reference import TINY, make_hf_model, save_hf
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.convert import convert, restore_params, write_hf_checkpoint
from qwen2_jax.model.hf_files import CheckpointError
from qwen2_jax.model.params import iter_params, load_hf, lookup, nest

IDS = np.array([[3, 17, 99, 4, 56, 120, 7, 1], [8, 8, 2, 77, 31, 5, 64, 90]])
TINY_CFG = Qwen2MoeConfig.from_dict({"model_type": "qwen2_moe", **TINY})

# The CLI with only its convert subcommand, so that these tests do not depend on the other subcommands' modules.
CLI = ("import sys; from qwen2_jax import cli; cli.COMMANDS = {'convert': cli.COMMANDS['convert']}; "
       "sys.exit(cli.main())")


@pytest.fixture(autouse=True)
def only_convert_subcommand(monkeypatch):
    monkeypatch.setattr(qwen2_jax.cli, "COMMANDS", {"convert": qwen2_jax.cli.COMMANDS["convert"]})


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # one dense (MLP-only) layer among the MoE layers, so both kinds of layer are converted
    return save_hf(make_hf_model(seed=3, mlp_only_layers=[1]), tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "out"
    convert(hf_dir, out, progress=False)
    return out


def _flat(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _leftovers(parent, name="out"):
    """What a conversion to parent/name left: the directory itself or any temporary beside it."""
    return sorted(p for p in os.listdir(parent) if p == name or p.startswith(f".{name}."))


# ---- round trips ------------------------------------------------------------------------------------------
def test_round_trip_float32_logits_are_bitwise_equal_to_loading_the_hf_directory(hf_dir, converted):
    direct = qwen2_jax.from_pretrained(hf_dir, dtype="float32")
    restored = qwen2_jax.from_pretrained(converted, dtype="float32")
    np.testing.assert_array_equal(np.asarray(restored(IDS)), np.asarray(direct(IDS)))


def test_sharded_hf_input_converts_to_the_same_parameters(hf_dir, tmp_path):
    sharded = save_hf(make_hf_model(seed=3, mlp_only_layers=[1]), tmp_path / "hf", max_shard_size="20KB")
    assert os.path.exists(f"{sharded}/model.safetensors.index.json")
    meta = convert(sharded, tmp_path / "out", progress=False)
    assert len(meta["source"]["files"]) > 3
    cfg = Qwen2MoeConfig.from_json(hf_dir)
    _assert_same_params(restore_params(tmp_path / "out", cfg, jnp.float32), load_hf(hf_dir, cfg, jnp.float32))


def test_bfloat16_source_is_stored_as_bfloat16_and_restores_as_float32_exactly(tmp_path):
    hf_bf16 = save_hf(make_hf_model(seed=4).to(torch.bfloat16), tmp_path / "hf")
    meta = convert(hf_bf16, tmp_path / "out", progress=False)
    assert meta["dtype"] == "bfloat16" and meta["source"]["dtypes"] == ["bfloat16"]
    cfg = Qwen2MoeConfig.from_json(hf_bf16)
    # the same arrays as loading the HF directory (so the same logits: the model code is shared)
    _assert_same_params(restore_params(tmp_path / "out", cfg, jnp.float32), load_hf(hf_bf16, cfg, jnp.float32))


@pytest.mark.parametrize("stored", [None, "bfloat16"])
def test_restoring_as_bfloat16_rounds_exactly_like_loading_hf_in_bfloat16(hf_dir, tmp_path, stored):
    convert(hf_dir, tmp_path / "out", dtype=stored, progress=False)
    cfg = Qwen2MoeConfig.from_json(hf_dir)
    _assert_same_params(restore_params(tmp_path / "out", cfg, jnp.bfloat16), load_hf(hf_dir, cfg, jnp.bfloat16))


def test_float32_conversion_of_a_bfloat16_source_widens_every_weight(tmp_path):
    hf_bf16 = save_hf(make_hf_model(seed=4).to(torch.bfloat16), tmp_path / "hf")
    meta = convert(hf_bf16, tmp_path / "out", dtype="float32", progress=False)
    assert meta["dtype"] == "float32"
    assert {p["dtype"] for p in meta["params"].values()} == {"float32"}


def test_restore_places_each_array_in_its_requested_sharding(converted):
    cfg = Qwen2MoeConfig.from_json(converted)
    mesh = jax.make_mesh((1,), ("x",))
    shardings = {p.path: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*(("x",) + (None,) * (len(s) - 1))))
                 for p, s in iter_params(cfg)}
    tree = restore_params(converted, cfg, jnp.float32, shardings)
    for p, _ in iter_params(cfg):
        assert lookup(tree, p.path).sharding == shardings[p.path]


def test_restore_splits_arrays_over_devices_each_holding_its_own_slice(converted, tmp_path):
    # A fresh process with 4 CPU devices: experts split 4 ways, other 3-D weights 2 x 2 over their last two axes.
    script = f"""
import jax, numpy as np, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.convert import restore_params
from qwen2_jax.model.params import iter_params, load_hf, lookup
cfg = Qwen2MoeConfig.from_json({str(converted)!r})
mesh = jax.make_mesh((2, 2), ("a", "b"))
def spec(p, shape):
    if "experts" in p.path:
        return P(("a", "b"))
    return P("a", "b") if len(shape) == 2 and shape[0] % 2 == 0 and shape[1] % 2 == 0 else P()
shardings = {{p.path: NamedSharding(mesh, spec(p, s)) for p, s in iter_params(cfg)}}
tree = restore_params({str(converted)!r}, cfg, jnp.float32, shardings)
for p, s in iter_params(cfg):
    node = lookup(tree, p.path)
    assert node.sharding == shardings[p.path], p.path
    whole = np.asarray(node)
    for shard in node.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index])
    if "experts" in p.path:
        assert {{shard.data.shape[0] for shard in node.addressable_shards}} == {{s[0] // 4}}
print("ok", len(jax.devices()))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "4"]


def test_from_pretrained_restores_a_converted_directory_onto_a_mesh(hf_dir, converted):
    from flax import nnx

    from qwen2_jax.sharding import make_mesh, param_shardings

    mesh = make_mesh("data=1,expert=1,tensor=1")
    model = qwen2_jax.from_pretrained(converted, dtype="float32", mesh=mesh)
    cfg = Qwen2MoeConfig.from_json(converted)
    shardings = param_shardings(cfg, mesh)
    tree = nnx.to_pure_dict(nnx.state(model))
    for p, _ in iter_params(cfg):
        assert lookup(tree, p.path).sharding == shardings[p.path], p.path
    _assert_same_params(tree, load_hf(hf_dir, cfg, jnp.float32))


def test_restore_refuses_a_checkpoint_that_does_not_match_config_json(converted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    raw = json.loads((copy / "config.json").read_text())
    raw["moe_intermediate_size"] = 48
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"parameter model/layers/0/mlp/experts/gate_up_proj has shape "
                                              r"\[8, 2, 32, 64\], expected \[8, 2, 48, 64\] from config.json"):
        qwen2_jax.from_pretrained(copy, dtype="float32")


AGAIN = r"; if another qwen2-jax version converted it, convert it again with this one \("


def test_restore_names_a_parameter_the_checkpoint_lacks_and_says_to_convert_again(converted, monkeypatch):
    # As if this release stored lm_head under another name than the release that converted the checkpoint.
    from qwen2_jax.convert import converter

    def renamed(cfg):
        for p, shape in iter_params(cfg):
            yield (dataclasses.replace(p, path=("lm_head", "kernel")) if p.path == ("lm_head", "weight") else p), shape

    monkeypatch.setattr(converter, "iter_params", renamed)
    with pytest.raises(CheckpointError, match=r"missing parameter lm_head/kernel \(expected shape \[\d+, \d+\]\)" + AGAIN):
        qwen2_jax.from_pretrained(converted, dtype="float32")


@pytest.mark.parametrize("layout,was", [(1, r"the routed experts \[experts, in, out\]"),
                                        (2, r"the routed experts' gate_proj and up_proj in stacks of their own")])
def test_a_checkpoint_of_an_earlier_expert_layout_is_refused_with_convert_again(converted, tmp_path, layout, was):
    """Releases of parameter layout 1 stacked the routed experts [experts, in, out] and recorded no layout; layout 2
    stacked gate_proj and up_proj apart. For a square expert layout 1 has the same paths and shapes, so the recorded
    layout decides."""
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    meta = json.loads((copy / "qwen2_jax.json").read_text())
    assert meta["layout_version"] == 3
    if layout == 1:
        del meta["layout_version"]
    else:
        meta["layout_version"] = layout
    (copy / "qwen2_jax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"stored in parameter layout {layout} \({was}\), "
                                              r"this version reads layout 3" + AGAIN):
        qwen2_jax.from_pretrained(copy, dtype="float32")


def test_a_checkpoint_of_the_stacked_layout_of_earlier_releases_is_refused_with_convert_again(hf_dir, tmp_path):
    """Releases before the per-layer layout stored every layer's weight in one [layers, ...] stack under the
    layer-less path (model/layers/self_attn/q_proj/kernel); such a checkpoint must be converted again."""
    from qwen2_jax.convert import orbax_io

    cfg = Qwen2MoeConfig.from_json(hf_dir)
    L, H = cfg.num_hidden_layers, cfg.hidden_size

    def source(name, shape):
        return orbax_io.Source(name=name, shape=shape, dtype=np.dtype(np.float32), block_shape=shape,
                               read_chunk_shape=shape, read=lambda index, shape=shape: np.zeros(shape, np.float32)[index])

    old = {"model": {"embed_tokens": {"embedding": source("embedding", (cfg.vocab_size, H))},
                     "layers": {"input_layernorm": {"weight": source("norm", (L, H))},
                                "self_attn": {"q_proj": {"kernel": source("q", (L, H, H))}}},
                     "norm": {"weight": source("final", (H,))}}}
    out = tmp_path / "old"
    orbax_io.save(str(out / "params"), old)
    shutil.copy(os.path.join(hf_dir, "config.json"), out / "config.json")
    with pytest.raises(CheckpointError, match=r"missing parameter model/layers/0/input_layernorm/weight .*"
                                              + AGAIN) as e:
        qwen2_jax.from_pretrained(out, dtype="float32")
    assert "\n" not in str(e.value)


def test_restore_names_a_parameter_the_layout_does_not_know_and_says_to_convert_again(converted, monkeypatch):
    from qwen2_jax.convert import converter

    real = converter.orbax_io.stored_shapes
    monkeypatch.setattr(converter.orbax_io, "stored_shapes",
                        lambda d: {**real(d), ("lm_head", "kernel"): real(d)[("lm_head", "weight")]})
    with pytest.raises(CheckpointError, match=r"unexpected parameter lm_head/kernel \(not used by config.json\)" + AGAIN):
        qwen2_jax.from_pretrained(converted, dtype="float32")


# ---- the output directory -----------------------------------------------------------------------------------
def test_output_holds_config_generation_config_tokenizer_files_and_metadata(hf_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    extras = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": '{"eos_token": "<|im_end|>"}',
              "vocab.json": '{"a": 0}', "merges.txt": "#version: 0.2\na b\n", "special_tokens_map.json": "{}"}
    for name, text in extras.items():
        (src / name).write_text(text)
    meta = convert(src, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ["config.json", "generation_config.json", *extras]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    on_disk = json.loads((out / "qwen2_jax.json").read_text())
    assert on_disk["qwen2_jax_version"] == qwen2_jax.__version__
    assert on_disk["dtype"] == "float32"
    assert on_disk["source"]["files"] == [{"name": "model.safetensors", "bytes": os.path.getsize(src / "model.safetensors")}]
    assert on_disk["params"]["model/layers/2/mlp/experts/gate_up_proj"] == {"shape": [8, 2, 32, 64], "dtype": "float32"}
    assert on_disk["params"]["model/layers/1/mlp/up_proj/weight"] == {"shape": [96, 64], "dtype": "float32"}
    assert {k: v for k, v in meta.items() if k != "seconds"} == on_disk
    assert sorted(os.listdir(out / "params")) and "_METADATA" in os.listdir(out / "params")


def test_progress_bar_counts_tensors_and_bytes_when_asked(hf_dir, tmp_path, capsys):
    meta = convert(hf_dir, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    n = meta["source"]["tensors"]
    assert f"tensors {n}/{n}" in err and "converting" in err


def test_force_replaces_an_existing_output_and_leaves_no_temporary(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    assert qwen2_jax.cli.main(["convert", str(hf_dir), str(tmp_path / "out"), "--force"]) == 0
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert _leftovers(tmp_path) == ["out"]
    qwen2_jax.from_pretrained(tmp_path / "out", dtype="float32")


def test_output_inside_which_the_source_lives_is_refused(hf_dir, tmp_path):
    src = tmp_path / "outer" / "hf"
    shutil.copytree(hf_dir, src)
    with pytest.raises(ValueError, match="contains the source checkpoint"):
        convert(src, tmp_path / "outer", force=True, progress=False)
    assert (src / "model.safetensors").exists()


# ---- bad input through the CLI ------------------------------------------------------------------------------
def _edit_tensors(edit):
    def apply(d):
        tensors = load_file(f"{d}/model.safetensors")
        edit(tensors)
        save_file(tensors, f"{d}/model.safetensors", metadata={"format": "pt"})
    return apply


def _edit_config(**changes):
    def apply(d):
        raw = json.loads((d / "config.json").read_text())
        raw.update(changes)
        (d / "config.json").write_text(json.dumps(raw))
    return apply


def _truncate(d):
    f = d / "model.safetensors"
    os.truncate(f, os.path.getsize(f) - 100)


def _corrupt_header(d):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))


def _set(name, value):
    return _edit_tensors(lambda t: t.__setitem__(name, value))


BAD_INPUTS = {
    "truncated_file": (_truncate, r"model\.safetensors: truncated safetensors file: tensor '.*' ends at byte"),
    "corrupt_header": (_corrupt_header, r"model\.safetensors: corrupt safetensors header"),
    "missing_tensor": (_edit_tensors(lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight")),
                       r"missing tensor model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight \(expected shape \[64, 32\]\)"),
    "extra_tensor": (_set("model.layers.0.mlp.experts.8.up_proj.weight", np.zeros((32, 64), np.float32)),
                     r"model\.safetensors: unexpected tensor model\.layers\.0\.mlp\.experts\.8\.up_proj\.weight \[32, 64\]"),
    "wrong_shape": (_set("model.layers.1.self_attn.k_proj.weight", np.zeros((32, 60), np.float32)),
                    r"tensor model\.layers\.1\.self_attn\.k_proj\.weight has shape \[32, 60\], expected \[32, 64\]"),
    "integer_dtype": (_set("model.norm.weight", np.ones((64,), np.int32)),
                      r"tensor model\.norm\.weight has dtype I32, expected a float dtype"),
    "weights_do_not_match_config": (_edit_config(moe_intermediate_size=48),
                                    r"tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight has shape \[32, 64\], "
                                    r"expected \[48, 64\] from config\.json"),
    "unsupported_model_type": (_edit_config(model_type="llama"), r"config\.json: model_type is 'llama'; only 'qwen2_moe'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_nonzero_with_one_line_and_leaves_nothing(hf_dir, tmp_path, capsys, case):
    damage, message = BAD_INPUTS[case]
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    damage(src)
    code = qwen2_jax.cli.main(["convert", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qwen2-jax convert: error: ")
    assert re.search(message, err), err
    assert _leftovers(tmp_path) == []


def test_existing_output_is_refused_without_force(hf_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert qwen2_jax.cli.main(["convert", str(hf_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"{tmp_path / 'out'}: already exists (use --force to replace it)" in err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    assert _leftovers(tmp_path) == ["out"]


def test_destination_under_a_file_is_refused_with_one_line(hf_dir, tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file, not a directory")
    out = tmp_path / "blocker" / "out"
    assert qwen2_jax.cli.main(["convert", str(hf_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"{out}: cannot create the output beside it in {tmp_path / 'blocker'} (Not a directory)" in err
    assert sorted(os.listdir(tmp_path)) == ["blocker"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_destination_is_refused_with_one_line(hf_dir, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert qwen2_jax.cli.main(["convert", str(hf_dir), str(parent / "out")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Permission denied" in err
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o755)


def test_cli_process_exits_with_one_line_and_no_traceback(hf_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    BAD_INPUTS["missing_tensor"][0](src)
    proc = subprocess.run([sys.executable, "-c", CLI, "convert", str(src), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "qwen2-jax convert: error: missing tensor model.layers.2.mlp.experts.5.down_proj.weight (expected shape [64, 32])"]
    assert _leftovers(tmp_path) == []


def test_cli_success_prints_one_summary_line_and_no_progress_when_stderr_is_not_a_terminal(hf_dir, tmp_path, capsys):
    assert qwen2_jax.cli.main(["convert", str(hf_dir), str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert re.fullmatch(rf"converted \d+ tensors, [0-9.]+ MB \(float32\) in [0-9.]+ s \([0-9.]+ [MG]B/s\) -> "
                        rf"{re.escape(str(tmp_path / 'out'))}\n", out), out


# ---- interrupted conversion ---------------------------------------------------------------------------------
def _big_enough_config():
    """About 400 MB of float32: a conversion that takes seconds, so it can be killed in the middle."""
    return Qwen2MoeConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                          shared_expert_intermediate_size=512, num_hidden_layers=10, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=2)


def _bytes_under(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except FileNotFoundError:  # renamed or removed by the running conversion meanwhile
                pass
    return total


@pytest.mark.slow
def test_killed_conversion_leaves_nothing_loadable_and_a_rerun_succeeds(tmp_path):
    cfg = _big_enough_config()
    src = tmp_path / "hf"
    write_hf_checkpoint(cfg, src, max_shard_bytes=100 << 20)
    total = _bytes_under(src)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", CLI, "convert", str(src), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            temps = [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp-")]
            if temps and _bytes_under(tmp_path / temps[0]) > total // 4:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert not out.exists()
    for leftover in _leftovers(tmp_path):
        with pytest.raises((CheckpointError, ValueError, FileNotFoundError)):
            qwen2_jax.from_pretrained(tmp_path / leftover, dtype="float32")
    assert _leftovers(tmp_path)  # the killed run's temporary directory, to be cleaned by the rerun

    convert(src, out, progress=False)
    assert _leftovers(tmp_path) == ["out"]
    _assert_same_params(restore_params(out, cfg, jnp.float32), load_hf(str(src), cfg, jnp.float32))
    shutil.rmtree(src)  # pytest keeps recent temporary directories; these are 340 MB each
    shutil.rmtree(out)


# ---- synthetic HF checkpoints without torch -----------------------------------------------------------------
def test_written_hf_checkpoint_loads_in_transformers_with_matching_logits(tmp_path):
    from transformers import Qwen2MoeForCausalLM

    cfg = TINY_CFG.replace(mlp_only_layers=(0,))
    rng = np.random.default_rng(7)
    params: dict = {}
    for p, shape in iter_params(cfg):
        # router weights wide, so that top-k does not hinge on rounding; norms near one
        std = 1.0 if p.path[-2] == "gate" else 0.1 if "norm" in p.path[-2] else 0.05
        params[p.path] = ((1.0 if "norm" in p.path[-2] else 0.0) + std * rng.standard_normal(shape)).astype(np.float32)
    params = nest(params.items())
    write_hf_checkpoint(cfg, tmp_path / "hf", params=params)
    _assert_same_params(load_hf(str(tmp_path / "hf"), cfg, jnp.float32), params)
    hf = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(IDS)).logits.numpy()
    ours = qwen2_jax.from_pretrained(tmp_path / "hf", dtype="float32")
    np.testing.assert_allclose(np.asarray(ours(IDS)), ref, rtol=1e-4, atol=1e-5)


def test_written_checkpoint_sharded_in_bfloat16_has_an_index_and_reads_back(tmp_path):
    from safetensors import safe_open

    cfg = TINY_CFG
    files = write_hf_checkpoint(cfg, tmp_path / "hf", dtype="bfloat16", seed=1, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == [os.path.basename(f) for f in files]
    assert not [f for f in os.listdir(tmp_path / "hf") if ".tmp-" in f]
    ours = load_hf(str(tmp_path / "hf"), cfg, jnp.float32)
    names = {}
    for f in files:
        with safe_open(f, framework="pt") as st:  # the reference reader accepts our files
            for name in st.keys():
                names[name] = st.get_tensor(name)
    assert names["model.norm.weight"].dtype == torch.bfloat16
    np.testing.assert_array_equal(names["model.norm.weight"].float().numpy(), np.ones(64, np.float32))
    gate = names["model.layers.1.mlp.experts.6.gate_proj.weight"].float().numpy()
    up = names["model.layers.1.mlp.experts.6.up_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.stack([gate, up]),
                                  np.asarray(ours["model"]["layers"][1]["mlp"]["experts"]["gate_up_proj"][6]))
    assert 0.015 < gate.std() < 0.025


def test_random_weights_do_not_depend_on_how_the_files_are_sharded(tmp_path):
    cfg = TINY_CFG
    write_hf_checkpoint(cfg, tmp_path / "one", seed=2)
    write_hf_checkpoint(cfg, tmp_path / "many", seed=2, max_shard_bytes=50_000)
    _assert_same_params(load_hf(str(tmp_path / "one"), cfg, jnp.float32), load_hf(str(tmp_path / "many"), cfg, jnp.float32))
