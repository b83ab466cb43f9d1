"""Model configuration, read from a Hugging Face ``config.json`` (transformers 4.x or 5.x schema).

Every field that changes the computation is kept; a field whose value we do not implement is refused with
an error that names it, so a checkpoint never silently runs as a different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from qwen2_jax.errors import Qwen2JaxError
from .quant import QUANT_METHOD, QuantConfig


class ConfigError(Qwen2JaxError):
    """A config.json this port cannot run exactly. The message names the field and the value."""


@dataclasses.dataclass(frozen=True)
class Qwen2MoeConfig:
    vocab_size: int = 151936
    hidden_size: int = 3584
    intermediate_size: int = 18944  # dense MLP layers only
    moe_intermediate_size: int = 2560
    shared_expert_intermediate_size: int = 20480
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    qkv_bias: bool = True
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    # RoPE: "default" or static "yarn" (the YaRN fields are unused for "default").
    rope_theta: float = 1e6
    rope_type: str = "default"
    rope_factor: float = 1.0
    original_max_position_embeddings: int = 32768
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # resolved from factor/mscale when the config leaves it out
    rope_truncate: bool = True
    router_aux_loss_coef: float = 0.001
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Weight-only quantization of a checkpoint this port quantized (config.json's quantization_config); None: float.
    quantization: QuantConfig | None = None

    # ---- derived structure -------------------------------------------------------------------------
    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer: True where HF builds a ``Qwen2MoeSparseMoeBlock``, False for a dense ``Qwen2MoeMLP``."""
        return tuple(
            i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_hidden_layers)
        )

    @property
    def context_length(self) -> int:
        """Tokens a sequence may hold: ``max_position_embeddings``, or with static YaRN the original context
        times the factor (the model card's 65,536 = 32,768 x 2; its config.json keeps 32,768 as
        ``max_position_embeddings``), whichever is larger."""
        if self.rope_type == "yarn":
            return max(self.max_position_embeddings, int(self.original_max_position_embeddings * self.rope_factor))
        return self.max_position_embeddings

    @property
    def num_sparse_layers(self) -> int:
        return sum(self.sparse_layers)

    @property
    def num_dense_layers(self) -> int:
        return self.num_hidden_layers - self.num_sparse_layers

    def replace(self, **changes: Any) -> "Qwen2MoeConfig":
        return dataclasses.replace(self, **changes)

    # ---- reading and writing -------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Qwen2MoeConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except (IsADirectoryError, NotADirectoryError) as e:
            raise ConfigError(f"{path}: cannot read config.json ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen2MoeConfig":
        model_type = raw.get("model_type")
        if model_type != "qwen2_moe":
            raise ConfigError(f"model_type is {model_type!r}; only 'qwen2_moe' is supported")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act is {act!r}; only 'silu' is supported")
        if _bool("use_sliding_window", raw.get("use_sliding_window"), False):
            raise ConfigError("use_sliding_window is true; sliding-window attention is not supported")

        fields: dict[str, Any] = {}
        for name, minimum in INT_MINIMUMS.items():
            if raw.get(name) is not None and name in CONFIG_JSON_INTS:
                fields[name] = _int(name, raw[name], minimum)
        layer_types = raw.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list):
                raise ConfigError(f"layer_types is {_show(layer_types)}; expected a list with one entry per layer")
            other = sorted({str(t) for t in layer_types if t != "full_attention"})
            if other:
                raise ConfigError(f"layer_types contains {other}; only 'full_attention' is supported")
            layers = fields.get("num_hidden_layers", cls.num_hidden_layers)
            if len(layer_types) != layers:  # as transformers' validate_layer_type
                raise ConfigError(f"layer_types has {len(layer_types)} entries; expected one per layer "
                                  f"(num_hidden_layers {layers})")
        # transformers: a missing (null) num_key_value_heads means one per query head (multi-head attention)
        fields.setdefault("num_key_value_heads", fields.get("num_attention_heads", cls.num_attention_heads))
        for name in ("norm_topk_prob", "qkv_bias", "tie_word_embeddings"):
            if raw.get(name) is not None:
                fields[name] = _bool(name, raw[name])
        for name in ("rms_norm_eps", "router_aux_loss_coef"):
            if raw.get(name) is not None:
                fields[name] = _number(name, raw[name], *FLOAT_RANGES[name])
        mlp_only = raw.get("mlp_only_layers")
        if mlp_only is not None and not isinstance(mlp_only, list):
            raise ConfigError(f"mlp_only_layers is {_show(mlp_only)}; expected a list of layer indices, e.g. [] or [0, 3]")
        fields["mlp_only_layers"] = tuple(_int("mlp_only_layers entry", i, 0) for i in mlp_only or ())
        if raw.get("head_dim") is None:  # as transformers: hidden_size / num_attention_heads
            heads = fields.get("num_attention_heads", cls.num_attention_heads)
            fields["head_dim"] = fields.get("hidden_size", cls.hidden_size) // heads
            if fields["head_dim"] < 2:
                raise ConfigError(f"head_dim (hidden_size {fields.get('hidden_size', cls.hidden_size)} // "
                                  f"num_attention_heads {heads}) is {fields['head_dim']}; expected at least 2")
        for name in ("bos_token_id", "pad_token_id"):
            if raw.get(name) is not None:  # Hub configs hold ids such as -1: only the type is checked
                fields[name] = _int(name, raw[name], None)
        eos = raw.get("eos_token_id")
        fields["eos_token_id"] = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        fields.update(_rope_fields(raw, fields.get("max_position_embeddings", cls.max_position_embeddings)))
        if raw.get("quantization_config") is not None:
            fields["quantization"] = _quantization(raw["quantization_config"])
        cfg = cls(**fields)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """A ConfigError naming the first field of the wrong type, out of range or inconsistent with another."""
        for name, minimum in INT_MINIMUMS.items():
            _int(name, getattr(self, name), minimum)
        for name in ("norm_topk_prob", "qkv_bias", "tie_word_embeddings", "rope_truncate"):
            _bool(name, getattr(self, name))
        for name, (low, low_ok) in FLOAT_RANGES.items():
            _number(name, getattr(self, name), low, low_ok)
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), None)
        if not isinstance(self.mlp_only_layers, tuple):
            raise ConfigError(f"mlp_only_layers is {_show(self.mlp_only_layers)}; expected a tuple of layer indices")
        for i in self.mlp_only_layers:
            _int("mlp_only_layers entry", i, 0)
        if not isinstance(self.eos_token_id, tuple):
            raise ConfigError(f"eos_token_id is {_show(self.eos_token_id)}; expected a tuple of token ids")
        for e in self.eos_token_id:  # generation keeps the end tokens in an int32 array
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < 2**31:
                raise ConfigError(f"eos_token_id holds {_show(e)}; expected token ids: integers in [0, 2**31)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"mlp_only_layers {bad} outside [0, {self.num_hidden_layers})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style config.json for this model (used when we write checkpoints ourselves)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "yarn":
            rope.update(factor=self.rope_factor, original_max_position_embeddings=self.original_max_position_embeddings,
                        beta_fast=self.beta_fast, beta_slow=self.beta_slow, attention_factor=self.attention_factor,
                        truncate=self.rope_truncate)
        return {
            "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "moe_intermediate_size": self.moe_intermediate_size,
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "norm_topk_prob": self.norm_topk_prob, "decoder_sparse_step": self.decoder_sparse_step,
            "mlp_only_layers": list(self.mlp_only_layers), "qkv_bias": self.qkv_bias,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "rope_parameters": rope,
            "router_aux_loss_coef": self.router_aux_loss_coef, "use_sliding_window": False,
            "bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            **({"quantization_config": self.quantization.to_json()} if self.quantization else {}),
        }


def _quantization(raw) -> QuantConfig:
    """quantization_config as this port writes it (``qwen2-jax convert --quantize``); another method (GPTQ, AWQ,
    ...) stores its weights differently and is refused."""
    if not isinstance(raw, dict):
        raise ConfigError(f"quantization_config is {_show(raw)}; expected an object")
    method = raw.get("quant_method")
    if method != QUANT_METHOD:
        raise ConfigError(f"quantization_config.quant_method is {_show(method)}; only {QUANT_METHOD!r} (qwen2-jax "
                          "convert --quantize) is supported: convert the float checkpoint instead")
    try:
        return QuantConfig(dtype=raw.get("dtype"), block=raw.get("block", 0), lm_head=raw.get("lm_head", False))
    except Qwen2JaxError as e:
        raise ConfigError(f"quantization_config: {e}") from None


EMBEDDED = {
    "qwen2-57b-a14b-instruct": "qwen2-57b-a14b-instruct.json",  # the real model's config.json (4.x schema)
    # the same with the model card's static YaRN for 65,536 tokens (factor 2 over 32,768)
    "qwen2-57b-a14b-instruct-yarn": "qwen2-57b-a14b-instruct-yarn.json",
    "qwen2-57b-a14b-quarter": "qwen2-57b-a14b-quarter.json",  # the fixed CPU benchmark config (1.15 B params)
}


def embedded_config_path(name: str) -> str:
    """Path of a config shipped with the package (see qwen2_jax/configs/)."""
    if name not in EMBEDDED:
        raise ConfigError(f"no embedded config {name!r}; known: {sorted(EMBEDDED)}")
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", EMBEDDED[name])  # qwen2_jax/configs


def load_config(name_or_path: str) -> Qwen2MoeConfig:
    """An embedded config by name, or a config.json (or its directory) by path."""
    return Qwen2MoeConfig.from_json(embedded_config_path(name_or_path) if name_or_path in EMBEDDED else name_or_path)


# The smallest value of each integer field: no size can be 0, except the number of experts (0: all dense).
INT_MINIMUMS = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "moe_intermediate_size": 1,
    "shared_expert_intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
    "head_dim": 2, "num_experts": 0, "num_experts_per_tok": 1, "decoder_sparse_step": 1,
    "max_position_embeddings": 1, "original_max_position_embeddings": 1,
}
CONFIG_JSON_INTS = set(INT_MINIMUMS) - {"original_max_position_embeddings"}  # that one is read with RoPE
# (lower bound, whether the bound itself is allowed) of each float field; all must be finite.
FLOAT_RANGES = {
    "rms_norm_eps": (0.0, False), "router_aux_loss_coef": (0.0, True), "rope_theta": (0.0, False),
    "rope_factor": (0.0, False), "beta_fast": (-math.inf, False), "beta_slow": (-math.inf, False),
    "attention_factor": (0.0, False),
}


