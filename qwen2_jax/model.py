"""The Qwen2-MoE decoder (Hugging Face ``Qwen2MoeForCausalLM``) in Flax NNX.

Read top-down: RMSNorm, rotary embedding, attention, the dense MLP, the sparse MoE block, the stacked decoder
layers (one ``lax.scan``), the model. Module and parameter names follow Hugging Face's so that
``params.py`` is a plain mapping. Weights of all layers are stacked on a leading axis; sparse (MoE) and dense
(MLP) layers keep separate stacks, and the scan picks the right one per layer.

Numerics follow HF: RMSNorm, router softmax, attention softmax and logits in float32 whatever the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import moe, views
from .cache import KVCache
from .config import Qwen2MoeConfig

_init = nnx.initializers.normal(0.02)


def _linear(n_in, n_out, *, bias, dtype, param_dtype, rngs):
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=_init, bias_init=_init, rngs=rngs)


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
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.qkv_bias, **kw)
        self.k_proj = _linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias, **kw)
        self.v_proj = _linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias, **kw)
        self.o_proj = _linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False, **kw)

    def __call__(self, x, cos, sin, mask, cache: KVCache, layer):
        """x: [B, T, H]; mask: [B, T, S] (query may see slot); the new keys go into ``cache`` at ``layer``."""
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        cache = cache.update(layer, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        keys, values = cache.layer(layer)  # [B, Hkv, S, D]

        # Grouped-query attention: each KV head serves `groups` query heads, without repeating the cache.
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim).astype(keys.dtype)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bkgts,bksd->btkgd", probs, values)
        # A query that may see no key (a left-padding position) outputs zeros, as torch's SDPA does for HF.
        out = jnp.where(jnp.any(mask, axis=-1)[:, :, None, None, None], out, 0).astype(x.dtype)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


# ---- feed-forward ---------------------------------------------------------------------------------------
class MLP(nnx.Module):
    """SwiGLU, HF's ``Qwen2MoeMLP``: the dense layers' MLP and the shared expert."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, param_dtype, rngs):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(hidden, intermediate, **kw)
        self.up_proj = _linear(hidden, intermediate, **kw)
        self.down_proj = _linear(intermediate, hidden, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights stacked on the expert axis (HF's per-expert tensors, transposed)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype, param_dtype, rngs):
        self.gate_proj = nnx.Param(_init(rngs.params(), (num_experts, hidden, intermediate), param_dtype))
        self.up_proj = nnx.Param(_init(rngs.params(), (num_experts, hidden, intermediate), param_dtype))
        self.down_proj = nnx.Param(_init(rngs.params(), (num_experts, intermediate, hidden), param_dtype))
        self.dtype = dtype

    def __call__(self, x, weights, experts, impl: str | Callable = "auto", layer=None, per_expert=None):
        """With ``layer``, the parameters hold the stacks of every sparse layer (see ``DecoderLayers``).
        ``per_expert``: this layer's experts as ``(gate_proj, up_proj, down_proj)`` sequences of per-expert
        arrays (``DecoderLayers.per_layer_params``), used instead of the parameters."""
        if per_expert is not None:
            return moe.dispatch(x, weights, experts, *per_expert, impl=impl)
        w = [p[...] for p in (self.gate_proj, self.up_proj, self.down_proj)]
        if layer is not None and (callable(impl) or w[0].dtype != jnp.dtype(self.dtype)):
            w, layer = [a[layer] for a in w], None
        w = [a.astype(self.dtype) for a in w]
        if callable(impl):  # e.g. the expert-parallel dispatch of qwen2_jax.sharding
            return impl(x, weights, experts, *w)
        return moe.dispatch(x, weights, experts, *w, impl=impl, layer=layer)


class SparseMoeBlock(nnx.Module):
    """HF's ``Qwen2MoeSparseMoeBlock``: top-k routed experts plus a sigmoid-gated shared expert."""

    def __init__(self, cfg: Qwen2MoeConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = _linear(cfg.hidden_size, cfg.num_experts, bias=False, **kw)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, **kw)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, **kw)
        self.shared_expert_gate = _linear(cfg.hidden_size, 1, bias=False, **kw)

    def __call__(self, x, impl="auto", layer=None, per_expert=None):
        """x: [B, T, H] -> (out [B, T, H], router_logits [B*T, E]). ``layer``, ``per_expert``: see ``Experts``."""
        flat = x.reshape(-1, x.shape[-1])
        router_logits = self.gate(flat)
        probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # over all experts, in f32
        weights, experts = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        out = self.experts(flat, weights.astype(router_logits.dtype), experts, impl, layer, per_expert)
        out = out + jax.nn.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(x.shape), router_logits


# ---- stacked decoder layers -----------------------------------------------------------------------------
def _stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module | None:
    """``n`` copies of a module with every parameter stacked on a new leading axis (None when n == 0)."""
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs):
        return make(rngs)

    return create(rngs)


