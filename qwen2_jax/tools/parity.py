"""``qwen2-jax parity``: this port against transformers on a checkpoint, op by op and layer by layer.

    qwen2-jax parity HF_DIR [--prompts FILE] [--dtype float32|bfloat16] [--reference float64|float32]
                     [--layers N] [--json PATH|-] [--plot PATH]

Both sides run the same token ids. transformers (imported here only, when the command runs) is the reference,
in float64 (SDPA attention, eager experts: grouped_mm has no float64 kernel) or float32 (its defaults); its
intermediates come from forward hooks on ``self_attn``, ``mlp.gate``, ``mlp.experts``, ``mlp.shared_expert``,
``mlp`` and each decoder layer. Ours come from calling the model's modules in the order
``Qwen2MoeForCausalLM.forward`` does; the logits from the model's own forward. For each layer it reports the
relative error (max |ours - reference| over the real tokens / max |reference|) of the attention output, the
router logits, the routed experts' weighted sum, the shared expert's output (before its sigmoid gate), the MLP
block's output (the dense MLP's in a dense layer) and the residual stream after the layer, and the router's
top-k agreement; then the logits' error, the KL divergence of the next-token distributions and the top-1
agreement. Against float64 it also runs transformers in float32 and gives its error beside ours.

Where our router picks other experts than the reference's for a token (a near tie), that token, and the later
tokens of its row in later layers, are left out of the errors after it (``compare``), which so measure the
computation; the flips are counted in the top-k agreement. The first jump is the first op whose error is over
``JUMP`` times every earlier op's and over the floor of our dtype, or a router agreeing on under
``MIN_AGREEMENT`` of the tokens: where a bug, or a corrupted weight, first shows. ``--layers N`` keeps the first
N layers on both sides (and reads only their tensors), so a checkpoint larger than memory can be checked a few
layers at a time.
"""

from __future__ import annotations

import os
import re

import numpy as np

from qwen2_jax.errors import InputError

JUMP = 10.0
FLOOR = {"float32": 1e-5, "bfloat16": 1e-1}  # ~100 float32 ulps; ~10 bfloat16 ulps
MIN_AGREEMENT = 0.9  # a router picking other experts for more tokens than this is broken, not near ties
RANDOM_ROWS = 4  # without --prompts: rows of --length, 3/4, 1/2 and 1/4 of it (right-padded)
LAYER_OPS = ("attention", "router", "experts", "shared_expert", "mlp", "residual")


# ---- inputs -----------------------------------------------------------------------------------------------
def read_config(directory: str, layers: int | None):
    """The checkpoint's config cut to ``layers`` decoder layers, and its own number of layers."""
    from qwen2_jax.model.config import Qwen2MoeConfig
    from qwen2_jax.model.hf_files import CheckpointError, check_checkpoint_dir
    from qwen2_jax.loading import is_orbax_checkpoint

    if layers is not None and layers < 1:
        raise InputError(f"--layers is {layers}; expected at least 1")
    check_checkpoint_dir(directory)
    if is_orbax_checkpoint(directory):
        raise CheckpointError(f"{directory}: an Orbax checkpoint; parity needs the Hugging Face safetensors "
                              f"directory, which transformers reads too")
    cfg = Qwen2MoeConfig.from_json(directory)
    total = cfg.num_hidden_layers
    n = total if layers is None else layers
    if n > total:
        raise InputError(f"--layers is {n}; expected 1 to {total} (num_hidden_layers of {directory})")
    return cfg.replace(num_hidden_layers=n, mlp_only_layers=tuple(i for i in cfg.mlp_only_layers if i < n)), total


