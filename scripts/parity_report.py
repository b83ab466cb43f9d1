"""Writes docs/parity.md: for each parity configuration of tests/test_model_parity.py, the max |logit difference|
against transformers (PyTorch, CPU, float32) on the same random weights, relative to max |logit|, and the top-1
agreement, for float32 and bfloat16 weights.

    python scripts/parity_report.py [--out docs/parity.md]
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import qwen2_jax  # noqa: E402
from hf_reference import hf_logits, make_hf_model, save_hf  # noqa: E402
from test_model_parity import CONFIGS, _batch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/parity.md")
    args = ap.parse_args()
    rows = []
    for name, (overrides, rewrite, save_opts) in CONFIGS.items():
        hf = make_hf_model(seed=len(name), **overrides)
        with tempfile.TemporaryDirectory() as d:
            save_hf(hf, d, config_overrides=rewrite, **save_opts)
            ids, mask = _batch(hf.config.vocab_size)
            ref = hf_logits(hf, ids, mask)
            valid = mask.astype(bool)
            for dtype in ("float32", "bfloat16"):
                model = qwen2_jax.from_pretrained(d, dtype=dtype)
                ours = np.asarray(jax.jit(model.__call__)(jnp.asarray(ids), jnp.asarray(mask)))
                diff = np.abs(ours - ref)[valid].max()
                rel = diff / np.abs(ref[valid]).max()
                top1 = (ours.argmax(-1) == ref.argmax(-1))[valid].mean()
                rows.append((name, dtype, diff, rel, top1, int(valid.sum())))
                print(f"{name:18s} {dtype:9s} max|diff| {diff:.3e}  rel {rel:.3e}  top-1 {top1:.4f}", flush=True)
    with open(args.out, "w") as f:
        f.write("# Parity with Hugging Face transformers\n\n")
        f.write(f"Reference: transformers {transformers.__version__} `Qwen2MoeForCausalLM`, torch {torch.__version__}, "
                f"CPU, float32, on random weights written with `save_pretrained` (tests/hf_reference.py). "
                f"Ours: jax {jax.__version__} on {jax.default_backend()}. Batch of 3 x 48 tokens with right and left "
                f"padding; only real (non-padding) positions are compared. Target for float32: "
                f"max |diff| <= 1e-4 x max |logit|.\n\n")
        f.write(f"Generated {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores) by "
                f"`python scripts/parity_report.py`.\n\n")
        f.write("| configuration | weights | max abs diff | max diff / max logit | top-1 agreement | positions |\n")
        f.write("|---|---|---:|---:|---:|---:|\n")
        for name, dtype, diff, rel, top1, n in rows:
            f.write(f"| {name} | {dtype} | {diff:.2e} | {rel:.2e} | {top1:.4f} | {n} |\n")
        f.write("\nConfigurations (see `CONFIGS` in tests/test_model_parity.py): `default_topk2` (top-2 of 8 "
                "experts, GQA 2:1); `norm_topk_prob` (top-3, renormalised); `top1`; `mha_ratio1` (q/kv ratio 1); "
                "`gqa_ratio7` (7 query heads per KV head, as the real model); `mlp_only_layers` [0, 2]; "
                "`sparse_step2` (decoder_sparse_step 2, dense and sparse layers mixed); `tied_embeddings`; "
                "`no_qkv_bias`; `yarn` (factor 2, 32 original positions, sequence 48); `hf4_schema_yarn` (the same "
                "written as a transformers 4.x config.json with `rope_scaling` and top-level `rope_theta`); "
                "`sharded_files` (model.safetensors.index.json over several files). All use rope_theta 1e6.\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
