"""``qwen2-jax aot``: compile what ``generate`` runs for an accelerator this machine does not have, and read
what the compiled step moves through memory.

XLA compiles for an H200, an H100 or a TPU slice without one: a compile-only CUDA topology from a GPU target
config (``qwen2_jax/targets/``, needs the ``jax-cuda13-plugin``/``-pjrt`` wheels of the ``aot`` extra) and a
deviceless TPU topology (``libtpu``). The function compiled is the real jitted one, on abstract arguments
placed as ``generate`` places them: the decode loop by default (its body is one step), the prefill with
``--prompt-len`` (for a prompt of several chunks, the chunk step it repeats); with ``--engine``, the steps of
``qwen2-jax serve`` instead (``qwen2_jax.inference.serving.engine``, over its paged KV cache sized as ``serve`` sizes
it for the target from ``--max-model-len``, ``--max-num-seqs``, ``--block-size``, ``--gpu-memory-utilization`` or
``--num-gpu-blocks-override``): a decode step over ``--batch`` sequences of ``--cache-len`` tokens each, or the
packed prefill of a ``--prompt-len`` piece; ``--engine piece``, the piece of a long or partly cached prompt, which
attends to the ``--cache-len`` tokens of its pages before it. Nothing is allocated.

From the optimized HLO (``hlo_cost``), per device: ``bytes_per_step`` (read and written by every kernel of
one step), ``weight_copy_bytes``, ``kernels_per_step``, ``flops_per_step`` and the collectives; from
``memory_analysis()`` the argument and temporary bytes and whether it fits; and ``roofline_bytes``, what the
step must read: the non-expert weights, the experts the batch can touch, and the KV cache. ``est_step_ms``
and ``est_tokens_per_s`` are estimates from the data sheet's bandwidth and peak rate, not measurements.

    qwen2-jax aot --target h200 --batch 1 --json -
    qwen2-jax aot --target v5p-8 --mesh expert=4 --batch 64
    qwen2-jax aot --target h200 --prompt-len 2048 --dump-hlo /tmp/hlo
    qwen2-jax aot --target h200 --prompt-len 65536 --config qwen2-57b-a14b-instruct-yarn   # its chunk step
    qwen2-jax aot --target h200 --engine --config qwen2-57b-a14b-instruct-yarn --max-model-len 65536 \
        --max-num-seqs 64 --batch 64 --cache-len 2048   # the server's decode step: 64 sequences of 2,048 tokens
    qwen2-jax aot --target h200 --engine piece --max-num-seqs 16 --prompt-len 64   # a next turn's 64 tokens
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time

from qwen2_jax.errors import Qwen2JaxError

TARGETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "targets")  # qwen2_jax/targets


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "cuda" | "tpu"
    topology: str
    hbm_bytes: int  # per device (GPU: the target config's memory; TPU: what XLA:TPU lets a program use)
    bandwidth: float  # HBM bytes/s per device (data sheet), for the estimates
    peak_flops: float  # dense bf16 FLOP/s per device (data sheet), for the estimates
    config_file: str | None = None


TARGETS = {
    "h200": Target("h200", "cuda", "1x1x1", 150_754_820_096, 4.8e12, 989e12, "h200.gpu_target_config.txtpb"),
    "h100": Target("h100", "cuda", "1x1x1", 85_520_809_984, 3.35e12, 989e12, "h100.gpu_target_config.txtpb"),
    "v5p-8": Target("v5p-8", "tpu", "v5p:2x2x1", int(95.74 * 2**30), 2.765e12, 459e12),
    "v5e-8": Target("v5e-8", "tpu", "v5e:2x4", int(15.75 * 2**30), 8.19e11, 197e12),
    "v6e-8": Target("v6e-8", "tpu", "v6e:2x4", int(31.25 * 2**30), 1.64e12, 918e12),
}


class AotError(Qwen2JaxError):
    """A target this environment cannot compile for, or arguments it cannot compile; one line."""


def _environment() -> None:
    # A deviceless compile: jax itself stays on the CPU; libtpu must not look for a TPU or its metadata server,
    # nor hold its one-process lock (no TPU is opened, and other processes may compile at the same time).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def devices(target: Target) -> list:
    """The target's devices, from a compile-only topology."""
    _environment()
    from jax.experimental import topologies

    try:
        if target.platform == "cuda":
            with open(os.path.join(TARGETS_DIR, target.config_file)) as f:
                config = f.read()
            topo = topologies.get_topology_desc(platform="cuda", topology=target.topology, target_config=config)
        else:
            topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - which exception a missing plugin raises differs by jax version
        plugin = "jax_plugins.xla_cuda13" if target.platform == "cuda" else "libtpu"
        if importlib.util.find_spec(plugin) is None:
            extra = "jax-cuda13-plugin and jax-cuda13-pjrt" if target.platform == "cuda" else "libtpu (jax[tpu])"
            raise AotError(f"target {target.name}: no {plugin} to compile for it; install the aot extra "
                           f"(pip install 'qwen2-jax[aot]', which brings {extra} for this jax)") from None
        raise AotError(f"target {target.name}: cannot make its compile-only topology ({_first_line(e)})") from None
    return list(topo.devices)


