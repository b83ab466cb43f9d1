"""The device mesh: three named axes, ``data`` (batch), ``expert`` (routed experts) and ``tensor`` (heads,
MLP widths, vocabulary). A spec such as ``"data=1,expert=4,tensor=2"`` names the sizes; missing axes are 1."""

from __future__ import annotations

import math
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.errors import InputError

AXES = ("data", "expert", "tensor")
SPEC_EXAMPLE = "data=1,expert=4,tensor=2"


def parse_spec(spec: str) -> dict[str, int]:
    """``"expert=4,tensor=2"`` -> {"data": 1, "expert": 4, "tensor": 2}; a one-line InputError otherwise."""
    if not isinstance(spec, str):
        raise InputError(f"mesh spec must be a string such as {SPEC_EXAMPLE!r}, got {type(spec).__name__}")
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for part in spec.replace(" ", "").split(","):
        name, eq, value = part.partition("=")
        if not eq or not name or not value.isdigit():
            raise InputError(f"mesh spec {spec!r}: {part!r} is not AXIS=SIZE (expected e.g. {SPEC_EXAMPLE!r})")
        if name not in AXES:
            raise InputError(f"mesh spec {spec!r}: unknown axis {name!r} (expected one of {', '.join(AXES)})")
        if name in seen:
            raise InputError(f"mesh spec {spec!r}: axis {name!r} given twice")
        if int(value) < 1:
            raise InputError(f"mesh spec {spec!r}: axis {name!r} has size {value}, expected at least 1")
        seen.add(name)
        sizes[name] = int(value)
    return sizes


def _largest_divisor(n: int, limit: int) -> int:
    """The largest d <= limit with n % d == 0 and limit % d == 0."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0 and limit % d == 0)


def default_sizes(num_devices: int, cfg: Qwen2MoeConfig | None = None) -> dict[str, int]:
    """Where the devices fit best for this model (see docs/sharding.md for the arithmetic):

    1. ``tensor`` takes the largest factor that divides both the query and the KV heads (4 for this model):
       attention, the shared expert and the vocabulary (a quarter of the weights, read at every decode step
       whatever the routing) are then split without duplicating any head, and the KV cache is split too;
    2. ``expert`` takes what divides the number of experts (the routed experts are spread over
       expert x tensor devices either way);
    3. ``data`` takes the rest (replicas that serve different batch rows).
    """
    cfg = cfg or Qwen2MoeConfig()  # the real model's shapes
    heads = math.gcd(cfg.num_attention_heads, cfg.num_key_value_heads)
    tensor = _largest_divisor(num_devices, heads)
    expert = _largest_divisor(num_devices // tensor, max(cfg.num_experts, 1))
    return {"data": num_devices // (tensor * expert), "expert": expert, "tensor": tensor}


def make_mesh(spec: str | None = None, devices=None, *, cfg: Qwen2MoeConfig | None = None) -> Mesh:
    """A ``Mesh`` with axes ("data", "expert", "tensor") over ``devices`` (default: all of them, every process).

    ``spec`` like ``"data=1,expert=4,tensor=2"``; None chooses with ``default_sizes`` (for ``cfg``, default the
    real Qwen2-57B-A14B shapes); ``describe_mesh`` says what was chosen.
    """
    devices = list(jax.devices() if devices is None else devices)
    if spec is None or isinstance(spec, str) and spec.strip() in ("", "auto"):
        sizes = default_sizes(len(devices), cfg)
    else:
        sizes = parse_spec(spec)
        product = math.prod(sizes.values())
        if product != len(devices):
            raise InputError(f"mesh spec {spec!r}: axis sizes multiply to {product} but there are {len(devices)} "
                             f"devices (the product of data x expert x tensor must equal the device count)")
    shape = tuple(sizes[a] for a in AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)  # sharding propagated by the compiler (pjit semantics)
    try:  # topology-aware device order on TPU/GPU (neighbouring devices on the innermost axis, tensor)
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=auto)


def describe_mesh(mesh: Mesh) -> str:
    """E.g. ``"mesh data=1,expert=2,tensor=4 over 8 cpu devices (2 processes)"``."""
    spec = ",".join(f"{a}={mesh.shape[a]}" for a in AXES)
    platform = mesh.devices.flat[0].platform
    processes = len({d.process_index for d in mesh.devices.flat})
    where = f" ({processes} processes)" if processes > 1 else ""
    return f"mesh {spec} over {mesh.size} {platform} device{'s' if mesh.size > 1 else ''}{where}"


def add_mesh_argument(parser) -> None:
    """A ``--mesh`` flag for a script's own parser (``mesh_from_args`` reads it). The ``qwen2-jax`` command's is
    ``qwen2_jax.cli.common.add_mesh_argument``, which defines it without importing jax."""
    parser.add_argument("--mesh", default=None, metavar="SPEC",
                        help=f"device mesh, e.g. {SPEC_EXAMPLE!r} (missing axes are 1); 'auto' spreads all "
                             "devices as docs/sharding.md recommends; default: one device, no mesh")


def mesh_from_args(args, cfg: Qwen2MoeConfig | None = None) -> Mesh | None:
    """The mesh a ``--mesh`` flag asks for (None when absent); says on stderr which mesh it built."""
    spec = getattr(args, "mesh", None)
    if spec is None:
        return None
    mesh = make_mesh(spec, cfg=cfg)
    print(describe_mesh(mesh), file=sys.stderr)
    return mesh