def _int(name: str, value: Any, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(f"{name} is {_show(value)}; expected {expected}")
    return value


def _bool(name: str, value: Any, default: bool | None = None) -> bool:
    value = default if value is None else value
    if not isinstance(value, bool):  # bool("false") is True: a string would silently mean the opposite
        raise ConfigError(f"{name} is {_show(value)}; expected true or false")
    return value


def _number(name: str, value: Any, low: float = -math.inf, low_ok: bool = True) -> float:
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond float range
        number = math.nan
    if not math.isfinite(number) or number < low or (number == low and not low_ok):
        bound = "" if low == -math.inf else f" {'>=' if low_ok else '>'} {low:g}"
        raise ConfigError(f"{name} is {_show(value)}; expected a finite number{bound}")
    return number


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."  # the error stays one readable line


def _rope_fields(raw: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """RoPE settings from either schema: 5.x ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``."""
    for name in ("rope_parameters", "rope_scaling"):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ConfigError(f"{name} is {_show(raw[name])}; expected an object such as "
                              '{"rope_type": "default", "rope_theta": 1000000.0}')
    params = raw.get("rope_parameters")
    if params is not None and any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("rope_parameters is nested per layer type; only one global RoPE is supported")
    where = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"  # to name a field inside it
    params = dict(params or raw.get("rope_scaling") or {})
    theta = _number("rope_theta", params.get("rope_theta", raw.get("rope_theta", 10000.0)), 0.0, False)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default' and static 'yarn')")
    if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise ConfigError("partial_rotary_factor is not 1.0; partial rotary embeddings are not supported")
    out: dict[str, Any] = {"rope_theta": theta, "rope_type": rope_type}
    if rope_type == "yarn":
        # Mirrors transformers' _compute_yarn_parameters (5.x) so that the frequencies are bit-for-bit the same.
        original = _int("original_max_position_embeddings", raw.get("original_max_position_embeddings")
                        or params.get("original_max_position_embeddings") or max_positions, 1)
        factor = params.get("factor")
        factor = _number(f"{where}.factor", factor, 0.0, False) if factor is not None else max_positions / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                mscale, mscale_all_dim = _number(f"{where}.mscale", mscale), _number(f"{where}.mscale_all_dim",
                                                                                      mscale_all_dim)
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        out.update(
            rope_factor=factor, original_max_position_embeddings=original,
            beta_fast=_number(f"{where}.beta_fast", params.get("beta_fast") or 32),
            beta_slow=_number(f"{where}.beta_slow", params.get("beta_slow") or 1),
            attention_factor=_number(f"{where}.attention_factor", attention_factor, 0.0, False),
            rope_truncate=_bool(f"{where}.truncate", params.get("truncate"), True),
        )
    return out


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
