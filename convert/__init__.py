"""Hugging Face safetensors -> Orbax: ``qwen2-jax convert HF_DIR OUT_DIR`` and its Python API.

- ``convert(hf_dir, out_dir, *, dtype=None, force=False, progress=None) -> dict``: streams the checkpoint
  into an Orbax checkpoint in bounded memory, atomically (see ``converter``).
- ``restore_params(path, cfg, dtype, shardings)``: the converted parameters, each array restored straight
  into its sharding (``qwen2_jax.from_pretrained`` calls it for converted directories).
- ``write_hf_checkpoint(cfg, directory, ...)``: synthetic or exported HF checkpoints without torch.
"""


import importlib

# Imported on first use: the converter brings in Orbax and TensorStore, which loading an HF directory or
# recognising a converted one (``layout``) does not need.
_EXPORTS = {"ConvertError": "converter", "convert": "converter", "restore_params": "converter",
            "write_hf_checkpoint": "hf_writer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
