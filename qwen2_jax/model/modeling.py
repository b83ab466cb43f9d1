"""The Qwen2-MoE decoder (Hugging Face ``Qwen2MoeForCausalLM``) in Flax NNX.

Read top-down: RMSNorm, rotary embedding, attention, the dense MLP, the routed experts and the sparse MoE
block, the decoder layer, the model. Module and parameter names follow Hugging Face's so that ``params.py``
is a plain mapping. Every layer owns its weights (``model.layers[i]``, as HF's ``model.layers.{i}``) and the
forward runs them one after another: each weight is an argument of the compiled step of its own, which an
accelerator reads in place (a scan over ``[layers, ...]`` stacks copied every slice it read; the compiled
programs are in docs/accelerators.md).

Numerics follow HF: RMSNorm, router softmax, attention softmax and logits in float32 whatever the weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import moe
from .attention import attention, blocks_to_visit
from .cache import KVCache
from .paged_attention import PagedKV
from .config import Qwen2MoeConfig
from .matmul import product
from .quant import QuantConfig, operand, scale_shape

_init = nnx.initializers.normal(0.02)


def _param(rngs, shape, param_dtype, quant: QuantConfig | None, axis: int):
    """A weight and its scales: (Param, None) in float, (int8/fp8 Param, float32 Param) quantized (zeros and
    ones until loaded: a quantized model is made by quantizing a float one, ``params.quantize_tree``)."""
    if quant is None:
        return nnx.Param(_init(rngs.params(), shape, param_dtype)), None
    return (nnx.Param(jnp.zeros(shape, quant.storage)),
            nnx.Param(jnp.ones(scale_shape(shape, quant, axis), jnp.float32)))


class Linear(nnx.Module):
    """HF's ``nn.Linear``: ``weight [out, in]`` (HF's own layout, which every backend's matmul reads in place;
    XLA:GPU turns a one-row product with an ``[in, out]`` weight into a product array it writes and reads
    again), an optional ``bias [out]``, and ``weight_scale [out, blocks]`` when quantized (``quant.py``)."""

    def __init__(self, n_in: int, n_out: int, *, bias: bool, dtype, param_dtype, rngs, quant=None):
        self.weight, self.weight_scale = _param(rngs, (n_out, n_in), param_dtype, quant, axis=1)
        self.bias = nnx.Param(_init(rngs.params(), (n_out,), param_dtype)) if bias else None
        self.dtype = dtype

    def operand(self):
        """The weight as a product reads it: the array, or a ``QArray`` whose values are dequantized in the kernel."""
        return operand(self.weight[...], None if self.weight_scale is None else self.weight_scale[...], 1)

    def __call__(self, x, platform: str | None = None):
        """``platform``: where the step runs (default: the default backend), which decides the product's form."""
        y = product(x.astype(self.dtype), self.operand(), self.dtype, platform)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def _linear(n_in, n_out, *, bias, dtype, param_dtype, rngs, quant=None):
    return Linear(n_in, n_out, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=quant)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)  # HF order: normalise in f32, cast, then scale


def is_norm_scale(path) -> bool:
    """Whether a parameter path (its keys as strings) is an RMSNorm scale: initialised to one, not decayed.
    Plain ``weight`` is not enough: ``lm_head.weight`` is a matrix."""
    return path[-1] == "weight" and any("norm" in k for k in path)


