"""Parameters: the one table from Hugging Face tensor names to this port's stacked parameter tree.

Each row says where a weight lives in the module tree, which HF tensor(s) fill it, whether it is stacked over
all layers, the sparse (MoE) layers or the dense (MLP) layers (and over experts), whether HF's
``[out, in]`` Linear layout is transposed to our ``[in, out]``, and its logical axes, which
``qwen2_jax.sharding`` maps onto a device mesh. The loader, the Orbax converter and the sharding rules all
read this table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import numpy as np
from flax import nnx

from .config import Qwen2MoeConfig
from .hf_files import FLOAT_DTYPES, CheckpointError, TensorRef, read_tensors


@dataclasses.dataclass(frozen=True)
class Param:
    path: tuple[str, ...]  # in the module tree
    hf: str  # HF name; {i} is the layer, {e} the expert
    stack: str  # "" | "layers" (every layer) | "sparse" (MoE layers) | "dense" (MLP layers)
    transpose: bool  # HF Linear weights are [out, in]; ours are [in, out]
    axes: tuple[str | None, ...]  # logical axes of our (stacked) array

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf

    @property
    def num_stack_dims(self) -> int:
        return (self.stack != "") + self.per_expert


def _attn(name, axis, bias):
    rows = [Param(("model", "layers", "self_attn", name, "kernel"), f"model.layers.{{i}}.self_attn.{name}.weight",
                  "layers", True, ("layers", "embed", axis))]
    if bias:
        rows.append(Param(("model", "layers", "self_attn", name, "bias"), f"model.layers.{{i}}.self_attn.{name}.bias",
                          "layers", False, ("layers", axis)))
    return rows


def _swiglu(prefix, hf_prefix, stack, inner, stack_axes=("layers",)):
    return [
        Param(prefix + ("gate_proj",), f"{hf_prefix}.gate_proj.weight", stack, True, (*stack_axes, "embed", inner)),
        Param(prefix + ("up_proj",), f"{hf_prefix}.up_proj.weight", stack, True, (*stack_axes, "embed", inner)),
        Param(prefix + ("down_proj",), f"{hf_prefix}.down_proj.weight", stack, True, (*stack_axes, inner, "embed")),
    ]


def param_table(cfg: Qwen2MoeConfig) -> list[Param]:
    """Every parameter of the model described by ``cfg``."""
    rows = [Param(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", "", False, ("vocab", "embed"))]
    rows += [
        Param(("model", "layers", norm, "weight"), f"model.layers.{{i}}.{norm}.weight", "layers", False, ("layers", "embed"))
        for norm in ("input_layernorm", "post_attention_layernorm")
    ]
    rows += _attn("q_proj", "q_heads", cfg.qkv_bias) + _attn("k_proj", "kv_heads", cfg.qkv_bias)
    rows += _attn("v_proj", "kv_heads", cfg.qkv_bias)
    rows.append(Param(("model", "layers", "self_attn", "o_proj", "kernel"), "model.layers.{i}.self_attn.o_proj.weight",
                      "layers", True, ("layers", "q_heads", "embed")))
    if cfg.num_sparse_layers:
        moe = ("model", "layers", "mlp")
        rows.append(Param(moe + ("gate", "kernel"), "model.layers.{i}.mlp.gate.weight", "sparse", True,
                          ("layers", "embed", None)))
        rows += _swiglu(moe + ("experts",), "model.layers.{i}.mlp.experts.{e}", "sparse", "moe_mlp",
                        ("layers", "experts"))
        rows += [dataclasses.replace(p, path=p.path + ("kernel",))
                 for p in _swiglu(moe + ("shared_expert",), "model.layers.{i}.mlp.shared_expert", "sparse", "shared_mlp")]
        rows.append(Param(moe + ("shared_expert_gate", "kernel"), "model.layers.{i}.mlp.shared_expert_gate.weight",
                          "sparse", True, ("layers", "embed", None)))
    if cfg.num_dense_layers:
        rows += [dataclasses.replace(p, path=p.path + ("kernel",))
                 for p in _swiglu(("model", "layers", "dense_mlp"), "model.layers.{i}.mlp", "dense", "mlp")]
    rows.append(Param(("model", "norm", "weight"), "model.norm.weight", "", False, ("embed",)))
    if not cfg.tie_word_embeddings:
        rows.append(Param(("lm_head", "weight"), "lm_head.weight", "", False, ("vocab", "embed")))
    return rows


# Tensors a checkpoint may carry that hold no weights of ours.
def _ignorable(name: str, cfg: Qwen2MoeConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def stack_layers(cfg: Qwen2MoeConfig, stack: str) -> list[int]:
    """The HF layer indices that make up a stack, in stacking order."""
    sparse = cfg.sparse_layers
    return {"": [], "layers": list(range(cfg.num_hidden_layers)),
            "sparse": [i for i, s in enumerate(sparse) if s], "dense": [i for i, s in enumerate(sparse) if not s]}[stack]


def param_shape(cfg: Qwen2MoeConfig, p: Param) -> tuple[int, ...]:
    """Our stacked shape of ``p``, from the module tree's abstract shapes."""
    return _abstract_shapes(cfg)[p.path]


