"""``from_pretrained``: a Hugging Face directory or an Orbax checkpoint made by ``qwen2-jax convert``."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from .config import Qwen2MoeConfig
from .generate import GenerationConfig
from .hf_files import CheckpointError
from .model import Qwen2MoeForCausalLM, abstract_model
from .params import load_hf

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
ORBAX_PARAMS = "params"  # the Orbax checkpoint's sub-directory inside a converted directory


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"dtype {jnp.dtype(dtype).name} is not supported; expected bfloat16 or float32")
    return jnp.dtype(dtype).type


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ORBAX_PARAMS))


def from_pretrained(path, *, dtype="bfloat16", mesh=None) -> Qwen2MoeForCausalLM:
    """Loads a model from an HF directory (safetensors, single or sharded) or a converted Orbax directory.

    With ``mesh`` (a ``jax.sharding.Mesh``, see ``qwen2_jax.sharding.make_mesh``) every array is placed
    directly in its sharding: each device reads only its own block of each weight.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    dtype = resolve_dtype(dtype)
    cfg = Qwen2MoeConfig.from_json(path)
    shardings = None
    if mesh is not None:
        from .sharding import param_shardings

        shardings = param_shardings(cfg, mesh)
    if is_orbax_checkpoint(path):
        from .convert import restore_params

        tree = restore_params(path, cfg, dtype, shardings)
    else:
        tree = load_hf(path, cfg, dtype, shardings)
    model = build_model(cfg, tree, dtype, mesh)
    # End tokens and sampling defaults of the checkpoint (for this model <|im_end|> as well as <|endoftext|>).
    model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def build_model(cfg: Qwen2MoeConfig, tree: dict, dtype, mesh=None) -> Qwen2MoeForCausalLM:
    """The module tree with its parameters set from a nested dict of arrays (as ``params.load_hf`` makes)."""
    model = abstract_model(cfg, dtype=dtype)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(model, state)
    model.mesh = mesh
    return model