def _index(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


class DecoderLayers(nnx.Module):
    """All decoder layers, run as one ``lax.scan`` so that compile time does not grow with depth."""

    def __init__(self, cfg: Qwen2MoeConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        n = cfg.num_hidden_layers
        self.sparse = cfg.sparse_layers
        self.input_layernorm = _stacked(n, lambda r: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype), rngs)
        self.self_attn = _stacked(n, lambda r: Attention(cfg, rngs=r, **kw), rngs)
        self.post_attention_layernorm = _stacked(n, lambda r: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype), rngs)
        self.mlp = _stacked(cfg.num_sparse_layers, lambda r: SparseMoeBlock(cfg, rngs=r, **kw), rngs)
        self.dense_mlp = _stacked(cfg.num_dense_layers, lambda r: MLP(cfg.hidden_size, cfg.intermediate_size, rngs=r, **kw), rngs)
        self.num_experts = cfg.num_experts

    def _split(self, stacked_experts: bool):
        """(graphdefs, states) of the stacked modules; with ``stacked_experts`` the routed experts' state apart."""
        defs, states = {}, {}
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "dense_mlp"):
            module = getattr(self, name)
            defs[name], states[name] = nnx.split(module) if module is not None else (None, None)
        states["experts"] = None
        if self.mlp is None:
            defs["mlp"], states["mlp"] = None, None
        elif stacked_experts:
            defs["mlp"], states["experts"], states["mlp"] = nnx.split(self.mlp, nnx.PathContains("experts"), ...)
        else:
            defs["mlp"], states["mlp"] = nnx.split(self.mlp)
        return defs, states

    def _slots(self) -> np.ndarray:
        """Each layer's position within its own stack (sparse or dense)."""
        kinds = np.asarray(self.sparse)
        return np.where(kinds, np.cumsum(kinds) - 1, np.cumsum(~kinds) - 1)

    def per_layer_params(self) -> tuple:
        """Each layer's weights as arrays of their own, for ``__call__``'s ``layer_params``: one tuple
        ``(input_layernorm, self_attn, post_attention_layernorm, mlp or dense_mlp, experts)`` per layer, where
        ``experts`` is ``(gate_proj, up_proj, down_proj)``, each a tuple of per-expert arrays (None in a dense
        layer, or where the experts' dtype is not the compute dtype). Made outside jit; on XLA:CPU the arrays
        are views of the stacks' memory (``views.slices``), elsewhere copies."""
        _, st = self._split(stacked_experts=True)
        slots = self._slots()

        def split(state):  # [n, ...] leaves -> n states of [...] leaves
            if state is None:
                return None
            leaves, treedef = jax.tree.flatten(state)
            per_leaf = [views.slices(a) for a in leaves]
            return [jax.tree.unflatten(treedef, [rows[i] for rows in per_leaf]) for i in range(len(per_leaf[0]))]

        norm1, attn, norm2 = split(st["input_layernorm"]), split(st["self_attn"]), split(st["post_attention_layernorm"])
        mlp, dense_mlp = split(st["mlp"]), split(st["dense_mlp"])
        experts = None
        if self.mlp is not None:
            ex = self.mlp.experts
            stacks = [p[...] for p in (ex.gate_proj, ex.up_proj, ex.down_proj)]
            if stacks[0].dtype == jnp.dtype(ex.dtype):
                experts = [tuple(views.slices(w) for w in layer) for layer in zip(*(views.slices(a) for a in stacks))]
        return tuple((norm1[i], attn[i], norm2[i],
                      mlp[int(slots[i])] if sparse else dense_mlp[int(slots[i])],
                      None if experts is None or not sparse else experts[int(slots[i])])
                     for i, sparse in enumerate(self.sparse))

    def __call__(self, h, cos, sin, mask, cache: KVCache, *, moe_impl="auto", remat=False, stacked_experts=False,
                 layer_params: tuple | None = None):
        """Returns (h, cache, router_logits [num_sparse_layers, B*T, E] or None).

        ``stacked_experts``: the routed experts' stacks stay whole (closed over, not sliced by the scan) and the
        dispatch reads the experts it needs at the layer's index, instead of XLA copying each layer's whole
        ``[E, ...]`` block into the dispatch loop. For inference: under differentiation the scan would
        accumulate a cotangent the size of every layer's experts at each layer.

        ``layer_params`` (``per_layer_params()``, made once outside jit): the layers run unrolled on these
        per-layer arrays instead of a scan over the stacks (with ``stacked_experts``). XLA:CPU copies every
        weight a scan slices out of a stack before a matmul reads it, which triples what a decode step
        moves through memory; per-layer arrays are read in place (see docs/performance.md)."""
        stacked_experts = stacked_experts or layer_params is not None
        defs, st = self._split(stacked_experts)
        experts = () if st["experts"] is None else (st["experts"],)
        kinds = np.asarray(self.sparse)
        slot = jnp.asarray(self._slots(), jnp.int32)
        n_tokens = h.shape[0] * h.shape[1]

        def sparse_mlp(x, params, layer, per_expert=None):
            f, router = nnx.merge(defs["mlp"], *experts, params)(x, moe_impl, layer if experts else None, per_expert)
            return f, router.astype(jnp.float32)

        def dense_mlp(x, params):
            return nnx.merge(defs["dense_mlp"], params)(x), jnp.zeros((n_tokens, self.num_experts), jnp.float32)

        def layer(carry, xs, sparse=None):
            """One decoder layer; ``sparse`` (static) when the layer's kind is known at trace time."""
            h, cache = carry
            i, norm1_i, attn_i, norm2_i, ff_i, *per_expert = xs
            a, cache = nnx.merge(defs["self_attn"], attn_i)(nnx.merge(defs["input_layernorm"], norm1_i)(h),
                                                            cos, sin, mask, cache, i)
            h = h + a
            x = nnx.merge(defs["post_attention_layernorm"], norm2_i)(h)
            if sparse is None and (kinds.all() or not kinds.any()):
                sparse = bool(kinds.all())
            if sparse is True:
                f, router = sparse_mlp(x, ff_i, slot[i], per_expert[0] if per_expert else None)
            elif sparse is False:
                f, router = dense_mlp(x, ff_i)
            else:  # mixed, scanned: pick this layer's weights from the sparse or the dense stack
                f, router = jax.lax.cond(kinds_dev[i], lambda: sparse_mlp(x, _index(st["mlp"], slot[i]), slot[i]),
                                         lambda: dense_mlp(x, _index(st["dense_mlp"], slot[i])))
            return (h + f, cache), router

        def run(sparse=None):
            fn = lambda carry, xs: layer(carry, xs, sparse)
            return jax.checkpoint(fn) if remat else fn

        kinds_dev = jnp.asarray(kinds)
        if layer_params is not None:
            carry, routers = (h, cache), []
            for i, params_i in enumerate(layer_params):
                carry, router = run(bool(kinds[i]))(carry, (i, *params_i))
                routers.append(router)
            (h, cache), router = carry, jnp.stack(routers)
        else:
            ff = st["mlp"] if kinds.all() else st["dense_mlp"] if not kinds.any() else None
            xs = (jnp.arange(len(kinds), dtype=jnp.int32), st["input_layernorm"], st["self_attn"],
                  st["post_attention_layernorm"], ff)
            (h, cache), router = jax.lax.scan(run(), (h, cache), xs)
        if self.mlp is None:
            return h, cache, None
        return h, cache, router[np.flatnonzero(kinds)]


