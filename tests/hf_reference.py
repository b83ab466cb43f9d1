"""Small random Hugging Face checkpoints (written with ``save_pretrained``) and their reference outputs.

Tests only: this is where torch and transformers are imported, never in the package.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    shared_expert_intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_experts=8, num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=256,
)


def make_hf_model(seed: int = 0, *, router_std: float = 1.0, **overrides) -> Qwen2MoeForCausalLM:
    """A random float32 HF model; the router weights are drawn wider than HF's init so that routing is decisive
    (near-uniform router logits would make top-k depend on rounding noise)."""
    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(**{**TINY, **overrides})
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, router_std)
            elif "norm" in name:
                p.normal_(1.0, 0.1)  # not all ones, so a wrong norm weight would show
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def save_hf(model, directory, *, max_shard_size=None, config_overrides: dict | None = None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if config_overrides is not None:  # e.g. rewrite config.json in the transformers 4.x schema
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            raw = json.load(f)
        for k, v in config_overrides.items():
            if v is None:
                raw.pop(k, None)
            else:
                raw[k] = v
        with open(path, "w") as f:
            json.dump(raw, f)
    return str(directory)


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.as_tensor(attention_mask)
        return model(torch.as_tensor(input_ids), attention_mask=mask).logits.float().numpy()


def hf_greedy(model, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """transformers' greedy ``generate`` (left-padded batch); returns only the new tokens."""
    with torch.no_grad():
        out = model.generate(torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                             min_new_tokens=max_new_tokens)
    return out[:, input_ids.shape[1]:].numpy()


