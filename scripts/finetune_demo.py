"""Fine-tuning demo: a small random Qwen2-MoE learns to copy a sequence, with qwen2_jax.training.

Each example is ``a_1 .. a_L SEP a_1 .. a_L`` with random tokens a_i; only the copy counts in the loss
(the prompt's labels are -100). A model that has not learned the task can do no better than chance there
(loss ln(num_tokens)); one that has, gets to ~0. Prints loss, tokens/s and memory as it goes, and the copy
accuracy (greedy, teacher-forced) on held-out examples at the end.

    .venv/bin/python scripts/finetune_demo.py                  # float32 on the CPU, 300 steps
    .venv/bin/python scripts/finetune_demo.py --mesh expert=2  # on a mesh (devices permitting)
    .venv/bin/python scripts/finetune_demo.py --tiny           # 3 small steps: that every part runs (CI)
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax import training
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.errors import Qwen2JaxError
from qwen2_jax.model import init_random

SEP, FIRST = 1, 2  # token 0 is unused (padding), 1 separates prompt and copy, data tokens from 2


def small_config(vocab: int) -> Qwen2MoeConfig:
    return Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, rope_theta=10000.0)


def copy_batch(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict:
    data = rng.integers(FIRST, vocab, size=(batch, length))
    ids = np.concatenate([data, np.full((batch, 1), SEP), data], axis=1)
    labels = ids.copy()
    labels[:, :length + 1] = -100  # position t predicts labels[t + 1]: only the copied tokens count
    return training.make_batch(ids, labels)


def copy_accuracy(graphdef, params, batch: dict, length: int) -> float:
    from flax import nnx

    logits = nnx.merge(graphdef, params)(jnp.asarray(batch["input_ids"]))
    predicted = np.asarray(jnp.argmax(logits[:, length:-1], axis=-1))
    return float(np.mean(predicted == batch["input_ids"][:, length + 1:]))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def tree_mib(tree) -> float:
    return sum(a.nbytes for a in jax.tree.leaves(tree)) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=8, help="tokens to copy")
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    parser.add_argument("--mesh", default=None, help="e.g. 'data=2,expert=2' (default: one device, no mesh)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, metavar="DIR", help="save the final train state (Orbax) there")
    parser.add_argument("--tiny", action="store_true",
                        help="3 steps of 4 sequences: every part runs, the loss is not expected to halve")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.length, args.warmup, args.log_every = 3, 4, 4, 1, 1
    if args.save and os.path.exists(args.save):
        parser.error(f"--save {args.save}: already exists")

    cfg = small_config(args.vocab)
    mesh = None
    try:
        tc = training.TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                                  weight_decay=0.01, max_grad_norm=1.0, remat=args.remat)
        if args.mesh:
            from qwen2_jax.sharding import describe_mesh, make_mesh

            mesh = make_mesh(args.mesh)
            print(describe_mesh(mesh))
    except Qwen2JaxError as e:
        parser.error(str(e))
    model = init_random(cfg, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32, seed=args.seed)
    graphdef, state = training.init_train_state(model, tc, mesh)
    step = training.make_train_step(graphdef, tc, state, mesh)
    n_params = sum(a.size for a in jax.tree.leaves(state.params))
    print(f"model: {n_params / 1e6:.2f}M parameters ({args.dtype}), {cfg.num_hidden_layers} layers, "
          f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}; params {tree_mib(state.params):.1f} MiB, "
          f"optimizer state {tree_mib(state.opt_state):.1f} MiB; backend {jax.default_backend()}")
    print(f"task: copy {args.length} random tokens of {args.vocab - FIRST}; chance loss ln({args.vocab - FIRST}) = "
          f"{math.log(args.vocab - FIRST):.3f}; batch {args.batch} x {2 * args.length + 1} tokens; "
          f"AdamW lr {args.lr} (warm-up {args.warmup}, cosine), clip 1.0, remat {args.remat}")

    rng = np.random.default_rng(args.seed)
    tokens_per_step = args.batch * (2 * args.length + 1)
    first_loss = None
    t0 = time.perf_counter()
    window_start, window_steps = None, 0
    for i in range(args.steps):
        state, metrics = step(state, copy_batch(rng, args.batch, args.length, args.vocab))
        if i == 0:
            first_loss = float(metrics["loss"])  # waits for the first step (compilation included)
            print(f"step    1  loss {first_loss:.4f}  (compile + first step {time.perf_counter() - t0:.1f} s)")
            window_start = time.perf_counter()
            continue
        window_steps += 1
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            m = {k: float(v) for k, v in metrics.items()}  # waits for this step
            rate = window_steps * tokens_per_step / (time.perf_counter() - window_start)
            print(f"step {i + 1:4d}  loss {m['loss']:.4f}  ce {m['ce_loss']:.4f}  aux {m['aux_loss']:.4f}  "
                  f"grad_norm {m['grad_norm']:.3f}  lr {m['learning_rate']:.2e}  {rate:,.0f} tokens/s  "
                  f"peak RSS {peak_rss_mib():,.0f} MiB", flush=True)
            window_start, window_steps = time.perf_counter(), 0
    total = time.perf_counter() - t0

    held_out = copy_batch(np.random.default_rng(args.seed + 1), 256, args.length, args.vocab)
    accuracy = copy_accuracy(graphdef, state.params, held_out, args.length)
    last = float(metrics["loss"])
    print(f"done: {args.steps} steps in {total:.1f} s; loss {first_loss:.3f} -> {last:.3f}; copy accuracy on "
          f"256 held-out sequences {accuracy:.1%} (chance {1 / (args.vocab - FIRST):.1%}); "
          f"peak RSS {peak_rss_mib():,.0f} MiB")
    if args.save:
        print(f"saved train state to {training.save_train_state(args.save, state)}")
    if not args.tiny and not last < 0.5 * first_loss:
        print("error: the loss did not fall by half", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