@dataclasses.dataclass
class Request:
    target: str = "h200"
    mesh: str | None = None
    batch: int = 1
    prompt_len: int | None = None  # None: the decode step; else the prefill of prompts this long
    cache_len: int | None = None  # decode: 4096; prefill: what generate allocates for the prompt and one token
    prefill_chunk: int | None = None  # default: generate's
    dtype: str = "bfloat16"
    config: str = "qwen2-57b-a14b-instruct"
    quantize: str | None = None  # "int8", "fp8", "int8:BLOCK": weight-only quantization (qwen2_jax.model.quant)
    # The serving engine's step (qwen2_jax.inference.serving.engine) instead of generate's: "decode", "prefill"
    # (packed), "piece"; True: "prefill" with a prompt_len, else "decode". Its settings are serve's (vLLM's names).
    engine: bool | str = False
    max_num_seqs: int | None = None  # default: batch; a decode step runs over batch of them
    max_model_len: int | None = None  # default: the cache length and one token
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    attention_backend: str = "xla"  # the attention over pages: engine.ATTENTION_BACKENDS


def roofline_bytes(cfg, shardings: dict, itemsize: int, tokens: int, batch_per_device: int, cache_len: int,
                   kv_heads_per_device: int) -> int:
    """What one device must read in a step: its share of every weight but the routed experts and the
    embedding table (of which it reads ``tokens`` rows), its shares of the experts the step's tokens can
    touch (at most tokens x top-k per layer, at most the experts it holds), and its share of the KV cache.
    ``itemsize``: of the model dtype (the cache's, and the float weights'); quantized values and scales count
    at their own size."""
    import numpy as np

    from qwen2_jax.model.params import iter_params, param_dtype

    total = 0
    for p, shape in iter_params(cfg):
        local = shardings[p.path].shard_shape(shape)
        stored = param_dtype(p, None, cfg)  # None: a float weight, of the model dtype
        nbytes = math.prod(local) * (itemsize if stored is None else np.dtype(stored).itemsize)
        if "experts" in p.axes:
            e_axis = p.axes.index("experts")
            local_experts = local[e_axis]
            touched = min(local_experts, tokens * cfg.num_experts_per_tok)
            total += nbytes * touched // local_experts
        elif p.path[-2:] == ("embed_tokens", "embedding"):
            total += min(tokens, shape[0]) * shape[1] * itemsize
        else:
            total += nbytes
    kv = 2 * cfg.num_hidden_layers * batch_per_device * kv_heads_per_device * cache_len * cfg.head_dim * itemsize
    return total + kv


ENGINE_STEPS = ("decode", "prefill", "piece")


