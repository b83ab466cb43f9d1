"""One process of a (multi-host) sharded run: restore a checkpoint onto a global mesh, compute logits and greedy
tokens, write them to a file. ``scripts/multihost.sh`` launches it; the same program runs on every host of a
TPU pod slice or a GPU cluster (see docs/sharding.md).

    python scripts/multihost_worker.py checkpoint DIR        # a tiny checkpoint: DIR/hf (safetensors), DIR/orbax
    python scripts/multihost_worker.py run --checkpoint CKPT --mesh SPEC --out FILE \\
        [--cpu-devices N] [--coordinator HOST:PORT --num-processes N --process-id I | --auto-distributed]
    python scripts/multihost_worker.py compare FILE FILE...  # exit 1 unless all agree (tokens equal, logits 1e-5)
    python scripts/multihost_worker.py meshes                # one process, 8 CPU devices: each mesh vs one device
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10] * 11, [3, 100, 27]]
NEW_TOKENS = 8


def tiny_config():
    from qwen2_jax.model.config import Qwen2MoeConfig

    return Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                          shared_expert_intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=256)


def random_params(cfg, seed: int = 1) -> dict:
    """Random weights in this port's layout (normal, std 0.02; norms near one); the router is drawn with std 1
    so that routing is decisive (rounding noise never flips an expert choice)."""
    from qwen2_jax.model.params import iter_params

    rng = np.random.default_rng(seed)
    tree: dict = {}
    for p, shape in iter_params(cfg):
        if "norm" in p.path[-2]:
            value = rng.normal(1.0, 0.1, shape)
        else:
            value = rng.normal(0.0, 1.0 if p.path[-2] == "gate" else 0.02, shape)
        node = tree
        for key in p.path[:-1]:
            node = node.setdefault(key, {})
        node[p.path[-1]] = value.astype(np.float32)
    return tree


def make_checkpoint(directory: str, seed: int = 1) -> None:
    """A tiny random model as an HF directory (DIR/hf) and its Orbax conversion (DIR/orbax)."""
    from qwen2_jax.convert import convert, write_hf_checkpoint

    cfg = tiny_config()
    hf = os.path.join(directory, "hf")
    write_hf_checkpoint(cfg, hf, params=random_params(cfg, seed))
    convert(hf, os.path.join(directory, "orbax"), progress=False)


def run(args) -> None:
    import jax

    if args.cpu_devices:  # simulated CPU devices; must be set before the backend starts
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in recent jax
        except AttributeError:
            pass
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   initialization_timeout=args.timeout)
    elif args.auto_distributed:  # TPU pod slices, SLURM, Open MPI: everything is detected
        jax.distributed.initialize()

    from flax import nnx
    from jax.experimental import multihost_utils

    from qwen2_jax import sharding
    from qwen2_jax.inference.generate import generate
    from qwen2_jax.loading import from_pretrained

    start = time.perf_counter()
    mesh = sharding.make_mesh(args.mesh)
    me = f"process {jax.process_index()}/{jax.process_count()}"
    print(f"{me}: {sharding.describe_mesh(mesh)}", flush=True)
    model = from_pretrained(args.checkpoint, dtype="float32", mesh=mesh)
    graphdef, params = nnx.split(model)
    held = sharding.per_device_bytes(params)
    # Parameter bytes per mesh position (-1: a device of another process), to compare layouts across runs.
    layout = np.asarray([held.get(d.id, -1) for d in mesh.devices.flat])

    ids = np.zeros((len(PROMPTS), max(map(len, PROMPTS))), np.int32)
    mask = np.zeros(ids.shape, bool)
    for i, p in enumerate(PROMPTS):
        ids[i, ids.shape[1] - len(p):], mask[i, ids.shape[1] - len(p):] = p, True
    sharding.check_batch(mesh, len(PROMPTS))
    put = lambda a: jax.make_array_from_callback(a.shape, sharding.batch_sharding(mesh), lambda idx: a[idx])
    forward = jax.jit(lambda params, ids, mask: nnx.merge(graphdef, params)(ids, mask))
    logits = multihost_utils.process_allgather(forward(params, put(ids), put(mask)), tiled=True)
    tokens = np.asarray(generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_ids=()), np.int32)
    np.savez(args.out, logits=logits, tokens=tokens, device_bytes=layout)
    print(f"{me}: tokens {tokens.tolist()} ({time.perf_counter() - start:.1f} s)", flush=True)
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def meshes(specs: list[str]) -> int:
    """Logits and greedy tokens of the tiny checkpoint on each mesh (8 simulated CPU devices, one process)
    against the unsharded model, in float32 and bfloat16: the figures quoted in docs/sharding.md."""
    import tempfile

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)
    from flax import nnx

    from qwen2_jax import sharding
    from qwen2_jax.inference.generate import generate
    from qwen2_jax.loading import from_pretrained

    ids = np.zeros((len(PROMPTS), max(map(len, PROMPTS))), np.int32)
    mask = np.zeros(ids.shape, bool)
    for i, p in enumerate(PROMPTS):
        ids[i, ids.shape[1] - len(p):], mask[i, ids.shape[1] - len(p):] = p, True

    def run(model, mesh):
        put = (lambda a: jax.device_put(a, sharding.batch_sharding(mesh))) if mesh else (lambda a: a)
        graphdef, params = nnx.split(model)
        logits = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))(params, put(ids), put(mask))
        return np.asarray(logits), generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_ids=())

    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(tmp)
        ref_logits, ref_tokens = run(from_pretrained(os.path.join(tmp, "hf"), dtype="float32"), None)
        scale = np.abs(ref_logits).max()
        print("| mesh | dtype | max abs diff / max logit vs float32 one device | greedy tokens vs one device (same dtype) |")
        print("|---|---|---:|---|")
        for dtype in ("float32", "bfloat16"):
            single_logits, single_tokens = run(from_pretrained(os.path.join(tmp, "hf"), dtype=dtype), None)
            if dtype == "bfloat16":
                print(f"| one device | {dtype} | {np.abs(single_logits - ref_logits).max() / scale:.2e} | - |")
            for spec in specs:
                mesh = sharding.make_mesh(spec)
                logits, tokens = run(from_pretrained(os.path.join(tmp, "orbax"), dtype=dtype, mesh=mesh), mesh)
                print(f"| {spec} | {dtype} | {np.abs(logits - ref_logits).max() / scale:.2e} | "
                      f"{'identical' if tokens == single_tokens else 'DIFFER'} |", flush=True)
    return 0


def compare(files: list[str]) -> int:
    first = np.load(files[0])
    scale = np.abs(first["logits"]).max()
    for f in files[1:]:
        other = np.load(f)
        err = np.abs(other["logits"] - first["logits"]).max() / scale
        same = np.array_equal(other["tokens"], first["tokens"])
        print(f"{f} vs {files[0]}: tokens {'identical' if same else 'DIFFER'}, logits max relative difference {err:.2e}")
        if not same or err > 1e-5:
            return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("directory")
    p = sub.add_parser("run")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--mesh", default=None, help="mesh spec over all processes' devices (default: the recommended one)")
    p.add_argument("--out", required=True)
    p.add_argument("--cpu-devices", type=int, default=0, help="simulate this many CPU devices in this process")
    p.add_argument("--coordinator", help="HOST:PORT of process 0's coordination service")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--auto-distributed", action="store_true", help="jax.distributed.initialize() with no arguments")
    p.add_argument("--timeout", type=int, default=60, help="seconds to wait for the other processes to connect")
    p = sub.add_parser("compare")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("meshes")
    p.add_argument("specs", nargs="*", default=["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2",
                                                "expert=2,tensor=4"])
    args = parser.parse_args(argv)
    if args.command == "checkpoint":
        make_checkpoint(args.directory)
        return 0
    if args.command == "compare":
        return compare(args.files)
    if args.command == "meshes":
        return meshes(args.specs)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
