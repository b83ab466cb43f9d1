"""The optimizer, the train state and the jitted, sharded train step."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwen2_jax.errors import InputError
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.model.modeling import is_norm_scale
from .loss import _check_batch, loss_fn

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """AdamW with a learning-rate schedule and gradient clipping. Defaults follow the HF Trainer's AdamW
    (betas 0.9/0.999, eps 1e-8); weight decay skips biases and norm weights, as the HF Trainer does."""

    learning_rate: float = 1e-5  # the peak, reached at the end of warm-up
    total_steps: int = 1000  # length of the schedule; the rate stays at its end value after it
    warmup_steps: int = 0  # linear from 0
    decay: str = "cosine"  # after warm-up: "cosine", "linear" or "constant"
    end_learning_rate: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # clip by global norm; None: no clipping
    remat: bool = False  # recompute each layer's activations in the backward pass (memory for compute)
    master_weights: bool = True  # float32 master copy in the optimizer state when parameters are not float32
    moe_impl: str | Callable = "auto"  # the routed-expert dispatch (a name from qwen2_jax.model.moe or a callable)

    def __post_init__(self):
        rate, end, decay = (_number_or_nan(v) for v in (self.learning_rate, self.end_learning_rate, self.weight_decay))
        if not (math.isfinite(rate) and rate > 0):
            raise InputError(f"learning_rate must be a positive number; got {self.learning_rate!r}")
        if not 0 <= end <= rate:
            raise InputError(f"end_learning_rate must be in [0, learning_rate={self.learning_rate}]; "
                             f"got {self.end_learning_rate!r}")
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise InputError(f"total_steps must be a positive integer; got {self.total_steps!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.total_steps:
            raise InputError(f"warmup_steps must be an integer in [0, total_steps={self.total_steps}]; "
                             f"got {self.warmup_steps!r}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise InputError(f"decay must be 'cosine', 'linear' or 'constant'; got {self.decay!r}")
        if not (math.isfinite(decay) and decay >= 0):
            raise InputError(f"weight_decay must be a finite number >= 0; got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not _number_or_nan(self.max_grad_norm) > 0:
            raise InputError(f"max_grad_norm must be positive or None; got {self.max_grad_norm!r}")

    def schedule(self) -> optax.Schedule:
        peak, end, warm = self.learning_rate, self.end_learning_rate, self.warmup_steps
        rest = max(self.total_steps - warm, 1)
        after = {"cosine": optax.cosine_decay_schedule(peak, rest, alpha=end / peak),
                 "linear": optax.linear_schedule(peak, end, rest),
                 "constant": optax.constant_schedule(peak)}[self.decay]
        if warm == 0:
            return after
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def _number_or_nan(value) -> float:
    """A TrainConfig value as a float for its checks (nan, which every check refuses, for a non-number)."""
    if isinstance(value, (str, bytes, bool)):  # float("1e-3") would pass, and optax fail on the string later
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _decays(params):
    """Weight decay applies to matrices (kernels, embeddings, experts, lm_head), not to biases or norm weights."""
    def decays(path, _):
        keys = [str(getattr(k, "key", k)) for k in path]
        return keys[-1] != "bias" and not is_norm_scale(keys)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(tc.schedule(), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=_decays)
    if tc.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), adamw)


class MasterWeights(NamedTuple):
    """The optimizer state when parameters are kept in bfloat16: the float32 master parameters and the
    optimizer's own (float32) state over them."""

    master: Any
    inner: Any


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: steps taken
    params: dict  # nested dict of arrays, keyed like ``Param.path``
    opt_state: Any  # optax state (or MasterWeights)


def _uses_master(tc: TrainConfig, params) -> bool:
    return tc.master_weights and any(a.dtype != jnp.float32 for a in jax.tree.leaves(params))


def _init_opt_state(tc: TrainConfig, params):
    tx = make_optimizer(tc)
    if _uses_master(tc, params):
        master = jax.tree.map(lambda a: a.astype(jnp.float32), params)
        return MasterWeights(master, tx.init(master))
    return tx.init(params)


def _tree_from_paths(flat: dict, params) -> dict:
    """A tree shaped like ``params`` with the value ``flat[path]`` at each leaf."""
    return jax.tree_util.tree_map_with_path(lambda path, _: flat[tuple(str(k.key) for k in path)], params)