def _engine_kind(req: Request) -> str | None:
    """The engine step ``req`` names (None: generate's), checked against its prompt length."""
    if req.engine is False or req.engine is None:
        return None
    step = ("prefill" if req.prompt_len else "decode") if req.engine is True else req.engine
    if step not in ENGINE_STEPS:
        raise AotError(f"unknown engine step {step!r}; expected one of {', '.join(ENGINE_STEPS)}")
    if step in ("prefill", "piece") and not req.prompt_len:
        raise AotError(f"--engine {step} needs --prompt-len (the tokens of its piece)")
    if step == "decode" and req.prompt_len:
        raise AotError(f"--engine {step} takes no --prompt-len (got {req.prompt_len})")
    return step


def engine_pool(req: Request, cfg, target: "Target", weight_bytes: int, dtype, tensor: int) -> dict:
    """The serving engine's KV pool on ``target`` as ``serve`` sizes it (``engine.pool_size``, the weights in use):
    pages, their bytes on a device, and what sized them."""
    from qwen2_jax.inference.serving import engine as eng

    pages, per_page, by = eng.pool_size(
        cfg, dtype, page_size=req.block_size, max_num_seqs=req.max_num_seqs, max_model_len=req.max_model_len,
        tensor=tensor, num_gpu_blocks_override=req.num_gpu_blocks_override,
        gpu_memory_utilization=req.gpu_memory_utilization, memory=(target.hbm_bytes, weight_bytes))
    return dict(num_pages=pages, page_bytes=per_page, sized_by=by)