@functools.cache  # configs are frozen and hashable; the module tree is traced once per config
def _abstract_shapes(cfg: Qwen2MoeConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from .model import abstract_model

    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg)))
    return {tuple(str(k) for k in path): tuple(v.shape) for path, v in flat}


def hf_names(cfg: Qwen2MoeConfig, p: Param) -> np.ndarray:
    """HF tensor names filling ``p``, as an array over its stack dims ([] , [layers] or [layers, experts])."""
    if not p.stack:
        return np.array(p.hf, dtype=object)
    layers = stack_layers(cfg, p.stack)
    if p.per_expert:
        return np.array([[p.hf.format(i=i, e=e) for e in range(cfg.num_experts)] for i in layers], dtype=object)
    return np.array([p.hf.format(i=i) for i in layers], dtype=object)


def hf_shape(cfg: Qwen2MoeConfig, p: Param) -> tuple[int, ...]:
    shape = param_shape(cfg, p)[p.num_stack_dims:]
    return shape[::-1] if p.transpose else shape


def check_tensors(cfg: Qwen2MoeConfig, tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """Every expected tensor present with its shape and a float dtype; nothing unknown. Returns the used ones."""
    used: dict[str, TensorRef] = {}
    for p in param_table(cfg):
        want = hf_shape(cfg, p)
        for name in hf_names(cfg, p).flat:
            ref = tensors.get(name)
            if ref is None:
                raise CheckpointError(f"missing tensor {name} (expected shape {list(want)})")
            if ref.shape != want:
                raise CheckpointError(f"{ref.path}: tensor {name} has shape {list(ref.shape)}, expected {list(want)} "
                                      f"from config.json")
            if ref.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{ref.path}: tensor {name} has dtype {ref.dtype}, expected a float dtype")
            used[name] = ref
    for name, ref in tensors.items():
        if name not in used and not _ignorable(name, cfg):
            raise CheckpointError(f"{ref.path}: unexpected tensor {name} {list(ref.shape)} (not used by this config)")
    return used


def read_block(cfg: Qwen2MoeConfig, p: Param, tensors: dict[str, TensorRef], index=None, dtype=None) -> np.ndarray:
    """The block ``index`` (a tuple of slices over our stacked shape) of parameter ``p``, read from the HF
    tensors (only the bytes of that block) and cast to ``dtype``."""
    shape = param_shape(cfg, p)
    index = tuple(index) if index is not None else ()
    index = index + (slice(None),) * (len(shape) - len(index))
    n = p.num_stack_dims
    names = hf_names(cfg, p)[index[:n]] if n else hf_names(cfg, p)
    inner = index[n:]

    def one(name):
        a = tensors[name].array()
        if p.transpose:
            a = a.T
        return np.asarray(a[inner], dtype=dtype)

    if n == 0:
        return one(str(names))
    flat = [one(name) for name in names.flat]
    return np.stack(flat).reshape(names.shape + flat[0].shape) if flat else np.zeros(
        names.shape + tuple(len(range(*s.indices(d))) for s, d in zip(inner, shape[n:])), dtype)


def iter_params(cfg: Qwen2MoeConfig) -> Iterator[tuple[Param, tuple[int, ...]]]:
    for p in param_table(cfg):
        yield p, param_shape(cfg, p)


def load_hf(directory: str, cfg: Qwen2MoeConfig, dtype, shardings=None) -> dict:
    """A nested dict of ``jax.Array`` parameters read from an HF directory; with ``shardings`` (a dict
    path -> Sharding), each device reads and receives only its own block."""
    tensors = check_tensors(cfg, read_tensors(directory))
    tree: dict = {}
    for p, shape in iter_params(cfg):
        sharding = (shardings or {}).get(p.path) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        arr = jax.make_array_from_callback(shape, sharding, lambda idx, p=p: read_block(cfg, p, tensors, idx, dtype))
        node = tree
        for key in p.path[:-1]:
            node = node.setdefault(key, {})
        node[p.path[-1]] = arr
    return tree