def read_prompts(args, directory: str, vocab_size: int) -> list[list[int]]:
    if args.prompts is None:
        if args.length < 1:
            raise InputError(f"--length is {args.length}; expected at least 1")
        rng = np.random.default_rng(args.seed)
        lengths = [max(1, args.length * (RANDOM_ROWS - k) // RANDOM_ROWS) for k in range(RANDOM_ROWS)]
        return [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]
    try:
        with open(args.prompts, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except OSError as e:
        raise InputError(f"--prompts {args.prompts}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"--prompts {args.prompts}: not UTF-8 text") from None
    numbered = [(k + 1, line) for k, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise InputError(f"--prompts {args.prompts}: no prompt (expected one per line)")
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        from qwen2_jax.inference.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(directory)
        prompts = [(k, tokenizer.encode(line)) for k, line in numbered]
    else:
        prompts = []
        for k, line in numbered:
            try:
                prompts.append((k, [int(t) for t in line.split()]))
            except ValueError:
                raise InputError(f"--prompts {args.prompts} line {k}: expected space-separated token ids ("
                                 f"{directory} has no tokenizer.json)") from None
    for k, ids in prompts:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad or not ids:
            raise InputError(f"--prompts {args.prompts} line {k}: " + (
                f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})" if bad else "no tokens"))
    return [ids for _, ids in prompts]


def batch(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and attention mask, [B, T]."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, :len(p)], mask[row, :len(p)] = p, 1
    return ids, mask


# ---- this port ----------------------------------------------------------------------------------------------
def load_ours(directory: str, cfg, dtype: str):
    """The model of ``cfg`` (perhaps fewer layers than the checkpoint), reading only the tensors it uses."""
    import jax

    from qwen2_jax.model.hf_files import read_tensors
    from qwen2_jax.loading import DTYPES, build_model
    from qwen2_jax.model.params import check_tensors, nest, param_table, read_block

    beyond = re.compile(r"^model\.layers\.(\d+)\.")
    tensors = {name: ref for name, ref in read_tensors(directory).items()
               if not ((m := beyond.match(name)) and int(m.group(1)) >= cfg.num_hidden_layers)}
    tensors = check_tensors(cfg, tensors)
    tree = nest((p.path, jax.device_put(read_block(cfg, p, tensors, dtype=DTYPES[dtype]))) for p in param_table(cfg))
    return build_model(cfg, tree, DTYPES[dtype])


def _layer_outputs(layer, h, cos, sin, valid):
    """One decoder layer's intermediates, as ``DecoderLayer.__call__`` computes them (no cache)."""
    import jax
    import jax.numpy as jnp

    a, _ = layer.self_attn(layer.input_layernorm(h), cos, sin, valid, None, 0)
    h = h + a
    x = layer.post_attention_layernorm(h)
    out = {"attention": a}
    if layer.sparse:
        f, router = layer.mlp(x)  # the block as the model runs it; its parts below, for the per-op errors
        flat = x.reshape(-1, x.shape[-1])
        # The routing of SparseMoeBlock.__call__: softmax over all experts in float32, top-k, optional renorm.
        weights, chosen = jax.lax.top_k(jax.nn.softmax(router, axis=-1), layer.mlp.top_k)
        if layer.mlp.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        out.update(router=router, topk=chosen, shared_expert=layer.mlp.shared_expert(flat),
                   experts=layer.mlp.experts(flat, weights.astype(x.dtype), chosen))
    else:
        f = layer.mlp(x)
    out.update(mlp=f, residual=h + f)
    return out


def run_ours(model, ids: np.ndarray, mask: np.ndarray) -> dict:
    """{"layers": [per-layer dict of float64 arrays], "logits": [B, T, V]}."""
    import jax.numpy as jnp
    from flax import nnx

    from qwen2_jax.model.modeling import rope_cos_sin

    ids, valid = jnp.asarray(ids), jnp.asarray(mask, bool)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    h = model.model.embed_tokens(ids)
    cos, sin = rope_cos_sin(model.config, positions, h.dtype)
    step = nnx.jit(_layer_outputs)  # compiled once per layer kind (sparse, dense)
    layers = []
    for layer in model.model.layers:
        out = step(layer, h, cos, sin, valid)
        h = out["residual"]
        layers.append({k: np.asarray(v, np.int64 if k == "topk" else np.float64) for k, v in out.items()})
    logits = nnx.jit(lambda m, i, v: m(i, v))(model, ids, valid)
    return {"layers": layers, "logits": np.asarray(logits, np.float64)}


# ---- transformers -------------------------------------------------------------------------------------------
def load_transformers(directory: str, num_layers: int, dtype: str):
    import torch
    import transformers
    from transformers import AutoConfig, Qwen2MoeForCausalLM

    transformers.logging.set_verbosity_error()  # the layers cut off are "unused weights"; that is intended
    transformers.utils.logging.disable_progress_bar()
    hf_cfg = AutoConfig.from_pretrained(directory)
    hf_cfg.num_hidden_layers = num_layers
    hf_cfg.mlp_only_layers = [i for i in (hf_cfg.mlp_only_layers or []) if i < num_layers]
    if getattr(hf_cfg, "layer_types", None):
        hf_cfg.layer_types = hf_cfg.layer_types[:num_layers]
    experts = "eager" if dtype == "float64" else "grouped_mm"
    # SDPA, not eager attention: in float64 eager's masked scores overflow to -inf, and a query that sees no key
    # (left padding) turns into NaN that spreads.
    return Qwen2MoeForCausalLM.from_pretrained(directory, config=hf_cfg, dtype=getattr(torch, dtype),
                                               attn_implementation="sdpa", experts_implementation=experts).eval()


def run_transformers(model, ids: np.ndarray, mask: np.ndarray) -> dict:
    """The same structure as ``run_ours``, from forward hooks."""
    import torch

    captured: dict = {}

    def keep(key):
        def hook(module, inputs, output):
            captured[key] = output
        return hook

    names = {"self_attn": "attention", "mlp.gate": "router", "mlp.experts": "experts",
             "mlp.shared_expert": "shared_expert", "mlp": "mlp", "": "residual"}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for path, op in names.items():
            if path.startswith("mlp.") and not hasattr(layer.mlp, "gate"):
                continue  # a dense layer's MLP has no router or experts
            module = layer.get_submodule(path) if path else layer
            handles.append(module.register_forward_hook(keep((i, op))))
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
    finally:
        for handle in handles:
            handle.remove()
    layers = [{} for _ in model.model.layers]
    for (i, op), output in captured.items():
        if op == "router":  # (router_logits, top-k weights, top-k indices)
            layers[i]["topk"] = output[2].numpy()
        tensor = output[0] if isinstance(output, tuple) else output
        layers[i][op] = tensor.detach().double().numpy()
    return {"layers": layers, "logits": logits.double().numpy()}


# ---- comparison ---------------------------------------------------------------------------------------------
def relative_error(x: np.ndarray, ref: np.ndarray, where: np.ndarray) -> float:
    """max |x - ref| over the tokens ``where`` ([B, T] or [B*T]) / max |ref| there; NaN over no token."""
    where = where.reshape(-1)
    if not where.any():
        return float("nan")
    x, ref = x.reshape(where.size, -1)[where], ref.reshape(where.size, -1)[where]
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), np.finfo(np.float64).tiny))


def compare(ours: dict, ref: dict, mask: np.ndarray, ref32: dict | None, dtype: str) -> dict:
    """Per-op errors, in the order the model computes them, over the tokens routed as the reference routes them
    so far. Where the router picks other experts (a near tie, in bfloat16 often), that token's MoE output differs
    by far more than rounding, and so do the later tokens of its row in later layers (they attend to it): those
    are counted in the router's top-k agreement and left out of the errors after it, which then measure the
    computation. The logits' summary is over all tokens."""
    valid = mask.astype(bool)
    same = valid.copy()  # [B, T]: tokens routed as the reference routes them, in every layer so far
    ops = []
    for i, (o, r) in enumerate(zip(ours["layers"], ref["layers"])):
        flipped = np.zeros_like(valid)
        for op in LAYER_OPS:
            if op not in r:
                continue
            where = same & ~flipped
            row = {"layer": i, "op": op, "error": relative_error(o[op], r[op], where), "tokens": int(where.sum())}
            if ref32 is not None:
                row["transformers_float32_error"] = relative_error(ref32["layers"][i][op], r[op], where)
            if op == "router":
                agree = (np.sort(o["topk"], -1) == np.sort(r["topk"], -1)).all(-1).reshape(valid.shape)
                row["topk_agreement"] = float(agree[same].mean()) if same.any() else float("nan")
                flipped = same & ~agree
            ops.append(row)
        same &= ~np.logical_or.accumulate(flipped, axis=1)
    row = {"layer": None, "op": "logits", "error": relative_error(ours["logits"], ref["logits"], same),
           "tokens": int(same.sum())}
    if ref32 is not None:
        row["transformers_float32_error"] = relative_error(ref32["logits"], ref["logits"], same)
    ops.append(row)

    v = ref["logits"].shape[-1]
    lo, lr = ours["logits"].reshape(-1, v)[valid.reshape(-1)], ref["logits"].reshape(-1, v)[valid.reshape(-1)]
    log_p, log_q = _log_softmax(lr), _log_softmax(lo)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    everywhere = np.ones(len(lo), bool)
    logits = {"error": relative_error(lo, lr, everywhere), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
              "top1_agreement": float((lo.argmax(-1) == lr.argmax(-1)).mean())}
    if ref32 is not None:
        logits["transformers_float32_error"] = relative_error(ref32["logits"], ref["logits"], valid)
    return {"ops": ops, "logits": logits, "first_jump": first_jump(ops, FLOOR[dtype]), "tokens": int(valid.sum())}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def first_jump(ops: list[dict], floor: float) -> dict | None:
    """The first op whose error is over ``JUMP`` x every earlier op's and over ``floor``, or the first router
    that routes under ``MIN_AGREEMENT`` of the tokens as the reference does."""
    worst = 0.0
    for row in ops:
        if row.get("topk_agreement", 1.0) < MIN_AGREEMENT or (row["error"] > floor and row["error"] > JUMP * worst):
            return {"layer": row["layer"], "op": row["op"], "error": row["error"], "before": worst,
                    **({"topk_agreement": row["topk_agreement"]} if "topk_agreement" in row else {})}
        if row["error"] == row["error"]:  # not NaN (no token left to compare)
            worst = max(worst, row["error"])
    return None


# ---- report -------------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    has32 = result["reference"] == "float64"
    lines = [f"qwen2-jax parity: {result['checkpoint']}, {result['layers']} of {result['checkpoint_layers']} layers; "
             f"ours {result['dtype']} against transformers {result['reference']}; {result['prompts']} prompts, "
             f"{result['tokens']} tokens",
             "errors: max |ours - reference| / max |reference| over the tokens routed as the reference routes them",
             f"{'layer':>5}  {'op':<14} {'error':>9}" + (f"  {'transformers float32':>20}" if has32 else "")
             + f"  {'tokens':>6}  {'top-k agreement':>15}"]
    jump = result["first_jump"]
    for row in result["ops"]:
        line = f"{'' if row['layer'] is None else row['layer']:>5}  {row['op']:<14} {row['error']:>9.2e}"
        if has32:
            line += f"  {row['transformers_float32_error']:>20.2e}"
        line += f"  {row['tokens']:>6}"
        if "topk_agreement" in row:
            line += f"  {row['topk_agreement']:>15.4f}"
        if jump and (row["layer"], row["op"]) == (jump["layer"], jump["op"]):
            line += "  <- first jump"
        lines.append(line.rstrip())
    lg = result["logits"]
    lines.append(f"logits over all {result['tokens']} tokens: max relative error {lg['error']:.2e}"
                 + (f" (transformers float32: {lg['transformers_float32_error']:.2e})" if has32 else "")
                 + f"; KL(reference || ours) mean {lg['kl_mean']:.2e}, max {lg['kl_max']:.2e}; "
                 f"top-1 agreement {lg['top1_agreement']:.4f}")
    if jump is None:
        lines.append(f"first jump: none (no op's error is over {JUMP:g}x every earlier op's and over "
                     f"{FLOOR[result['dtype']]:g}; every router agrees on at least {MIN_AGREEMENT:g} of the tokens)")
    else:
        where = "logits" if jump["layer"] is None else f"layer {jump['layer']} {jump['op']}"
        why = (f"top-k agreement {jump['topk_agreement']:.4f}" if jump.get("topk_agreement", 1.0) < MIN_AGREEMENT
               else f"error {jump['error']:.2e}, every earlier op's at most {jump['before']:.2e}")
        lines.append(f"first jump: {where} ({why})")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    n = result["layers"]
    for op in LAYER_OPS:
        rows = [r for r in result["ops"] if r["op"] == op]
        if rows:
            ax.plot([r["layer"] for r in rows], [r["error"] for r in rows], marker="o", label=f"ours: {op}")
    if result["reference"] == "float64":
        rows = [r for r in result["ops"] if r["op"] == "residual"]
        ax.plot([r["layer"] for r in rows], [r["transformers_float32_error"] for r in rows], "k--",
                label="transformers float32: residual")
    ax.plot([n], [result["logits"]["error"]], "k*", markersize=10, label="ours: logits")
    jump = result["first_jump"]
    if jump:
        ax.plot([n if jump["layer"] is None else jump["layer"]], [jump["error"]], "rx", markersize=14,
                label=f"first jump: {jump['op']}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer (logits after the last)")
    ax.set_ylabel("max |ours - reference| / max |reference|")
    ax.set_title(f"ours {result['dtype']} vs transformers {result['reference']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the report -------------------------------------------------------------------------------------------
def report(directory: str, cfg, prompts: list[list[int]], *, dtype: str = "float32", reference: str = "float64",
           checkpoint_layers: int | None = None) -> dict:
    """Both sides on ``prompts`` (token ids), from the checkpoint ``directory`` cut to ``cfg`` (``read_config``):
    the per-op errors, the logits' and the first jump (``compare``); against float64, transformers' own float32
    errors beside ours."""
    ids, mask = batch(prompts)
    ours = run_ours(load_ours(directory, cfg, dtype), ids, mask)
    hf = load_transformers(directory, cfg.num_hidden_layers, reference)
    ref = run_transformers(hf, ids, mask)
    ref32 = None
    if reference == "float64":  # transformers' own float32 error, beside ours
        import torch

        hf = hf.to(torch.float32)
        hf.set_experts_implementation("grouped_mm")
        ref32 = run_transformers(hf, ids, mask)
    del hf
    return {"checkpoint": directory, "layers": cfg.num_hidden_layers,
            "checkpoint_layers": checkpoint_layers or cfg.num_hidden_layers, "dtype": dtype, "reference": reference,
            "prompts": len(prompts), "input_ids": prompts, **compare(ours, ref, mask, ref32, dtype)}