def _engine_step(req: Request, kind: str, cfg, graphdef, params, mesh, device, dtype, platform: str, cache_len: int,
                 num_pages: int):
    """The serving engine's step ``kind``, lowered over a pool of ``num_pages`` pages: a decode step over the first
    ``req.batch`` of ``req.max_num_seqs`` slots, each holding ``cache_len`` tokens (on GPU, the step of that
    context's bucket); the packed prefill of a piece of ``req.prompt_len`` tokens, padded as the engine pads it; or
    the piece (``_prefill``) of a long or partly cached prompt into one slot's pages. -> (lowered, step name, the
    piece's length)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwen2_jax.inference.serving import engine as eng
    from qwen2_jax.inference.serving.runner import BUCKETED, context_buckets
    from qwen2_jax.inference.generate import MIN_PROMPT_BUCKET, bucket

    slots, size = req.max_num_seqs, req.block_size
    if mesh is not None and slots % mesh.shape["data"]:
        raise AotError(f"--max-num-seqs {slots} is not divisible by the mesh's data axis ({mesh.shape['data']})")
    max_pages = -(-req.max_model_len // size)
    shape = (cfg, slots, num_pages, size, max_pages, dtype)
    if mesh is not None:
        shard = eng.state_shardings(cfg, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
        replicated = jax.sharding.SingleDeviceSharding(device)
        shard = jax.tree.map(lambda _: replicated, eng.abstract_state(*shape))
    state = eng.abstract_state(*shape, shard)
    arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=replicated)
    if req.attention_backend == "pallas" and platform != "tpu":
        raise AotError(f"--attention-backend pallas is a TPU kernel; {req.target} is not a TPU")
    static = dict(graphdef=graphdef, platform=platform, max_len=req.max_model_len, attention=req.attention_backend)
    keep, new_pages = arg((slots,), jnp.bool_), arg((slots, 2), jnp.int32)
    contexts = context_buckets(max_pages, size) if platform in BUCKETED else [None]
    # As the engine compiles them: the widest decode step chooses the state's layouts, the others take them.
    widest = eng.jit_step(eng._decode, eng.state_formats(state), replicated, rows=slots, ctx_pages=contexts[-1],
                          **static).lower(params, None, state, keep, new_pages)
    if kind == "decode":
        needed = -(-(cache_len + 1) // size)
        context = next(c for c in contexts if c is None or c >= needed)
        if req.batch == slots and context == contexts[-1]:
            return widest, "serve-decode", 1
        formats = eng.state_formats(state, chosen=widest.compile().input_formats[0][2])
        step = eng.jit_step(eng._decode, formats, replicated, rows=req.batch, ctx_pages=context, **static)
        return step.lower(params, None, state, keep, new_pages), "serve-decode", 1
    formats = eng.state_formats(state, chosen=widest.compile().input_formats[0][2])
    t = bucket(req.prompt_len, MIN_PROMPT_BUCKET)
    p = 1 if kind == "piece" else min(slots, t)  # prompts a piece holds at most, as the engine packs them
    controls = eng.SlotControls(
        temperature=arg((p,), jnp.float32), top_k=arg((p,), jnp.int32), top_p=arg((p,), jnp.float32),
        repetition_penalty=arg((p,), jnp.float32), keys=arg((p,), jnp.uint32), max_tokens=arg((p,), jnp.int32),
        eos=arg((p, eng.MAX_EOS), jnp.int32))
    piece, scalar = arg((1, t), jnp.int32), arg((), jnp.int32)
    if kind == "piece":
        step = eng.jit_step(eng._prefill, formats, replicated, **static)
        lowered = step.lower(params, None, state, scalar, piece, scalar, piece, arg((max_pages,), jnp.int32),
                             arg((), jnp.bool_), scalar, arg((cfg.vocab_size,), jnp.bool_), controls,
                             arg((), np.uint32))
        return lowered, "serve-piece", t
    step = eng.jit_step(eng._prefill_packed, formats, replicated, **static)
    lowered = step.lower(params, None, state, piece, piece, piece, arg((p,), jnp.int32), arg((p,), jnp.int32),
                         arg((p, max_pages), jnp.int32), arg((p,), jnp.int32), controls, arg((p,), np.uint32))
    return lowered, "serve-prefill", t


def _engine_defaults(req: Request, cache_len: int) -> Request:
    """``req`` with the engine's settings filled in: as many sequences as the batch, a max model length of the cache
    and one token; checked as ``serve`` checks them."""
    from qwen2_jax.inference.serving.engine import check_settings

    req = dataclasses.replace(req, max_num_seqs=req.max_num_seqs or req.batch,
                              max_model_len=req.max_model_len or cache_len + 1)
    try:
        check_settings(10**9, flags=True, max_num_seqs=req.max_num_seqs, max_model_len=req.max_model_len,
                       block_size=req.block_size, gpu_memory_utilization=req.gpu_memory_utilization,
                       num_gpu_blocks_override=req.num_gpu_blocks_override)
    except Qwen2JaxError as e:
        raise AotError(str(e)) from None
    if req.batch > req.max_num_seqs:
        raise AotError(f"--batch {req.batch} is more sequences than the engine's --max-num-seqs {req.max_num_seqs}")
    if cache_len + 1 > req.max_model_len:
        raise AotError(f"--cache-len {cache_len} and the next token exceed --max-model-len {req.max_model_len}")
    return req


def _weight_bytes(cfg, place, dtype) -> int:
    """The weights' bytes on one device."""
    import jax.numpy as jnp

    from qwen2_jax.model.params import iter_params, param_dtype

    return sum(math.prod(place.params[p.path].shard_shape(shape)) * jnp.dtype(param_dtype(p, dtype, cfg)).itemsize
               for p, shape in iter_params(cfg))


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where the step's arrays live: the mesh (None on one device) and the shardings of weights and batch rows."""

    mesh: object
    params: dict  # parameter path -> sharding
    by_batch: object  # arrays with the batch first
    replicated: object


@dataclasses.dataclass(frozen=True)
class _Shape:
    """The step's sizes, as generate (or the engine) pads them."""

    batch: int
    t: int  # tokens a row in one call: the padded prompt, one chunk of it, or 1
    chunks: int  # generate's chunked prefill: how many chunks of ``t`` (0: none)
    max_len: int  # the cache's length


def _placement(req: Request, cfg, devs) -> _Placement:
    import jax

    from qwen2_jax.model.params import iter_params
    from qwen2_jax.sharding import make_mesh
    from qwen2_jax.sharding.rules import batch_sharding, param_shardings, replicated

    if len(devs) > 1 or req.mesh:
        mesh = make_mesh(req.mesh, devices=devs, cfg=cfg)
        return _Placement(mesh, param_shardings(cfg, mesh), batch_sharding(mesh), replicated(mesh))
    single = jax.sharding.SingleDeviceSharding(devs[0])
    return _Placement(None, {p.path: single for p, _ in iter_params(cfg)}, single, single)