# ---- the model ------------------------------------------------------------------------------------------
class Qwen2MoeModel(nnx.Module):
    def __init__(self, cfg: Qwen2MoeConfig, *, dtype, param_dtype, rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=_init, rngs=rngs)
        self.layers = DecoderLayers(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class LMHead(nnx.Module):
    """The untied output projection, kept as HF's ``lm_head.weight`` ``[vocab, hidden]`` (the embedding's
    layout) rather than a ``[hidden, vocab]`` kernel: on XLA:CPU a batch of 8 rows multiplies it 1.58x faster
    in the quarter config (``scripts/bench_ablation.py``, docs/performance.md)."""

    def __init__(self, vocab: int, hidden: int, *, param_dtype, rngs):
        self.weight = nnx.Param(_init(rngs.params(), (vocab, hidden), param_dtype))


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
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg.vocab_size, cfg.hidden_size,
                                                                  param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        """input_ids [B, T] -> logits [B, T, vocab] float32. Positions count from 0 as in HF's forward."""
        return self.forward(input_ids, attention_mask).logits

    def forward(self, input_ids, attention_mask=None, *, positions=None, cache: KVCache | None = None,
                last_only=False, moe_impl="auto", output_router_logits=False, remat=False,
                stacked_experts: bool | None = None, layer_params: tuple | None = None) -> Output:
        """The full forward. With ``cache``, the tokens are written at ``cache.index`` and attend to every
        valid slot before them; ``positions`` ([B, T], default 0..T-1 after the cache index) drive RoPE.
        ``stacked_experts`` (see ``DecoderLayers``; faster, not for differentiation) defaults to on exactly
        when a cache is given, i.e. in generation. ``layer_params``: ``model.model.layers.per_layer_params()``,
        to run the layers unrolled on per-layer and per-expert arrays (generation on XLA:CPU)."""
        cfg = self.config
        b, t = input_ids.shape
        mesh = getattr(self, "mesh", None)  # set by from_pretrained(..., mesh=) / sharding.shard_model
        if moe_impl == "auto" and mesh is not None and mesh.size > 1:
            from .sharding import expert_parallel_moe

            moe_impl = expert_parallel_moe(mesh)
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        return_cache = cache is not None
        if stacked_experts is None:
            stacked_experts = return_cache
        if cache is None:
            cache = KVCache.create(cfg, b, t, dtype=self.dtype)
        if positions is None:
            positions = jnp.broadcast_to(cache.index + jnp.arange(t, dtype=jnp.int32), (b, t))

        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
        slots = jnp.arange(cache.max_len)
        mask = valid[:, None, :] & (slots[None, None, :] <= (cache.index + jnp.arange(t))[None, :, None])
        cache = dataclasses.replace(cache, valid=valid)

        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(cfg, positions, h.dtype)
        h, cache, router = self.model.layers(h, cos, sin, mask, cache, moe_impl=moe_impl, remat=remat,
                                             stacked_experts=stacked_experts, layer_params=layer_params)
        h = self.model.norm(h)
        if last_only:
            h = h[:, -1:]
        weight = (self.model.embed_tokens.embedding if self.lm_head is None else self.lm_head.weight)[...]
        logits = jnp.einsum("bth,vh->btv", h, weight.astype(h.dtype), preferred_element_type=jnp.float32)
        cache = dataclasses.replace(cache, index=cache.index + t)
        return Output(logits=logits, cache=cache if return_cache else None,
                      router_logits=router if output_router_logits else None)


def init_random(cfg: Qwen2MoeConfig, *, dtype=jnp.float32, seed: int = 0, shardings=None) -> Qwen2MoeForCausalLM:
    """A model with random weights (normal, std 0.02; norm weights one), for demos and benchmarks.

    Each weight is drawn on its own: on XLA:CPU with numpy (compiling threefry for a whole model takes XLA:CPU
    longer than drawing the numbers), on accelerators by a jitted draw straight into the device memory (and
    into ``shardings[path]`` when given), so a model larger than host memory can be made."""
    model = abstract_model(cfg, dtype=dtype)
    state = nnx.state(model)
    on_host = jax.default_backend() == "cpu"
    leaves = []
    for i, (path, leaf) in enumerate(nnx.to_flat_state(state)):
        path = tuple(str(k) for k in path)
        shape, leaf_dtype = leaf.shape, leaf.dtype
        ones = is_norm_scale(path)
        sharding = (shardings or {}).get(path)
        if ones:
            value = jnp.ones(shape, leaf_dtype, device=sharding)
        elif on_host:
            value = np.random.default_rng([seed, i]).standard_normal(shape, np.float32) * np.float32(0.02)
            value = jax.device_put(value.astype(leaf_dtype), sharding)
        else:
            value = _device_normal(shape, jnp.dtype(leaf_dtype), sharding)(jax.random.fold_in(jax.random.key(seed), i))
        leaves.append((path, value))
    nnx.replace_by_pure_dict(state, _nest(leaves))
    nnx.update(model, state)
    return model


def _device_normal(shape, dtype, sharding):
    return jax.jit(lambda key: (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype), out_shardings=sharding)


def _nest(leaves):
    tree: dict = {}
    for path, value in leaves:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def abstract_model(cfg: Qwen2MoeConfig, *, dtype=jnp.float32) -> Qwen2MoeForCausalLM:
    """The module tree with shapes and dtypes only (no memory), to be filled from a checkpoint."""
    return nnx.eval_shape(lambda: Qwen2MoeForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
