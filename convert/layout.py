"""What a directory written by ``qwen2-jax convert`` holds, for the loader to recognise one without importing
Orbax: the Orbax parameter tree in ``params/`` and the conversion's record in ``qwen2_jax.json``, beside the
source's config.json, generation_config.json and tokenizer files."""

from __future__ import annotations

import os

ORBAX_PARAMS = "params"  # the Orbax checkpoint's sub-directory inside a converted directory
METADATA_FILE = "qwen2_jax.json"  # source files and sizes, dtypes and shapes, layout and qwen2-jax version


def is_orbax_checkpoint(path) -> bool:
    return os.path.isdir(os.path.join(os.fspath(path), ORBAX_PARAMS))
