"""Loading an HF directory refuses a checkpoint that does not match its config.json, naming the tensor and the
expected and actual shapes."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen2_jax
from hf_reference import make_hf_model, save_hf
from qwen2_jax.model.hf_files import CheckpointError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf(make_hf_model(seed=1), tmp_path_factory.mktemp("hf"))


def _rewrite(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    edit(tensors)
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named_with_its_expected_shape(hf_dir, tmp_path):
    d = _rewrite(hf_dir, tmp_path / "d", lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight "
                                              r"\(expected shape \[32, 64\]\)"):
        qwen2_jax.from_pretrained(d, dtype="float32")


def test_misshaped_tensor_names_expected_and_actual_shape(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 60), np.float32)
    d = _rewrite(hf_dir, tmp_path / "d", edit)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight has shape \[64, 60\], expected \[64, 64\]"):
        qwen2_jax.from_pretrained(d, dtype="float32")


def test_extra_tensor_is_named(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.experts.99.up_proj.weight"] = np.zeros((32, 64), np.float32)
    d = _rewrite(hf_dir, tmp_path / "d", edit)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.experts\.99\.up_proj\.weight"):
        qwen2_jax.from_pretrained(d, dtype="float32")


def test_rotary_inv_freq_buffers_are_skipped(hf_dir, tmp_path):
    def edit(t):
        t["model.rotary_emb.inv_freq"] = np.zeros((8,), np.float32)
    qwen2_jax.from_pretrained(_rewrite(hf_dir, tmp_path / "d", edit), dtype="float32")


def test_duplicated_tensor_across_shards_names_both_files(hf_dir, tmp_path):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(hf_dir, d)
    tensors = load_file(f"{d}/model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:10]} | {names[20]: tensors[names[20]]}, f"{d}/a.safetensors")
    save_file({n: tensors[n] for n in names[10:]}, f"{d}/b.safetensors")
    (d / "model.safetensors").unlink()
    weight_map = {n: "a.safetensors" for n in names[:10]} | {n: "b.safetensors" for n in names[10:]}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"tensor {names[20]} is stored twice: in .*a.safetensors and .*b.safetensors"):
        qwen2_jax.from_pretrained(d, dtype="float32")


def test_unsupported_dtype_argument_is_refused(hf_dir):
    with pytest.raises(ValueError, match="dtype 'float16' is not supported"):
        qwen2_jax.from_pretrained(hf_dir, dtype="float16")


def test_a_path_that_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothing: does not exist"):
        qwen2_jax.from_pretrained(tmp_path / "nothing")


def test_generation_config_end_tokens_come_with_the_model(hf_dir, tmp_path):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(hf_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "pad_token_id": 151643}))
    model = qwen2_jax.from_pretrained(d, dtype="float32")
    assert model.generation_config.eos_token_id == (151645, 151643)
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False}))  # as save_pretrained writes it
    assert qwen2_jax.from_pretrained(d, dtype="float32").generation_config.eos_token_id == ()
