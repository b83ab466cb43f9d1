"""config.json in both transformers schemas is read with every field that changes the computation; fields we do
not implement are refused with an error naming them."""

import json

import pytest

from qwen2_jax.model.config import ConfigError, Qwen2MoeConfig

REAL_4X = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936, "eos_token_id": 151643,
    "max_position_embeddings": 32768, "router_aux_loss_coef": 0.001,
}


def test_reads_the_real_4x_config_of_qwen2_57b():
    cfg = Qwen2MoeConfig.from_dict(REAL_4X)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.num_key_value_heads) == (3584, 28, 128, 4)
    assert cfg.rope_theta == 1e6 and cfg.rope_type == "default" and cfg.qkv_bias  # 4.x Qwen2-MoE always had QKV bias
    assert cfg.sparse_layers == (True,) * 28 and cfg.eos_token_id == (151643,)


def test_4x_rope_scaling_yarn_with_type_or_rope_type_key():
    for key in ("type", "rope_type"):
        cfg = Qwen2MoeConfig.from_dict({**REAL_4X, "rope_scaling": {key: "yarn", "factor": 2.0,
                                                                    "original_max_position_embeddings": 32768}})
        assert cfg.rope_type == "yarn" and cfg.rope_factor == 2.0 and cfg.original_max_position_embeddings == 32768
        assert cfg.attention_factor == pytest.approx(0.1 * __import__("math").log(2.0) + 1.0)


def test_5x_rope_parameters_layer_types_and_qkv_bias():
    raw = {**REAL_4X, "qkv_bias": False, "layer_types": ["full_attention"] * 28,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                               "original_max_position_embeddings": 8192, "beta_fast": 16, "beta_slow": 2,
                               "attention_factor": 1.25}}
    del raw["rope_theta"]
    cfg = Qwen2MoeConfig.from_dict(raw)
    assert not cfg.qkv_bias and cfg.rope_theta == 5e5 and cfg.rope_factor == 4.0
    assert (cfg.beta_fast, cfg.beta_slow, cfg.attention_factor) == (16.0, 2.0, 1.25)


def test_mixed_layers_follow_mlp_only_layers_and_decoder_sparse_step():
    cfg = Qwen2MoeConfig.from_dict({**REAL_4X, "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert cfg.sparse_layers == (False, True, False, False, False, True)
    assert (cfg.num_sparse_layers, cfg.num_dense_layers) == (2, 4)


@pytest.mark.parametrize("field, value, named", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "qwen2", "model_type"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "linear"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
    ("layer_types", ["sliding_attention"] * 28, "layer_types"),
    ("num_experts_per_tok", 65, "num_experts_per_tok"),
    ("num_key_value_heads", 5, "num_key_value_heads"),
])
def test_unsupported_fields_are_refused_by_name(field, value, named):
    with pytest.raises(ConfigError, match=named):
        Qwen2MoeConfig.from_dict({**REAL_4X, field: value})


def test_bad_config_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=str(tmp_path)):
        Qwen2MoeConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen2MoeConfig.from_json(tmp_path / "missing")


def test_to_hf_dict_round_trips():
    cfg = Qwen2MoeConfig.from_dict({**REAL_4X, "rope_scaling": {"type": "yarn", "factor": 2.0,
                                                                "original_max_position_embeddings": 32768}})
    assert Qwen2MoeConfig.from_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
