"""Parameters: the one table from Hugging Face tensor names to this port's parameter tree.

One row per weight of each layer, named and laid out as Hugging Face stores it (``model.layers.{i}.self_attn.
q_proj.weight`` is ``("model", "layers", "i", "self_attn", "q_proj", "weight")``, ``[out, in]``); the routed
experts of a layer are stacked as transformers (5) holds them at run time: ``gate_up_proj`` from the 64 experts'
``gate_proj`` and ``up_proj`` tensors, ``[experts, 2, out, in]`` (HF's ``[experts, 2 * out, in]``, the same bytes,
with gate and up on an axis of their own so that a tensor-parallel split of ``out`` keeps each device's gate and
up rows together), and ``down_proj``, ``[experts, out, in]``. Each row says which HF tensor(s) fill it and its
logical axes, which ``qwen2_jax.sharding`` maps onto a device mesh. The loader, the Orbax converter and the sharding
rules all read this table.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen2_jax.errors import InputError
from .config import Qwen2MoeConfig
from .hf_files import FLOAT_DTYPES, CheckpointError, TensorRef, read_tensors
from .modeling import Qwen2MoeForCausalLM, abstract_model, is_norm_scale
from .quant import QuantConfig, quantize


# The version of this table's layout, recorded by the converter: a checkpoint of another one is converted again.
# 1: the routed experts stacked [experts, in, out] (not recorded then); 2: [experts, out, in], HF's;
# 3: gate_proj and up_proj as one gate_up_proj [experts, 2, out, in], transformers' own stack.
LAYOUT_VERSION = 3


@dataclasses.dataclass(frozen=True)
class Param:
    path: tuple[str, ...]  # in the module tree; a layer's index is a string ("0")
    hf: str  # HF name; {e} is the expert, {part} each of ``parts``
    axes: tuple[str | None, ...]  # logical axes of our array
    layer: int | None = None  # the decoder layer it belongs to
    # Quantized weights (``cfg.quantization``): the contracting axis of the values, and of their scales'
    # blocks on the row that holds the scales (``is_scale``; the same HF tensors, quantized as they are read).
    quant_axis: int | None = None
    is_scale: bool = False
    parts: tuple[str, ...] = ()  # HF tensors stacked on the axis after the experts' (gate_proj, up_proj)

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf

    @property
    def num_stack_dims(self) -> int:
        """Leading dims that stack several HF tensors (the expert axis, then the parts' axis)."""
        return int(self.per_expert) + int(bool(self.parts))

    @property
    def name(self) -> str:
        return "/".join(self.path)


def _layer_rows(cfg: Qwen2MoeConfig, i: int) -> list[Param]:
    prefix = f"model.layers.{i}."

    def row(name: str, axes) -> Param:
        # HF's name, dotted, is our path below model.layers.{i}; the experts' stack drops {e} and .weight
        keys = name.replace(".{e}", "").removesuffix(".weight" if "{e}" in name else "").split(".")
        return Param(("model", "layers", str(i), *keys), prefix + name, axes, i)

    rows = [row(f"{norm}.weight", ("embed",)) for norm in ("input_layernorm", "post_attention_layernorm")]
    for name, heads in (("q_proj", "q_heads"), ("k_proj", "kv_heads"), ("v_proj", "kv_heads")):
        rows.append(row(f"self_attn.{name}.weight", (heads, "embed")))
        if cfg.qkv_bias:
            rows.append(row(f"self_attn.{name}.bias", (heads,)))
    rows.append(row("self_attn.o_proj.weight", ("embed", "q_heads")))

    def swiglu(module, inner):  # [out, in]
        return [row(f"{module}.gate_proj.weight", (inner, "embed")),
                row(f"{module}.up_proj.weight", (inner, "embed")),
                row(f"{module}.down_proj.weight", ("embed", inner))]

    if cfg.sparse_layers[i]:
        rows.append(row("mlp.gate.weight", (None, "embed")))
        experts = ("model", "layers", str(i), "mlp", "experts")
        rows += [Param(experts + ("gate_up_proj",), prefix + "mlp.experts.{e}.{part}.weight",  # [E, 2, out, in]
                       ("experts", None, "moe_mlp", "embed"), i, parts=("gate_proj", "up_proj")),
                 row("mlp.experts.{e}.down_proj.weight", ("experts", "embed", "moe_mlp"))]  # [E, out, in]
        rows += swiglu("mlp.shared_expert", "shared_mlp")
        rows.append(row("mlp.shared_expert_gate.weight", (None, "embed")))
    else:
        rows += swiglu("mlp", "mlp")
    return rows


def param_table(cfg: Qwen2MoeConfig) -> list[Param]:
    """Every parameter of the model described by ``cfg``, in Hugging Face's order; a quantized weight is two
    rows, its values and then its scales."""
    rows = [Param(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", ("vocab", "embed"))]
    for i in range(cfg.num_hidden_layers):
        rows += _layer_rows(cfg, i)
    rows.append(Param(("model", "norm", "weight"), "model.norm.weight", ("embed",)))
    if not cfg.tie_word_embeddings:
        rows.append(Param(("lm_head", "weight"), "lm_head.weight", ("vocab", "embed")))
    if cfg.quantization is None:
        return rows
    out = []
    for p in rows:
        if not is_quantized(cfg, p.path):
            out.append(p)
            continue
        axis = len(p.axes) - 1  # [out, in], [E, out, in] and [E, 2, out, in]: inputs on the last axis
        out.append(dataclasses.replace(p, quant_axis=axis))
        out.append(dataclasses.replace(p, path=scale_path(p.path), quant_axis=axis, is_scale=True))
    return out


# Quantized when the config asks: the projections of attention and of every MLP and expert (not the router,
# the shared-expert gate, norms, biases or embeddings), and lm_head with QuantConfig.lm_head.
_QUANTIZED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"}


def is_quantized(cfg: Qwen2MoeConfig, path: tuple[str, ...]) -> bool:
    """Whether the weight at ``path`` (a float model's path) is stored quantized under ``cfg.quantization``."""
    q = cfg.quantization
    if q is None:
        return False
    if path == ("lm_head", "weight"):
        return q.lm_head
    owner = path[-2] if path[-1] == "weight" else path[-1] if path[-2] == "experts" else None
    return owner in _QUANTIZED


def scale_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """Where the scales of the quantized weight at ``path`` live: ``weight_scale`` beside a Linear's ``weight``,
    ``gate_up_proj_scale`` beside an expert stack ``gate_up_proj``."""
    return path[:-1] + (path[-1] + "_scale",)


def param_dtype(p: Param, dtype, cfg: Qwen2MoeConfig):
    """The stored dtype of ``p`` in a model of ``dtype``: the quantized type for values, float32 for scales."""
    if p.is_scale:
        return np.dtype(np.float32)
    if p.quant_axis is not None:
        return np.dtype(cfg.quantization.storage)
    return dtype


# Tensors a checkpoint may carry that hold no weights of ours.
def _ignorable(name: str, cfg: Qwen2MoeConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def param_shape(cfg: Qwen2MoeConfig, p: Param) -> tuple[int, ...]:
    """Our shape of ``p``, from the module tree's abstract shapes."""
    return _abstract_shapes(cfg)[p.path]


@functools.cache  # configs are frozen and hashable; the module tree is traced once per config
def _abstract_shapes(cfg: Qwen2MoeConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from .modeling import abstract_model

    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg)))
    return {tuple(str(k) for k in path): tuple(v.shape) for path, v in flat}


def hf_names(cfg: Qwen2MoeConfig, p: Param) -> np.ndarray:
    """HF tensor names filling ``p``: a scalar array, or one name per expert (and part), shaped as the stack
    dims."""
    if p.parts:
        return np.array([[p.hf.format(e=e, part=part) for part in p.parts] for e in range(cfg.num_experts)],
                        dtype=object)
    if p.per_expert:
        return np.array([p.hf.format(e=e) for e in range(cfg.num_experts)], dtype=object)
    return np.array(p.hf, dtype=object)


def hf_shape(cfg: Qwen2MoeConfig, p: Param) -> tuple[int, ...]:
    return param_shape(cfg, p)[p.num_stack_dims:]


def check_tensors(cfg: Qwen2MoeConfig, tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """Every expected tensor present with its shape and a float dtype; nothing unknown. Returns the used ones."""
    used: dict[str, TensorRef] = {}
    for p in param_table(cfg):
        if p.is_scale:  # made from the same tensors as its values
            continue
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
    """The block ``index`` (a tuple of slices over our shape) of parameter ``p``, read from the HF tensors
    (only the bytes of that block) and cast to ``dtype``; a quantized row's values or scales are quantized
    from the float block over the whole contracting axis (``dtype`` is then the row's own)."""
    if p.quant_axis is not None:
        return _read_quantized(cfg, p, tensors, index)
    shape = param_shape(cfg, p)
    index = tuple(index) if index is not None else ()
    index = index + (slice(None),) * (len(shape) - len(index))
    n = p.num_stack_dims
    names = hf_names(cfg, p)[index[:n]] if n else hf_names(cfg, p)
    inner = index[n:]

    def one(name):
        a = tensors[name].array()
        return np.asarray(a[inner], dtype=dtype)

    if n == 0:
        return one(str(names))
    flat = [one(name) for name in names.flat]
    return np.stack(flat).reshape(names.shape + flat[0].shape) if flat else np.zeros(
        names.shape + tuple(len(range(*s.indices(d))) for s, d in zip(inner, shape[n:])), dtype)


def _read_quantized(cfg, p, tensors, index):

    shape = param_shape(cfg, p)
    index = tuple(index) if index is not None else ()
    index = index + (slice(None),) * (len(shape) - len(index))
    a = p.quant_axis
    whole = index[:a] + (slice(None),) + index[a + 1:]  # the contracting axis whole: every block of it
    float_row = dataclasses.replace(p, path=p.path[:-1] + (p.path[-1].removesuffix("_scale"),), quant_axis=None,
                                    is_scale=False)
    values, scale = quantize(read_block(cfg.replace(quantization=None), float_row, tensors, whole, np.float32),
                             cfg.quantization, a)
    picked = scale if p.is_scale else values
    return np.asarray(picked[(slice(None),) * a + (index[a],)])


def iter_params(cfg: Qwen2MoeConfig) -> Iterator[tuple[Param, tuple[int, ...]]]:
    for p in param_table(cfg):
        yield p, param_shape(cfg, p)


def layout_digest(cfg: Qwen2MoeConfig) -> str:
    """Eight hex digits over every stored parameter's path, shape and logical axes: two releases that store a
    parameter differently (even a square one transposed) give different digests. The demo's cache is keyed by
    it; converted checkpoints record ``LAYOUT_VERSION`` instead (a digest would change with config.json)."""
    text = "\n".join(f"{p.name} {list(shape)} {list(p.axes)}" for p, shape in iter_params(cfg))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def nest(items: Iterable[tuple[tuple[str, ...], object]]) -> dict:
    """A nested dict from ``(path, value)`` pairs, keyed as the module tree is (a layer's index as an int)."""
    tree: dict = {}
    for path, value in items:
        keys = [int(k) if k.isdigit() else k for k in path]
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def lookup(tree: dict, path: tuple[str, ...]):
    """The value at ``path`` in a nested dict keyed either way (a layer's index as a string or an int)."""
    for key in path:
        tree = tree[key] if key in tree else tree[int(key)]
    return tree


def load_hf(directory: str, cfg: Qwen2MoeConfig, dtype, shardings=None) -> dict:
    """A nested dict of ``jax.Array`` parameters read from an HF directory; with ``shardings`` (a dict
    path -> Sharding), each device reads and receives only its own block."""
    tensors = check_tensors(cfg, read_tensors(directory))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return nest((p.path, jax.make_array_from_callback(
        shape, (shardings or {}).get(p.path) or default,
        lambda idx, p=p: read_block(cfg, p, tensors, idx, param_dtype(p, dtype, cfg))))
        for p, shape in iter_params(cfg))


def quantize_tree(cfg: Qwen2MoeConfig, tree: dict, shardings=None) -> dict:
    """A float model's parameter tree (nested dict of ``jax.Array``, ``cfg`` without quantization's paths)
    quantized as ``cfg.quantization`` says, each weight on its devices (``shardings[path]`` for the values and
    scales; default: where the float weight is), one weight at a time."""
    out = []
    for p in param_table(cfg):
        if p.is_scale:
            continue
        if p.quant_axis is None:
            out.append((p.path, lookup(tree, p.path)))
            continue
        w = lookup(tree, p.path)
        sv = (shardings or {}).get(p.path) or w.sharding
        ss = (shardings or {}).get(scale_path(p.path)) or w.sharding
        values, scale = _quantize_jit(cfg.quantization, p.quant_axis, sv, ss)(w)
        out += [(p.path, values), (scale_path(p.path), scale)]
    return nest(out)


@functools.lru_cache(maxsize=None)
def _quantize_jit(q, axis, values_sharding, scale_sharding):

    return jax.jit(lambda w: quantize(w, q, axis), out_shardings=(values_sharding, scale_sharding))


def init_random(cfg: Qwen2MoeConfig, *, dtype=jnp.float32, seed: int = 0, shardings=None) -> Qwen2MoeForCausalLM:
    """A model with random weights (normal, std 0.02; norm weights one), for demos and benchmarks.

    Each weight is drawn on its own: on XLA:CPU with numpy (compiling threefry for a whole model takes XLA:CPU
    longer than drawing the numbers), on accelerators by a jitted draw straight into the device memory (and
    into ``shardings[path]`` when given), so a model larger than host memory can be made. With
    ``cfg.quantization``: the float model's random weights, quantized."""
    if cfg.quantization is not None:
        return quantize_model(init_random(cfg.replace(quantization=None), dtype=dtype, seed=seed, shardings=shardings),
                              cfg.quantization, shardings=shardings)
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
    nnx.replace_by_pure_dict(state, nest(leaves))
    nnx.update(model, state)
    return model


def quantize_model(model: Qwen2MoeForCausalLM, quant, shardings=None) -> Qwen2MoeForCausalLM:
    """A new model whose projections hold ``quant``'s values and scales (``QuantConfig``, or "int8", "fp8",
    "int8:128"), quantized from ``model``'s float weights where they lie (or into ``shardings[path]``), one
    weight at a time. ``model`` keeps its own arrays."""
    quant = QuantConfig.parse(quant)
    if model.config.quantization is not None:
        raise InputError(f"the model is already quantized ({model.config.quantization.dtype}); quantize a float model")
    cfg = model.config.replace(quantization=quant)
    tree = quantize_tree(cfg, nnx.to_pure_dict(nnx.state(model)), shardings)
    out = abstract_model(cfg, dtype=model.dtype)
    state = nnx.state(out)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(out, state)
    for name in ("mesh", "generation_config"):
        if hasattr(model, name):
            setattr(out, name, getattr(model, name))
    return out


def _device_normal(shape, dtype, sharding):
    return jax.jit(lambda key: (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype), out_shardings=sharding)
