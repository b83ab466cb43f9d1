"""Hugging Face safetensors -> Orbax: ``qwen2-jax convert HF_DIR OUT_DIR`` and its Python API.

- ``convert(hf_dir, out_dir, *, dtype=None, force=False, progress=None) -> dict``: streams the checkpoint
  into an Orbax checkpoint in bounded memory, atomically (see ``converter``).
- ``restore_params(path, cfg, dtype, shardings)``: the converted parameters, each array restored straight
  into its sharding (``qwen2_jax.from_pretrained`` calls it for converted directories).
- ``write_hf_checkpoint(cfg, directory, ...)``: synthetic or exported HF checkpoints without torch.
"""

from .converter import ConvertError, convert, restore_params
from .hf_writer import write_hf_checkpoint

__all__ = ["ConvertError", "convert", "restore_params", "write_hf_checkpoint"]
