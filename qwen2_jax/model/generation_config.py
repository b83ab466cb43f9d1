"""A checkpoint's generation defaults (``generation_config.json``), as transformers' ``GenerationConfig`` reads
them: the end tokens and sampling settings that ``generate``, ``chat`` and the server start from."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .hf_files import CheckpointError


def is_int(x) -> bool:
    """A Python or numpy integer, not a bool (token ids and seeds as users pass them)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What a checkpoint's ``generation_config.json`` sets; absent keys take transformers' defaults."""

    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None

    @classmethod
    def from_pretrained(cls, path) -> "GenerationConfig | None":
        """The checkpoint directory's ``generation_config.json``, or None when it has none."""
        file = os.path.join(os.fspath(path), "generation_config.json")
        if not os.path.isfile(file):
            return None
        try:
            with open(file) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read generation config ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{file}: expected a JSON object")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields and v is not None}
        eos = values.get("eos_token_id", [])
        eos = eos if isinstance(eos, list) else [eos]
        if not all(is_int(e) and 0 <= e < 2**31 for e in eos):
            raise CheckpointError(f"{file}: not a valid generation config (eos_token_id is "
                                  f"{raw.get('eos_token_id')!r}; expected a token id or a list of them)")
        values["eos_token_id"] = tuple(int(e) for e in eos)
        return cls(**values)