# ---- float64-referenced parity -----------------------------------------------------------------------------
# name -> overrides (of the HF config), rewrite (of config.json, e.g. to the 4.x schema), save (save_pretrained
# options), seq (the sequence length, default DEFAULT_SEQ). Every configuration branch the real checkpoint and its
# variants use, and the numerics that stress them: larger weights (std 0.1, so activations and logits are larger),
# a non-default rms_norm_eps, every YaRN field set explicitly, and positions near max_position_embeddings.
_YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0, "original_max_position_embeddings": 32}
CONFIGS = {
    "default_topk2": dict(),
    "norm_topk_prob": dict(overrides={"norm_topk_prob": True, "num_experts_per_tok": 3}),
    "top1": dict(overrides={"num_experts_per_tok": 1}),
    "mha_ratio1": dict(overrides={"num_attention_heads": 4, "num_key_value_heads": 4}),
    "gqa_ratio7": dict(overrides={"hidden_size": 56, "num_attention_heads": 7, "num_key_value_heads": 1, "head_dim": 8}),
    "mlp_only_layers": dict(overrides={"mlp_only_layers": [0, 2]}),
    "sparse_step2": dict(overrides={"decoder_sparse_step": 2, "num_hidden_layers": 4}),
    "tied_embeddings": dict(overrides={"tie_word_embeddings": True}),
    "no_qkv_bias": dict(overrides={"qkv_bias": False}),
    "yarn": dict(overrides={"rope_parameters": _YARN}),
    "hf4_schema_yarn": dict(
        overrides={"rope_parameters": _YARN},
        rewrite={"rope_parameters": None, "layer_types": None, "qkv_bias": None, "rope_theta": 1e6,
                 "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
                 "transformers_version": "4.40.1"}),
    "sharded_files": dict(save={"max_shard_size": "40KB"}),
    "large_weights": dict(overrides={"initializer_range": 0.1}),
    "rms_norm_eps_1e-3": dict(overrides={"rms_norm_eps": 1e-3}),
    # rope_theta 1e4 and narrow betas put YaRN's ramp across the middle frequencies, where truncate matters.
    "yarn_mscale": dict(overrides={"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 2.0, "mscale_all_dim": 0.5, "beta_fast": 4.0, "beta_slow": 0.5, "truncate": False}}),
    "yarn_attention_factor": dict(overrides={"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 3.0, "original_max_position_embeddings": 32,
        "attention_factor": 1.3, "mscale": 2.0, "mscale_all_dim": 0.5, "beta_fast": 8.0, "beta_slow": 2.0}}),
    # Of max_position_embeddings 256; with std 0.1 weights, as with HF's 0.02 attention is nearly uniform and
    # bfloat16 would not see a position wrong.
    "long_sequence": dict(overrides={"initializer_range": 0.1}, seq=240),
}
DEFAULT_SEQ = 48  # beyond YaRN's 32 original positions


def parity_model(name: str, directory) -> tuple[Qwen2MoeForCausalLM, str]:
    """The random HF model of ``CONFIGS[name]`` (seeded by the name) and the directory it was saved to."""
    case = CONFIGS[name]
    hf = make_hf_model(seed=len(name), **case.get("overrides", {}))
    return hf, save_hf(hf, directory, config_overrides=case.get("rewrite"), **case.get("save", {}))


def parity_batch(name: str, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3 rows of ``CONFIGS[name]``'s sequence length: one full, one right-padded, one left-padded."""
    seq = CONFIGS[name].get("seq", DEFAULT_SEQ)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, seq))
    mask = np.ones((3, seq), np.int64)
    mask[1, seq * 5 // 8:] = 0  # right padding
    mask[2, :seq // 5] = 0  # left padding
    return ids, mask


def hf_copy(model, dtype, *, attn: str = "sdpa", experts: str = "grouped_mm"):
    """A copy of ``model`` in ``dtype`` running the given attention (sdpa: transformers' default, eager) and
    experts implementation (grouped_mm: the default, eager: a loop over the experts; grouped_mm has no float64
    kernel). Set on the copy's own config, so ``model`` is untouched."""
    m = copy.deepcopy(model).to(dtype)
    m.set_attn_implementation(attn)
    m.set_experts_implementation(experts)
    return m


def hf_outputs(model, input_ids, attention_mask, dtype, *, attn: str = "sdpa", experts: str = "grouped_mm"):
    """transformers' logits [B, T, V] and each sparse layer's router logits [B*T, E], as float64 numpy, from a
    copy of ``model`` in ``dtype`` on the given path (see ``hf_copy``)."""
    m = hf_copy(model, dtype, attn=attn, experts=experts)
    with torch.no_grad():
        out = m(torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask), output_router_logits=True)
    return out.logits.double().numpy(), [r.double().numpy() for r in out.router_logits]


def hf_float64(model, input_ids, attention_mask):
    """The truth: ``hf_outputs`` in float64, eager experts and SDPA attention. Not eager attention: in float64
    it adds finfo(float64).min to the masked scores, which overflows to -inf for a left-padding query that sees
    no key, and the NaN that makes spreads over the whole row. (transformers computes RoPE's angles in float32
    whatever the model's dtype; the truth keeps that.)"""
    return hf_outputs(model, input_ids, attention_mask, torch.float64, attn="sdpa", experts="eager")


HF_PATHS = [(attn, experts) for attn in ("sdpa", "eager") for experts in ("grouped_mm", "eager")]


def hf_paths(model, input_ids, attention_mask, dtype) -> dict:
    """``hf_outputs`` in ``dtype`` (float32 or bfloat16) on each of transformers' attention x experts paths,
    keyed "attn/experts"."""
    return {f"{attn}/{experts}": hf_outputs(model, input_ids, attention_mask, dtype, attn=attn, experts=experts)
            for attn, experts in HF_PATHS}


def relative_error(x: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """max |x - truth| over the valid (non-padding) positions, relative to max |truth| there."""
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(x, np.float64) - truth)[valid].max() / np.abs(truth[valid]).max())


# Routing is compared, and logits held to the float32 rule, only where the float64 router decides by more than
# this fraction of the layer's largest |router logit| between the k-th and (k+1)-th expert: 70x to 500x the
# float32 router logits' error (1.9e-7 to 1.4e-6 of the largest, measured on CONFIGS, docs/parity.md). Below it,
# float32 noise may pick the other expert; make_hf_model draws the router wide (std 1), so that few positions are.
ROUTING_MARGIN = 1e-4


