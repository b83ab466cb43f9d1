"""qwen2-jax: Qwen2-57B-A14B-Instruct (Hugging Face ``Qwen2MoeForCausalLM``) in JAX / Flax NNX.

Public API::

    model = qwen2_jax.from_pretrained(path, dtype="bfloat16" | "float32", mesh=None, quantize=None | "int8" | "fp8")
    qmodel = qwen2_jax.quantize_model(model, "int8")       # weight-only int8 (or "fp8", "int8:128": per block)
    logits = model(input_ids, attention_mask=None)        # [B, T, vocab] float32
    tokens = qwen2_jax.generate(model, [ids, ...], max_new_tokens=64, temperature=0.0)  # new token ids per prompt
    for new in qwen2_jax.generate_stream(model, [ids], max_new_tokens=64): ...  # streamed as they come
    tokenizer = qwen2_jax.load_tokenizer(path)  # encode, decode, apply_chat_template
    mesh = qwen2_jax.sharding.make_mesh("data=1,expert=4,tensor=2")

The package, top-down (docs/architecture.md): ``model`` (config, parameters, the NNX decoder, attention, MoE
dispatch, quantization, KV cache) -> ``sharding`` and ``convert`` -> ``loading`` (``from_pretrained``) ->
``inference`` (sampling, ``generate``, the tokenizer, the serving engine and server) and ``training`` -> ``tools``
(``aot``, HLO analysis, parity, bench, demo) -> ``cli``. Each imports only from the layers before it.

Every name here is imported on first use, so ``import qwen2_jax`` is instant and the ``qwen2-jax`` command can
answer ``--help`` without starting jax. Bad input raises a subclass of ``qwen2_jax.Qwen2JaxError`` (a
ValueError) with a one-line message.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from .errors import InputError, Qwen2JaxError

__version__ = "0.3.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "from_pretrained": "qwen2_jax.loading",
    "generate": "qwen2_jax.inference.generate",
    "generate_stream": "qwen2_jax.inference.generate",
    "load_tokenizer": "qwen2_jax.inference.tokenizer",
    "Qwen2MoeForCausalLM": "qwen2_jax.model.modeling",
    "init_random": "qwen2_jax.model.params",
    "quantize_model": "qwen2_jax.model.params",
    "Qwen2MoeConfig": "qwen2_jax.model.config",
    "ConfigError": "qwen2_jax.model.config",
    "QuantConfig": "qwen2_jax.model.quant",
    "CheckpointError": "qwen2_jax.model.hf_files",
}
_SUBPACKAGES = ("model", "inference", "training", "tools", "cli", "sharding", "convert", "loading")

__all__ = sorted([*_EXPORTS, "InputError", "Qwen2JaxError", "__version__"])


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS, *_SUBPACKAGES])


# Modules that moved in 0.2.0 (CHANGELOG.md): the old import paths still work in 0.2 and 0.3, with a
# DeprecationWarning. ``qwen2_jax.generate`` is not among them: that name is the function.
MOVED = {
    "qwen2_jax.config": "qwen2_jax.model.config",
    "qwen2_jax.quant": "qwen2_jax.model.quant",
    "qwen2_jax.matmul": "qwen2_jax.model.matmul",
    "qwen2_jax.attention": "qwen2_jax.model.attention",
    "qwen2_jax.moe": "qwen2_jax.model.moe",
    "qwen2_jax.cache": "qwen2_jax.model.cache",
    "qwen2_jax.hf_files": "qwen2_jax.model.hf_files",
    "qwen2_jax.params": "qwen2_jax.model.params",
    "qwen2_jax.views": "qwen2_jax.model.views",
    "qwen2_jax.sampling": "qwen2_jax.inference.sampling",
    "qwen2_jax.tokenizer": "qwen2_jax.inference.tokenizer",
    "qwen2_jax.engine": "qwen2_jax.inference.serving.engine",
    "qwen2_jax.serve": "qwen2_jax.inference.serving.server",
    "qwen2_jax.aot": "qwen2_jax.tools.aot",
    "qwen2_jax.hlo_cost": "qwen2_jax.tools.hlo_cost",
    "qwen2_jax.parity": "qwen2_jax.tools.parity",
    "qwen2_jax.bench": "qwen2_jax.tools.bench",
    "qwen2_jax.bench_hf_runner": "qwen2_jax.tools.bench_hf_runner",
    "qwen2_jax.demo": "qwen2_jax.tools.demo",
    "qwen2_jax.cli_generate": "qwen2_jax.cli.generate",
    "qwen2_jax.convert.cli": "qwen2_jax.cli.convert",
    "qwen2_jax.sharding.expert_parallel": "qwen2_jax.model.expert_parallel",
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module at its new one (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import system set the old name's spec on the shared module


if not any(isinstance(f, _MovedModule) for f in sys.meta_path):
    sys.meta_path.append(_MovedModule())