def state_shardings(cfg: Qwen2MoeConfig, tc: TrainConfig, mesh, params) -> TrainState:
    """The sharding of every array of the train state on ``mesh``: parameters by the inference partition
    rules (``qwen2_jax.sharding.param_shardings``), each optimizer moment and master copy like its
    parameter, scalars (step, counts) replicated."""
    from qwen2_jax.sharding import param_shardings

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_param = _tree_from_paths(param_shardings(cfg, mesh), params)
    tx = make_optimizer(tc)
    abstract = jax.eval_shape(lambda p: _init_opt_state(tc, p), params)

    def like_params(opt_state):
        return optax.tree_map_params(tx, lambda _, s: s, opt_state, by_param,
                                     transform_non_params=lambda _: replicated)

    if isinstance(abstract, MasterWeights):
        opt = MasterWeights(by_param, like_params(abstract.inner))
    else:
        opt = like_params(abstract)
    return TrainState(replicated, by_param, opt)


def init_train_state(model, tc: TrainConfig, mesh=None) -> tuple[Any, TrainState]:
    """Splits ``model`` once into its static graph definition and a ``TrainState`` at step 0. With ``mesh``
    (default: the model's own, from ``from_pretrained(..., mesh=)``) the parameters and the optimizer state
    are placed in their shardings, and the mesh is recorded on the model (``model.mesh``) so that the
    forward runs its routed experts expert-parallel."""
    mesh = mesh if mesh is not None else getattr(model, "mesh", None)
    if mesh is not None:
        model.mesh = mesh
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    if mesh is None:
        opt_state = jax.jit(lambda p: _init_opt_state(tc, p))(params)
        # Committed to one device like the step's outputs, so that the second step does not compile again.
        return graphdef, jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, opt_state), jax.devices()[0])
    shardings = state_shardings(model.config, tc, mesh, params)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(lambda p: _init_opt_state(tc, p), out_shardings=shardings.opt_state)(params)
    return graphdef, TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state)


def train_step(graphdef, tc: TrainConfig, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One AdamW step on ``batch``; returns the new state and float32 metrics (``loss``, ``ce_loss``,
    ``aux_loss``, ``grad_norm`` before clipping, ``learning_rate`` used)."""

    def loss_of(params):
        out = loss_fn(graphdef, params, batch["input_ids"], batch["labels"], batch["attention_mask"],
                      moe_impl=tc.moe_impl, remat=tc.remat)
        return out["loss"], out

    (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    tx = make_optimizer(tc)
    if isinstance(state.opt_state, MasterWeights):
        master, inner = state.opt_state
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, inner = tx.update(grads, inner, master)
        master = optax.apply_updates(master, updates)
        params = jax.tree.map(lambda m, p: m.astype(p.dtype), master, state.params)
        opt_state = MasterWeights(master, inner)
    else:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=_global_norm(grads),
                   learning_rate=jnp.asarray(tc.schedule()(state.step), jnp.float32))
    return TrainState(state.step + 1, params, opt_state), metrics


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(tree)))


def make_train_step(graphdef, tc: TrainConfig, like: TrainState, mesh=None) -> Callable[[TrainState, dict], tuple]:
    """``step(state, batch) -> (state, metrics)``: ``train_step`` jitted once, with the train state donated
    (updated in place). On ``mesh``, with input and output shardings: the state keeps those of ``like`` (as
    ``init_train_state`` or ``restore_train_state`` placed it, see ``state_shardings``), the batch is split
    over the ``data`` axis (``qwen2_jax.sharding.batch_sharding``). ``batch`` is ``make_batch``'s dict; its
    shapes are checked before the call."""
    fn = lambda state, batch: train_step(graphdef, tc, state, batch)  # noqa: E731 (graphdef, tc are static)
    if mesh is None:
        jitted = jax.jit(fn, donate_argnums=0)
    else:
        from qwen2_jax.sharding import batch_sharding, check_batch, replicated

        state_sh = jax.tree.map(lambda a: a.sharding, like)
        jitted = jax.jit(fn, in_shardings=(state_sh, batch_sharding(mesh)), out_shardings=(state_sh, replicated(mesh)),
                         donate_argnums=0)

    vocab_size = like.params["model"]["embed_tokens"]["embedding"].shape[0]

    def step(state: TrainState, batch: dict):
        _check_batch(batch["input_ids"], batch["labels"], batch["attention_mask"], vocab_size)
        if mesh is not None:
            check_batch(mesh, np.shape(batch["input_ids"])[0])
        return jitted(state, batch)

    return step
