"""Accuracy of weight-only quantization against the float model, teacher-forced over fixed text.

    python scripts/quant_accuracy.py --config qwen2-57b-a14b-quarter --quantize int8 int8:128 fp8
    python scripts/quant_accuracy.py --checkpoint HF_OR_ORBAX_DIR --quantize int8
    python scripts/quant_accuracy.py --tiny          # seconds (CI)

For each quantization, against the same model in float32: the KL divergence of the next-token distributions
(mean and p99 over positions), top-1 agreement, the routers' top-k agreement per MoE layer (the fraction of
(token, expert) choices shared), and each layer's output relative error (the quantized layer and the float
layer on the same float input; the error relative to what the layer adds to the residual stream). Random
weights (``init_random``) unless ``--checkpoint``. Prints a table; ``--json`` writes the figures.
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import qwen2_jax
from qwen2_jax.tools.bench import bench_config
from qwen2_jax.model.modeling import rope_cos_sin

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel "
        "Tower surpassed the Washington Monument to become the tallest man-made structure in the world, a title "
        "it held for 41 years until the Chrysler Building in New York City was finished in 1930. ")


def token_ids(vocab_size: int, length: int) -> np.ndarray:
    """The fixed text's Qwen tokens (repeated to ``length``); for a small vocabulary, the ids modulo it."""
    import tempfile

    from qwen2_jax.inference.tokenizer import build_qwen2_tokenizer_files

    with tempfile.TemporaryDirectory() as d:
        build_qwen2_tokenizer_files(d)
        ids = qwen2_jax.load_tokenizer(d).encode(TEXT * (1 + length // 60))
    return (np.asarray(ids[:length]) % vocab_size)[None]


def layer_outputs(model, ids):
    """Each layer's input and output hidden states of ``model`` on ``ids`` (no cache): [(h_in, h_out), ...]."""
    h = model.model.embed_tokens(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    cos, sin = rope_cos_sin(model.config, positions, h.dtype)
    valid = jnp.ones(ids.shape, bool)
    out = []
    for i, layer in enumerate(model.model.layers):
        h_out = layer(h, cos, sin, valid, None, i)[0]
        out.append((h, h_out))
        h = h_out
    return out


def measure(float_model, quantized, ids) -> dict:
    ref = float_model.forward(ids, output_router_logits=True)
    got = quantized.forward(ids, output_router_logits=True)
    p, q = jax.nn.log_softmax(ref.logits[0], -1), jax.nn.log_softmax(got.logits[0], -1)
    kl = np.asarray(jnp.sum(jnp.exp(p) * (p - q), -1))
    top1 = float(np.mean(np.asarray(ref.logits[0].argmax(-1) == got.logits[0].argmax(-1))))
    k = float_model.config.num_experts_per_tok
    routers = []
    if ref.router_logits is not None:
        for a, b in zip(np.asarray(ref.router_logits), np.asarray(got.router_logits)):
            ta, tb = np.argsort(-a, -1)[:, :k], np.argsort(-b, -1)[:, :k]
            routers.append(float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)])))
    layers = []
    q_layers = quantized.model.layers
    for i, (h_in, h_out) in enumerate(layer_outputs(float_model, ids)):
        delta = np.asarray(h_out - h_in)
        err = np.asarray(q_layers[i](h_in, *_rope(float_model, ids, h_in), None, i)[0] - h_out)
        layers.append(float(np.linalg.norm(err) / np.linalg.norm(delta)))
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "top1": top1,
            "router_topk_agreement": routers, "layer_rel_error": layers,
            "weight_bytes": int(sum(x.nbytes for x in jax.tree.leaves(_params(quantized))))}


def _rope(model, ids, h):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    return (*rope_cos_sin(model.config, positions, h.dtype), jnp.ones(ids.shape, bool))


def _params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--config", default="qwen2-57b-a14b-quarter", help="embedded config or 'tiny' (random weights)")
    ap.add_argument("--checkpoint", default=None, help="an HF or Orbax checkpoint instead of random weights")
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers of --config")
    ap.add_argument("--quantize", nargs="+", default=["int8", "int8:128", "fp8"])
    ap.add_argument("--tokens", type=int, default=256, help="positions of the fixed text (teacher-forced)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--tiny", action="store_true", help="the tiny config, 32 tokens, int8 only (seconds)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.config, args.tokens, args.quantize, args.checkpoint = "tiny", 32, ["int8", "int8:16"], None
    if args.checkpoint:
        model = qwen2_jax.from_pretrained(args.checkpoint, dtype="float32")
        name = args.checkpoint
    else:
        model = qwen2_jax.init_random(bench_config(args.config, args.layers), dtype=jnp.float32, seed=0)
        name = args.config
    ids = jnp.asarray(token_ids(model.config.vocab_size, args.tokens))
    results = {}
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(_params(model)))
    print(f"{name}: {args.tokens} tokens of fixed text, teacher-forced; float32 weights {float_bytes / 1e9:.3f} GB")
    print(f"{'quantize':>10} {'KL mean':>10} {'KL p99':>10} {'top-1':>7} {'router top-k (min/mean)':>24} "
          f"{'layer rel err (max/mean)':>25} {'weights GB':>10}")
    for spec in args.quantize:
        r = measure(model, qwen2_jax.quantize_model(model, spec), ids)
        results[spec] = r
        ra, le = r["router_topk_agreement"] or [float("nan")], r["layer_rel_error"]
        print(f"{spec:>10} {r['kl_mean']:10.2e} {r['kl_p99']:10.2e} {r['top1']:7.3f} "
              f"{min(ra):11.3f} / {np.mean(ra):.3f} {max(le):12.2e} / {np.mean(le):.2e} {r['weight_bytes'] / 1e9:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "tokens": args.tokens, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