def decisive_positions(model, routers: list[np.ndarray], attention_mask: np.ndarray,
                       margin: float = ROUTING_MARGIN) -> np.ndarray:
    """[B, T] bool: valid positions where every sparse layer of the HF ``model`` decides its float64 routing
    (``routers``, [B*T, E] each) by ``margin``, at the position and, but for the last decoder layer, at every
    earlier position of its row (which later layers attend to, so a flipped expert there changes it too)."""
    top_k = model.config.num_experts_per_tok
    last = [hasattr(layer.mlp, "gate") for layer in model.model.layers][-1]  # the final layer is sparse
    valid = attention_mask.astype(bool)
    near, here = np.zeros(valid.shape, bool), np.zeros(valid.shape, bool)
    for i, r in enumerate(routers):
        if top_k >= r.shape[-1]:
            continue
        s = np.sort(r, axis=-1)
        gap = (s[:, -top_k] - s[:, -top_k - 1]) / np.abs(r[valid.reshape(-1)]).max()
        tie = (gap < margin).reshape(valid.shape) & valid
        if last and i == len(routers) - 1:
            here |= tie
        else:
            near |= tie
    return valid & ~here & ~np.logical_or.accumulate(near, axis=1)


def parity_run(name: str, directory):
    """Everything the parity tests compare on ``CONFIGS[name]``, saved to ``directory``: the float64 truth, the
    positions compared, transformers' float32 and bfloat16 paths, and this port's float32 logits and router
    logits and bfloat16 logits (from ``qwen2_jax.from_pretrained(directory, dtype=...)``)."""
    import types

    import jax
    import jax.numpy as jnp
    import qwen2_jax

    hf, directory = parity_model(name, directory)
    ids, mask = parity_batch(name, hf.config.vocab_size)
    truth, truth_routers = hf_float64(hf, ids, mask)
    model = qwen2_jax.from_pretrained(directory, dtype="float32")

    def forward(input_ids, attention_mask):
        out = model.forward(input_ids, attention_mask, output_router_logits=True)
        return out.logits, out.router_logits

    logits, routers = jax.jit(forward)(jnp.asarray(ids), jnp.asarray(mask))
    model16 = qwen2_jax.from_pretrained(directory, dtype="bfloat16")
    return types.SimpleNamespace(
        name=name, top_k=hf.config.num_experts_per_tok, ids=ids, mask=mask, truth=truth, truth_routers=truth_routers,
        positions=decisive_positions(hf, truth_routers, mask),
        hf32=hf_paths(hf, ids, mask, torch.float32), hf16=hf_paths(hf, ids, mask, torch.bfloat16),
        logits=np.asarray(logits), routers=list(np.asarray(routers)), model16=model16,
        logits16=np.asarray(jax.jit(model16.__call__)(jnp.asarray(ids), jnp.asarray(mask))))


def router_error(routers, truth_routers, positions: np.ndarray) -> float:
    """Worst ``relative_error`` of the router logits over the sparse layers, at ``positions`` [B, T]."""
    flat = positions.reshape(-1)
    return max(relative_error(np.asarray(r)[flat], t[flat], np.ones(flat.sum())) for r, t in zip(routers, truth_routers))


def parity_errors(run) -> dict:
    """The errors against the float64 truth of a ``parity_run``, at its compared positions: ours and each of
    transformers' paths, for the float32 logits, float32 router logits and bfloat16 logits."""
    p = run.positions
    return {
        "positions": int(p.sum()), "valid": int(run.mask.sum()),
        "float32": relative_error(run.logits, run.truth, p),
        "transformers_float32": {k: relative_error(lg, run.truth, p) for k, (lg, _) in run.hf32.items()},
        "router": router_error(run.routers, run.truth_routers, p),
        "transformers_router": {k: router_error(r, run.truth_routers, p) for k, (_, r) in run.hf32.items()},
        "bfloat16": relative_error(run.logits16, run.truth, p),
        "transformers_bfloat16": {k: relative_error(lg, run.truth, p) for k, (lg, _) in run.hf16.items()},
    }