def _abstract_params(cfg, dtype, place: _Placement):
    """The model split into its graph and abstract parameters, each placed in its sharding."""
    import jax
    from flax import nnx

    from qwen2_jax.model.modeling import abstract_model
    from qwen2_jax.model.params import iter_params, nest, param_dtype

    model = abstract_model(cfg, dtype=dtype)
    model.mesh = place.mesh
    graphdef, params = nnx.split(model)
    nnx.replace_by_pure_dict(params, nest((p.path, jax.ShapeDtypeStruct(shape, param_dtype(p, dtype, cfg),
                                                                         sharding=place.params[p.path]))
                                          for p, shape in iter_params(cfg)))
    return graphdef, params


def _shape(req: Request, cfg, kind: str | None, mesh) -> _Shape:
    gen = importlib.import_module("qwen2_jax.inference.generate")

    b = req.batch
    if mesh is not None and b % mesh.shape["data"]:
        raise AotError(f"batch {b} is not divisible by the mesh's data axis ({mesh.shape['data']})")
    chunk = gen.chunk_length(req.prefill_chunk or gen.PREFILL_CHUNK, b)
    # The prompt as generate pads it: a power of two, or whole chunks beyond one chunk.
    chunks = 0
    if req.prompt_len and not kind and gen.bucket(req.prompt_len, gen.MIN_PROMPT_BUCKET) > chunk:
        t, chunks = chunk, -(-req.prompt_len // chunk)
    else:
        t = gen.bucket(req.prompt_len or 16, gen.MIN_PROMPT_BUCKET)
    padded = chunks * chunk or t
    if req.prompt_len and req.prompt_len > cfg.context_length:
        raise AotError(f"--prompt-len {req.prompt_len} exceeds the context of {cfg.context_length} tokens of "
                       f"{req.config}")
    max_len = req.cache_len or (gen.cache_length(padded, cfg.context_length, chunk)
                                if req.prompt_len and not kind else max(4096, padded))
    if req.prompt_len and padded > max_len:
        raise AotError(f"--prompt-len {req.prompt_len} exceeds --cache-len {max_len}")
    return _Shape(b, t, chunks, max_len)


def _lower_generate_step(req: Request, cfg, graphdef, params, place: _Placement, shape: _Shape, dtype,
                         platform: str):
    """Lowers generate's step: its decode loop, its prefill, or the chunk step of a chunked prefill."""
    import jax
    import jax.numpy as jnp

    from qwen2_jax.inference.sampling import Sampler, row_keys
    from qwen2_jax.sharding.rules import cache_shardings

    gen = importlib.import_module("qwen2_jax.inference.generate")
    b, t, mesh, rep, by_batch = shape.batch, shape.t, place.mesh, place.replicated, place.by_batch
    static = dict(sampler=Sampler(), platform=platform)  # greedy: the processors cost nothing next to the model
    placed = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    controls = jax.eval_shape(lambda: gen.Controls(
        temperature=jnp.ones((b,), jnp.float32), top_p=jnp.ones((b,), jnp.float32),
        repetition_penalty=jnp.ones((b,), jnp.float32), keys=row_keys([0] * b),
        eos_token_ids=jnp.full((2,), -1, jnp.int32), max_new_tokens=jnp.asarray(1, jnp.int32)))
    controls = jax.tree.map(lambda x: placed(x, rep), controls)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=by_batch)
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=by_batch)
    positions = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=by_batch)
    active = jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=by_batch)
    cache_sharding = cache_shardings(cfg, mesh, b) if mesh is not None else None
    if shape.chunks:  # generate's chunk step, run chunks - 1 times before a last chunk like it
        cache, seen = jax.eval_shape(lambda: gen._new_cache(cfg, b, shape.max_len, dtype))
        if mesh is not None:
            cache = jax.tree.map(placed, cache, cache_sharding)
        cache = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                             placed(x, by_batch if x.ndim else rep), cache)
        seen = placed(seen, by_batch)
        return gen._prefill_chunk_jit.lower(graphdef, params, None, cache, seen, ids, mask, positions,
                                            platform=platform)
    if req.prompt_len:
        return gen._prefill_jit.lower(graphdef, params, None, ids, mask, positions, active, controls, None, None,
                                      max_len=shape.max_len, cache_sharding=cache_sharding, **static)
    state = jax.eval_shape(lambda p, i, m, pos, a, c: gen._prefill(graphdef, p, None, i, m, pos, a, c, None, None,
                                                                  max_len=shape.max_len, **static),
                           params, ids, mask, positions, active, controls)
    if mesh is not None:  # the decode loop keeps the placement the prefill gave the state
        state = dataclasses.replace(state, cache=jax.tree.map(placed, state.cache, cache_sharding))
    state = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                         placed(x, by_batch if x.ndim and x.shape[0] == b else rep), state)
    stop = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return gen._decode_jit.lower(graphdef, params, None, state, controls, stop, **static)