# ---- rotary embedding -----------------------------------------------------------------------------------
def rope_inv_freq(cfg: Qwen2MoeConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` in float32, as transformers computes them (default or YaRN)."""
    dim = cfg.head_dim
    pos_freqs = np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if cfg.rope_type != "yarn":
        return inv_freq
    # Static YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp in between.
    def correction_dim(rotations):
        return dim * np.log(cfg.original_max_position_embeddings / (rotations * 2 * np.pi)) / (2 * np.log(cfg.rope_theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.rope_truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    interpolation = (1.0 / (np.float32(cfg.rope_factor) * pos_freqs)).astype(np.float32)
    return (interpolation * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)


def rope_cos_sin(cfg: Qwen2MoeConfig, positions, dtype):
    """cos, sin ``[B, T, head_dim]`` for integer positions ``[B, T]`` (YaRN's attention factor folded in)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = cfg.attention_factor if cfg.rope_type == "yarn" else 1.0
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x, cos, sin):
    """x: [B, T, heads, D]; rotate-half convention, as HF."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


# ---- attention ------------------------------------------------------------------------------------------
class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2MoeConfig, *, dtype, param_dtype, rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=cfg.quantization)
        self.q_proj = _linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.qkv_bias, **kw)
        self.k_proj = _linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias, **kw)
        self.v_proj = _linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias, **kw)
        self.o_proj = _linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False, **kw)

    def __call__(self, x, cos, sin, valid, cache: KVCache | None, layer: int, upto=None, segments=None,
                 platform: str | None = None):
        """x: [B, T, H] at slots ``cache.index ..`` (0 without a cache); ``valid [B, S]``: which slots hold real
        tokens. With ``cache``, the new keys go into it at ``layer`` and the queries attend over its slots;
        without, over the new keys themselves. ``upto``, ``segments``: see ``attention.attention``."""
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x, platform).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x, platform).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x, platform).reshape(b, t, self.num_kv_heads, self.head_dim)
        if isinstance(cache, PagedKV):  # the serving engine's pages: written, then read, by the cache
            cache = cache.update(layer, k, v)
            out = cache.attend(layer, q, platform)
            return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), platform), cache
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)  # [B, Hkv, T, D], [B, Hkv, D, T]: the cache's
        start = 0
        if cache is not None:
            start = cache.index
            cache = cache.update(layer, k, v)
            k, v = cache.layer(layer)  # [B, Hkv, S, D], [B, Hkv, D, S]
        out = attention(q, k, v, valid, start, upto=upto, segments=segments)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), platform), cache


# ---- feed-forward ---------------------------------------------------------------------------------------
class MLP(nnx.Module):
    """SwiGLU, HF's ``Qwen2MoeMLP``: the dense layers' MLP and the shared expert."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, param_dtype, rngs, quant=None):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=quant)
        self.gate_proj = _linear(hidden, intermediate, **kw)
        self.up_proj = _linear(hidden, intermediate, **kw)
        self.down_proj = _linear(intermediate, hidden, **kw)

    def __call__(self, x, platform: str | None = None):
        return self.down_proj(jax.nn.silu(self.gate_proj(x, platform)) * self.up_proj(x, platform), platform)


class Experts(nnx.Module):
    """One layer's routed experts, stacked on the expert axis as transformers holds them (``Qwen2MoeExperts``):
    ``gate_up_proj [E, 2, I, H]`` (HF's ``[E, 2I, H]``, gate then up, split on an axis of their own so that a
    tensor-parallel split of ``I`` keeps each device's gate and up rows together) and ``down_proj [E, H, I]``,
    each expert ``[out, in]``. Every dispatch of ``moe`` reads them in place on GPU and TPU
    (docs/accelerators.md); gate and up are one product per expert, a weight of ``2I`` rows (a batch-16 decode step
    of the quarter config on XLA:CPU 0.94x the time of two products, v5p-8's batch-64 step 0.95x the bytes,
    docs/performance.md). On XLA:CPU an expert's few rows are multiplied weight first (``matmul.product``).
    Quantized, each has its scales beside it (``gate_up_proj_scale [E, 2, I, blocks]``, ...)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype, param_dtype, rngs, quant=None):
        self.gate_up_proj, self.gate_up_proj_scale = _param(rngs, (num_experts, 2, intermediate, hidden), param_dtype,
                                                            quant, 3)
        self.down_proj, self.down_proj_scale = _param(rngs, (num_experts, hidden, intermediate), param_dtype, quant, 2)
        self.dtype = dtype

    def operands(self):
        """(gate_up_proj, down_proj) as the dispatch reads them: arrays in the compute dtype, or ``QArray``s."""
        out = []
        for name in ("gate_up_proj", "down_proj"):
            scale = getattr(self, name + "_scale")
            w = getattr(self, name)[...]
            out.append(w.astype(self.dtype) if scale is None else operand(w, scale[...], w.ndim - 1))  # inputs last
        return out

    def __call__(self, x, weights, experts, impl: str | Callable = "auto", platform: str | None = None,
                 views=None):
        """``views``: this layer's experts as ``(gate_up_proj, down_proj)`` tuples of per-expert arrays
        (``views.expert_views``), read instead of the parameters."""
        if views is not None:
            return moe.dispatch(x, weights, experts, *views, impl=impl, platform=platform)
        w = self.operands()
        if callable(impl):  # e.g. the expert-parallel dispatch of qwen2_jax.sharding
            return impl(x, weights, experts, *w)
        return moe.dispatch(x, weights, experts, *w, impl=impl, platform=platform)


class SparseMoeBlock(nnx.Module):
    """HF's ``Qwen2MoeSparseMoeBlock``: top-k routed experts plus a sigmoid-gated shared expert."""

    def __init__(self, cfg: Qwen2MoeConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = _linear(cfg.hidden_size, cfg.num_experts, bias=False, **kw)  # the router: never quantized
        q = cfg.quantization
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, quant=q, **kw)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, quant=q, **kw)
        self.shared_expert_gate = _linear(cfg.hidden_size, 1, bias=False, **kw)

    def __call__(self, x, impl="auto", platform=None, views=None):
        """x: [B, T, H] -> (out [B, T, H], router_logits [B*T, E] float32). ``views``: see ``Experts``."""
        flat = x.reshape(-1, x.shape[-1])
        router_logits = self.gate(flat, platform)
        probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # over all experts, in f32
        weights, experts = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights.astype(router_logits.dtype)
        shared_gate = jax.nn.sigmoid(self.shared_expert_gate(flat, platform))
        if callable(impl):  # expert-parallel: the shared expert's partial sums join the experts' one all-reduce
            shared = [m.operand() for m in (self.shared_expert.gate_proj, self.shared_expert.up_proj,
                                            self.shared_expert.down_proj)]  # cast or dequantized in its products
            out = self.experts(flat, weights, experts, functools.partial(impl, shared=(shared_gate, *shared)))
        else:
            out = (self.experts(flat, weights, experts, impl, platform, views)
                   + shared_gate * self.shared_expert(flat, platform))
        return out.reshape(x.shape), router_logits.astype(jnp.float32)


# ---- decoder layer --------------------------------------------------------------------------------------
class DecoderLayer(nnx.Module):
    """HF's ``Qwen2MoeDecoderLayer``: attention and a sparse MoE block, or a dense MLP (``mlp_only_layers``,
    ``decoder_sparse_step``), each behind its RMSNorm and a residual."""

    def __init__(self, cfg: Qwen2MoeConfig, sparse: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = (SparseMoeBlock(cfg, **kw) if sparse
                    else MLP(cfg.hidden_size, cfg.intermediate_size, quant=cfg.quantization, **kw))
        self.sparse = sparse

    def __call__(self, h, cos, sin, valid, cache: KVCache | None, index: int, moe_impl="auto", platform=None,
                 views=None, upto=None, segments=None):
        """Returns (h, cache, router_logits [B*T, E] or None for a dense layer)."""
        a, cache = self.self_attn(self.input_layernorm(h), cos, sin, valid, cache, index, upto, segments, platform)
        h = h + a
        x = self.post_attention_layernorm(h)
        if self.sparse:
            f, router = self.mlp(x, moe_impl, platform, views)
        else:
            f, router = self.mlp(x, platform), None
        return h + f, cache, router


# ---- the model ------------------------------------------------------------------------------------------
class Qwen2MoeModel(nnx.Module):
    def __init__(self, cfg: Qwen2MoeConfig, *, dtype, param_dtype, rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=_init, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, sparse, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for sparse in cfg.sparse_layers])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


@dataclasses.dataclass
class Output:
    logits: jax.Array  # [B, T, V] float32 (or [B, 1, V] with last_only)
    cache: KVCache | None
    router_logits: jax.Array | None  # [num_sparse_layers, B*T, E] float32


class Qwen2MoeForCausalLM(nnx.Module):
    def __init__(self, cfg: Qwen2MoeConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = param_dtype or dtype
        self.config = cfg
        self.dtype = dtype
        self.model = Qwen2MoeModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        quant = cfg.quantization if cfg.quantization is not None and cfg.quantization.lm_head else None
        self.lm_head = None if cfg.tie_word_embeddings else _linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=quant)

    def __call__(self, input_ids, attention_mask=None):
        """input_ids [B, T] -> logits [B, T, vocab] float32. Positions count from 0 as in HF's forward."""
        return self.forward(input_ids, attention_mask).logits

    def forward(self, input_ids, attention_mask=None, *, positions=None, cache: KVCache | None = None,
                last_only=False, moe_impl="auto", output_router_logits=False, remat=False,
                platform: str | None = None, expert_views=None, segment_ids=None, logits_at=None) -> Output:
        """The full forward. With ``cache``, the tokens are written at ``cache.index`` and attend to every
        valid slot before them; ``positions`` ([B, T], default 0..T-1 after the cache index) drive RoPE.
        ``segment_ids`` ([B, T] int32): several sequences packed in a row, each token attending only to the new
        tokens of its own segment (none of the cache's earlier slots); give each its own ``positions``.
        ``logits_at`` ([B, N] token indices): logits at these tokens only (e.g. each packed sequence's last);
        ``last_only``: at the last token.
        ``platform`` ("cpu", "gpu", "tpu"): where the step runs, which picks the MoE dispatch (default: the
        mesh's devices, else the default backend). ``remat``: each layer's activations are recomputed in the
        backward pass."""
        cfg = self.config
        b, t = input_ids.shape
        mesh = getattr(self, "mesh", None)  # set by from_pretrained(..., mesh=) / sharding.shard_model
        if platform is None:
            platform = moe.canonical_platform(mesh.devices.flat[0].platform if mesh is not None
                                              else jax.default_backend())
        if moe_impl == "auto" and mesh is not None and mesh.size > 1:
            from .expert_parallel import expert_parallel_moe

            moe_impl = expert_parallel_moe(mesh, platform=platform)
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        paged = isinstance(cache, PagedKV)  # positions given; the pages say what each query sees
        start = cache.index if cache is not None and not paged else 0
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if paged:
            valid = None
        elif cache is not None:
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
            cache = dataclasses.replace(cache, valid=valid)
        else:
            valid = attention_mask
        # Over a long cache, the key blocks past the last query need not be visited, where a loop of a
        # data-dependent length is cheap (attention.blocks_to_visit).
        upto = start + t if cache is not None and not paged and blocks_to_visit(platform) == "filled" else None
        segments = None
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
            segments = (segment_ids, segment_ids if cache is None else jax.lax.dynamic_update_slice(
                jnp.full(valid.shape, -1, jnp.int32), segment_ids, (0, start)))

        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(cfg, positions, h.dtype)
        routers = []
        for i, layer in enumerate(self.model.layers):
            run = _remat_layer if remat else _run_layer
            views = expert_views[i] if expert_views is not None else None
            h, cache, router = run(layer, h, cos, sin, valid, cache, i, moe_impl, platform, views, upto, segments)
            if router is not None:
                routers.append(router)
        h = self.model.norm(h)
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = jnp.take_along_axis(h, jnp.asarray(logits_at, jnp.int32)[..., None], axis=1)
        weight = self.model.embed_tokens.embedding[...] if self.lm_head is None else self.lm_head.operand()  # [V, H]
        logits = product(h, weight, h.dtype, platform, out_dtype=jnp.float32)
        if cache is not None and not paged:
            cache = dataclasses.replace(cache, index=cache.index + t)
        router_logits = jnp.stack(routers) if routers and output_router_logits else None
        return Output(logits=logits, cache=cache, router_logits=router_logits)


def _run_layer(layer, h, cos, sin, valid, cache, index, moe_impl, platform, views=None, upto=None, segments=None):
    return layer(h, cos, sin, valid, cache, index, moe_impl, platform, views, upto, segments)


# Recomputes a layer's activations in the backward pass instead of keeping them (training with remat=True).
_remat_layer = nnx.remat(_run_layer, static_argnums=(6, 7, 8))


def abstract_model(cfg: Qwen2MoeConfig, *, dtype=jnp.float32) -> Qwen2MoeForCausalLM:
    """The module tree with shapes and dtypes only (no memory), to be filled from a checkpoint."""
    return nnx.eval_shape(lambda: Qwen2MoeForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
