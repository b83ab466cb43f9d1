"""``from_pretrained``: a Hugging Face directory or an Orbax checkpoint made by ``qwen2-jax convert``."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qwen2_jax.convert.layout import is_orbax_checkpoint
from qwen2_jax.errors import InputError, Qwen2JaxError
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.model.generation_config import GenerationConfig
from qwen2_jax.model.hf_files import CheckpointError, check_checkpoint_dir
from qwen2_jax.model.modeling import Qwen2MoeForCausalLM, abstract_model
from qwen2_jax.model.params import load_hf, quantize_tree
from qwen2_jax.model.quant import QuantConfig

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        raise InputError(f"dtype {dtype!r} is not a dtype; expected 'bfloat16' or 'float32'") from None
    if name not in DTYPES:
        raise InputError(f"dtype {name} is not supported; expected bfloat16 or float32")
    return DTYPES[name]


def read_generation_config(path) -> GenerationConfig | None:
    """The checkpoint's ``generation_config.json`` (None when it has none); one that cannot be read is a
    CheckpointError naming the file."""
    try:
        return GenerationConfig.from_pretrained(path)
    except (ValueError, TypeError) as e:  # unreadable JSON, or an end token such as null or "x"
        if isinstance(e, Qwen2JaxError):
            raise
        file = os.path.join(os.fspath(path), "generation_config.json")
        text = " ".join(str(e).splitlines())
        raise CheckpointError(text if text.startswith(file) else f"{file}: not a valid generation config ({text})") from None


def from_pretrained(path, *, dtype="bfloat16", mesh=None, quantize=None) -> Qwen2MoeForCausalLM:
    """Loads a model from an HF directory (safetensors, single or sharded) or a converted Orbax directory.

    With ``mesh`` (a ``jax.sharding.Mesh``, see ``qwen2_jax.sharding.make_mesh``) every array is placed
    directly in its sharding: each device reads only its own block of each weight.
    ``quantize`` ("int8", "fp8", "int8:BLOCK" or a ``QuantConfig``): weight-only quantization of a float
    checkpoint as it loads (a checkpoint ``convert --quantize`` wrote is quantized already, and loads so).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a checkpoint directory (a str or os.PathLike), got {type(path).__name__}")
    path = check_checkpoint_dir(path)
    dtype = resolve_dtype(dtype)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise InputError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__} {mesh!r:.60}; make one with "
                         'qwen2_jax.sharding.make_mesh("data=1,expert=4,tensor=2")')
    cfg = Qwen2MoeConfig.from_json(path)
    quant = QuantConfig.parse(quantize)
    if quant is not None:
        if cfg.quantization is not None:
            raise InputError(f"{path}: already quantized ({cfg.quantization.dtype}); load it without quantize=")
        cfg = cfg.replace(quantization=quant)
    shardings = None
    if mesh is not None:
        from qwen2_jax.sharding import param_shardings

        shardings = param_shardings(cfg, mesh)
    if is_orbax_checkpoint(path):
        from qwen2_jax.convert import restore_params

        # A float checkpoint asked to quantize: restored in float, then each weight quantized on its devices.
        stored = cfg.replace(quantization=None) if quant is not None else cfg
        tree = restore_params(path, stored, dtype, shardings)
        if quant is not None:
            tree = quantize_tree(cfg, tree, shardings)
    else:
        tree = load_hf(path, cfg, dtype, shardings)  # quantized block by block as it is read
    model = build_model(cfg, tree, dtype, mesh)
    # End tokens and sampling defaults of the checkpoint (for this model <|im_end|> as well as <|endoftext|>).
    model.generation_config = read_generation_config(path)
    return model


def build_model(cfg: Qwen2MoeConfig, tree: dict, dtype, mesh=None) -> Qwen2MoeForCausalLM:
    """The module tree with its parameters set from a nested dict of arrays (as ``params.load_hf`` makes)."""
    model = abstract_model(cfg, dtype=dtype)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(model, state)
    model.mesh = mesh
    return model