def _compile(lowered):
    """(the compiled program, None), or (None, XLA's reason) when the program does not fit the device."""
    try:
        return lowered.compile(), None
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses a program over its HBM with RESOURCE_EXHAUSTED
        if "RESOURCE_EXHAUSTED" not in str(e) and "exceeds" not in str(e):
            raise
        return None, _first_line(e)


def compile_step(req: Request, dump_hlo: str | None = None, progress=None) -> dict:
    """Compiles the step ``req`` names for its target and returns the figures (see the module docstring).
    ``progress``: called with a line naming each stage as it begins (building the abstract model, lowering,
    compiling, analysing), so that a command can say what the minute of a full-size compile is spent on."""
    say = progress or (lambda line: None)
    import jax.numpy as jnp

    from qwen2_jax.loading import resolve_dtype
    from qwen2_jax.model import moe
    from qwen2_jax.model.attention import BLOCK, blocks_to_visit
    from qwen2_jax.model.config import load_config
    from qwen2_jax.model.paged_attention import BLOCK_TOKENS
    from qwen2_jax.model.quant import QuantConfig

    if req.target not in TARGETS:
        raise AotError(f"unknown target {req.target!r}; expected one of {', '.join(TARGETS)}")
    target = TARGETS[req.target]
    kind = _engine_kind(req)
    cfg = load_config(req.config)
    if req.quantize:
        cfg = cfg.replace(quantization=QuantConfig.parse(req.quantize))
    dtype = resolve_dtype(req.dtype)
    devs = devices(target)
    say(f"building the abstract model ({req.config}, {req.dtype}" + (f", {req.quantize}" if req.quantize else "")
        + f") on {len(devs)} {target.name} device{'s' if len(devs) > 1 else ''}")
    place = _placement(req, cfg, devs)
    mesh = place.mesh
    graphdef, params = _abstract_params(cfg, dtype, place)
    shape = _shape(req, cfg, kind, mesh)
    b, t, chunks, max_len = shape.batch, shape.t, shape.chunks, shape.max_len
    platform = moe.canonical_platform(devs[0].platform)
    step = f"serve-{kind}" if kind else "prefill-chunk" if chunks else "prefill" if req.prompt_len else "decode"
    say(f"lowering the {step} step, batch {b}" + (f", {req.prompt_len}-token prompts" if req.prompt_len else ""))

    start = time.perf_counter()
    pool = None
    if kind:
        req = _engine_defaults(req, max_len)
        tensor = mesh.shape["tensor"] if mesh is not None else 1
        pool = engine_pool(req, cfg, target, _weight_bytes(cfg, place, dtype), dtype, tensor)
        needed = -(-(max_len + 1) // req.block_size) * b
        if pool["num_pages"] < needed:
            raise AotError(f"the engine's KV pool of {pool['num_pages']} pages ({pool['sized_by']}) holds fewer than "
                           f"--batch {b} sequences of --cache-len {max_len} ({needed} pages)")
        try:
            lowered, step, t = _engine_step(req, kind, cfg, graphdef, params, mesh, devs[0], dtype, platform,
                                            max_len, pool["num_pages"])
        except Exception as e:  # noqa: BLE001 - the widest decode step (which lays the pool out) did not fit
            if "RESOURCE_EXHAUSTED" not in str(e) and "exceeds" not in str(e):
                raise
            return dict(target=target.name, batch=b, step=f"serve-{kind}", fits=False, error=_first_line(e),
                        kv_pages=pool["num_pages"], note="the engine's widest decode step does not fit")
    else:
        lowered = _lower_generate_step(req, cfg, graphdef, params, place, shape, dtype, platform)
    say(f"compiling for {target.name} (XLA; about a minute for the full model)")
    compiled, fits_error = _compile(lowered)
    result = dict(target=target.name, mesh=(",".join(f"{a}={n}" for a, n in mesh.shape.items()) if mesh else "single"),
                  devices=len(devs) if mesh is not None else 1, batch=b, step=step, prompt_len=req.prompt_len,
                  chunks=chunks or None, cache_len=max_len, dtype=req.dtype, config=req.config,
                  quantize=req.quantize, attention=(("pallas ragged paged" if req.attention_backend == "pallas" else
                                                     f"xla paged, blocks of {BLOCK_TOKENS} tokens") if kind else
                                                    f"xla blockwise, {blocks_to_visit(platform)} key blocks of {BLOCK}"),
                  compile_s=round(time.perf_counter() - start, 1))
    if kind:
        tokens_held = pool["num_pages"] * req.block_size
        result.update(max_num_seqs=req.max_num_seqs, max_model_len=req.max_model_len, block_size=req.block_size,
                      kv_pages=pool["num_pages"], kv_cache_gb=round(pool["num_pages"] * pool["page_bytes"] / 1e9, 2),
                      kv_sized_by=pool["sized_by"],
                      seqs_at_max_model_len=min(req.max_num_seqs, tokens_held // req.max_model_len),
                      seqs_at_cache_len=min(req.max_num_seqs, pool["num_pages"] // -(-(max_len + 1) // req.block_size)))
    kv_heads = cfg.num_key_value_heads
    if mesh is not None and cfg.num_key_value_heads % mesh.shape["tensor"] == 0:
        kv_heads //= mesh.shape["tensor"]
    rows = b if kind in (None, "decode") else 1  # the engine packs its prompts into one row; a piece is one row's
    per_dev_batch = rows // (mesh.shape["data"] if mesh is not None else 1)
    tokens = rows * (t if req.prompt_len else 1)  # a step's tokens: the prompt, one chunk of it, or one a row
    itemsize = jnp.dtype(dtype).itemsize
    # A packed piece attends over a cache of its own; generate's prompt, a piece over its sequence's pages; a decode
    # step over the pages its sequences hold.
    result["roofline_bytes"] = roofline_bytes(cfg, place.params, itemsize, tokens, per_dev_batch,
                                              t if req.prompt_len and not chunks and kind != "piece" else max_len,
                                              kv_heads)
    if compiled is None:
        result.update(fits=False, error=fits_error)
        return result
    say("analysing the compiled program (memory, and the optimized HLO's bytes, kernels and collectives)")
    text = compiled.as_text()
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        name = f"{target.name}-{step}-b{b}" + (f"-t{req.prompt_len}" if req.prompt_len else "") + ".hlo.txt"
        with open(os.path.join(dump_hlo, name), "w") as f:
            f.write(text)
    result.update(_analyse(compiled.memory_analysis(), text, req, cfg, kind, place, params, dtype, target,
                           tokens, horizon=t if kind == "prefill" else max_len + 1 if kind == "decode" else max_len,
                           roofline=result["roofline_bytes"], chunks=chunks))
    return result


def _analyse(mem, text: str, req: Request, cfg, kind, place: _Placement, params, dtype, target: Target, tokens: int,
             horizon: int, roofline: int, chunks: int) -> dict:
    """The compiled step's memory (``mem``, its ``memory_analysis()``) and what its optimized HLO (``text``) moves
    and computes, against the ``roofline`` bytes it must move."""
    import jax

    from qwen2_jax.model.attention import BLOCK
    from qwen2_jax.model.paged_attention import BLOCK_TOKENS

    from . import hlo_cost

    # The weights are the first entry parameters (the jitted functions take them first, and use every one).
    # A data-dependent loop inside the step runs at most: over attention's key blocks, as many as the cache
    # holds (the last chunk's; the engine's packed piece has a cache of its own); over the distinct experts
    # chosen, once per expert the step's tokens can touch on a device. The decode loop's body is the step.
    local_experts = cfg.num_experts // (place.mesh.shape["expert"] if place.mesh is not None else 1)
    bound = lambda functions: (-(-horizon // BLOCK) if "_attend_blocks" in functions
                               else -(-horizon // BLOCK_TOKENS) if "paged_attention" in functions
                               else min(local_experts, tokens * cfg.num_experts_per_tok))
    weight_params = set(range(len(jax.tree.leaves(params))))
    report = hlo_cost.analyze(text, weight_params, step_loop=not (req.prompt_len or kind),
                              loop_bound=bound)
    weights = _weight_bytes(cfg, place, dtype)
    used = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    # An estimate, not a measurement: the slower of moving the bytes at the HBM bandwidth and doing the matrix
    # products at the peak rate (a real step is slower than both).
    step_s = max(report.bytes / target.bandwidth, report.flops / target.peak_flops)
    out = dict(
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes, weight_bytes=weights,
        fits=used <= target.hbm_bytes, hbm_bytes=target.hbm_bytes,
        bytes_per_step=int(report.bytes), weight_copy_bytes=int(report.weight_copy_bytes),
        kernels_per_step=int(report.count), unknown_trip_loops=report.unknown_trip_loops,
        collectives=report.collectives, x_roofline=round(int(report.bytes) / roofline, 3),
        flops_per_step=int(report.flops), est_step_ms=round(step_s * 1e3, 2),
        est_tokens_per_s=round(tokens / step_s, 1) if tokens else None)
    if chunks:  # the whole prompt: its chunks one after another (the last one costs about what the others do)
        out["est_prompt_s"] = round(chunks * step_s, 2)
    out["top_kernels"] = [dict(name=k.name, kind=k.kind, bytes=int((k.read + k.written) * k.runs), runs=k.runs)
                          for k in report.top(8)]
    return out


# ---- the command ------------------------------------------------------------------------------------------
COLUMNS = [("target", "{}"), ("mesh", "{}"), ("step", "{}"), ("batch", "{}"), ("argument_bytes", "GB"),
           ("temp_bytes", "GB"), ("fits", "{}"), ("bytes_per_step", "GB"), ("roofline_bytes", "GB"),
           ("x_roofline", "{}"), ("weight_copy_bytes", "GB"), ("kernels_per_step", "{}"), ("collectives", "n"),
           ("flops_per_step", "T"), ("est_tokens_per_s", "{}"), ("compile_s", "{}")]


def format_table(results: list[dict]) -> str:
    def cell(r, key, fmt):
        v = r.get(key)
        if v is None:
            return "-"
        if fmt == "GB":
            return f"{v / 1e9:.2f}"
        if fmt == "n":
            return str(int(sum(c["count"] for c in v)))
        if fmt == "T":
            return f"{v / 1e12:.3f}"
        return fmt.format(v)

    header = [k for k, _ in COLUMNS]
    rows = [[cell(r, k, f) for k, f in COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    out = [line(header)] + [line(row) for row in rows]
    for r in results:
        if r.get("error"):
            out.append(f"{r['target']} batch {r['batch']}: does not fit: {r['error']}")
    out.append("(GB = 1e9 bytes, per device; est_tokens_per_s: the step's tokens over the slower of its bytes at the "
               "HBM bandwidth and its FLOPs at the peak rate, an estimate)")
    return "\n".join(out)
