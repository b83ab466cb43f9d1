"""Fine-tuning groundwork: the training loss (cross-entropy plus the router's load-balancing loss, as
transformers' ``Qwen2MoeForCausalLM`` computes ``outputs.loss`` with ``output_router_logits=True``), a jitted
and sharded optax train step, and train-state checkpoints through Orbax.

    tc = TrainConfig(learning_rate=1e-5, warmup_steps=100, total_steps=10_000)
    graphdef, state = init_train_state(model, tc, mesh)       # TrainState(step, params, opt_state)
    step = make_train_step(graphdef, tc, state, mesh)
    state, metrics = step(state, make_batch(input_ids, labels, attention_mask))
    save_train_state(path, state)
    state = restore_train_state(path, like=state)

Precision: the parameters keep the model's dtype. When that is not float32 (bfloat16), the optimizer keeps a
float32 master copy of the parameters in its state (``MasterWeights``): gradients are cast to float32, AdamW
updates the master copy in float32 (its moments are float32 too), and the parameters are the master rounded
to bfloat16. Updating bfloat16 weights in place would lose every update smaller than half a bfloat16 ulp
(about 0.4% of the weight), so small learning rates would stall. ``master_weights=False`` trains the
parameters in their own dtype instead (less memory, optimizer moments in that dtype too).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwen2_jax.model import moe
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.errors import InputError
from qwen2_jax.model.hf_files import CheckpointError
from qwen2_jax.model.modeling import is_norm_scale

IGNORE_INDEX = -100  # transformers' ignore_index for labels


# ---- the loss -------------------------------------------------------------------------------------------
def causal_lm_loss(logits, labels, ignore_index: int = IGNORE_INDEX):
    """transformers' ``ForCausalLMLoss``: position t predicts ``labels[t + 1]``; labels equal to
    ``ignore_index`` (and the last position) do not count; the mean over the tokens that count, in float32.
    Where no token counts the loss is 0 (transformers gives NaN), so such a batch leaves the weights alone."""
    shift = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], ignore_index)], axis=1)
    valid = shift != ignore_index
    logits = logits.astype(jnp.float32)
    target = jnp.take_along_axis(logits, jnp.where(valid, shift, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None):
    """transformers' ``load_balancing_loss_func`` (Switch Transformer eqs. 4-6) over every sparse layer.

    router_logits: [num_sparse_layers, B*T, E]; attention_mask: [B, T] or None. Each layer's rows are the
    batch's tokens in row-major order, so the flattened mask applies to every layer. The fraction of top-k
    assignments and the mean router probability per expert are pooled over all layers and unmasked tokens
    (counts summed over the k choices), and the loss is ``E * sum_e fraction[e] * probability[e]``.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, selected = jax.lax.top_k(probs, top_k)  # [L, N, K]; indices carry no gradient, as in torch
    rows = router_logits.shape[1]
    mask = jnp.ones((rows,), jnp.float32) if attention_mask is None else attention_mask.reshape(-1).astype(jnp.float32)
    if mask.shape[0] != rows:
        raise InputError(f"attention_mask has {mask.shape[0]} tokens but router_logits have {rows} rows")
    # Counts by scatter-add: a one-hot [L, N, K, E] would be ~2 GB for 28 layers x 32k tokens x 8 x 64. The
    # summands are 0/1, so the float32 sums are exact in any order.
    counts = jax.ops.segment_sum(jnp.broadcast_to(mask[None, :, None], selected.shape).reshape(-1),
                                 selected.reshape(-1), num_segments=num_experts)
    prob_sum = jnp.einsum("lne,n->e", probs, mask)
    total_rows = router_logits.shape[0] * jnp.sum(mask)
    total_rows = jnp.maximum(total_rows, 1.0)  # every token padded: 0 (transformers gives NaN)
    return num_experts * jnp.sum((counts / total_rows) * (prob_sum / total_rows))


def _train_moe_impl(model, moe_impl, num_tokens: int):
    """``auto`` as inference picks it, except the ``loop`` dispatch, whose while-loop has no reverse-mode
    derivative (training takes ``dense``, the same function, in its place); on a model with a mesh of more
    than one device, expert-parallel (``qwen2_jax.sharding.expert_parallel_moe``) around that choice."""
    cfg = model.config
    if moe_impl != "auto" or not cfg.num_sparse_layers:
        return moe_impl
    mesh = getattr(model, "mesh", None)
    platform = moe.canonical_platform(mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
    impl = moe.choose(num_tokens, cfg.num_experts_per_tok, cfg.num_experts, platform)
    impl = "dense" if impl == "loop" else impl
    if mesh is not None and mesh.size > 1:
        from qwen2_jax.sharding import expert_parallel_moe

        return expert_parallel_moe(mesh, impl, platform)
    return impl


def _losses(model, input_ids, labels, attention_mask, moe_impl, remat) -> dict:
    cfg = model.config
    impl = _train_moe_impl(model, moe_impl, input_ids.shape[0] * input_ids.shape[1])
    out = model.forward(input_ids, attention_mask, moe_impl=impl, output_router_logits=True, remat=remat)
    ce_loss = causal_lm_loss(out.logits, labels)
    if out.router_logits is None:  # no sparse layer: transformers' aux loss is 0 then
        aux_loss = jnp.zeros((), jnp.float32)
    else:
        aux_loss = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, attention_mask)
    return {"loss": ce_loss + cfg.router_aux_loss_coef * aux_loss, "ce_loss": ce_loss, "aux_loss": aux_loss}


def compute_loss(model, input_ids, labels, attention_mask=None, *, moe_impl="auto", remat=False) -> dict:
    """``{"loss", "ce_loss", "aux_loss"}`` (float32 scalars) for a batch: ``loss`` is transformers'
    ``outputs.loss`` with ``output_router_logits=True`` (``ce_loss + router_aux_loss_coef * aux_loss``) and
    ``aux_loss`` its ``outputs.aux_loss``. The padding named by ``attention_mask`` is left out of the aux
    loss; leave it out of the cross-entropy by setting its labels to -100, as with transformers."""
    input_ids, labels, attention_mask = _check_batch(input_ids, labels, attention_mask, model.config.vocab_size)
    return _losses(model, input_ids, labels, attention_mask, moe_impl, remat)


def loss_fn(graphdef, params, input_ids, labels, attention_mask=None, *, moe_impl="auto", remat=False) -> dict:
    """``compute_loss`` as a pure function of the parameter pytree (``nnx.split(model)``'s state, or its pure
    dict), for ``jax.jit`` and ``jax.grad``: the module is rebuilt inside from the static ``graphdef``."""
    return _losses(nnx.merge(graphdef, params), input_ids, labels, attention_mask, moe_impl, remat)


def _check_batch(input_ids, labels, attention_mask, vocab_size=None):
    shape = tuple(np.shape(input_ids))
    if len(shape) != 2:
        raise InputError(f"input_ids must be [batch, seq]; got shape {shape}")
    if 0 in shape:
        raise InputError(f"empty batch: input_ids has shape {shape}; need at least one sequence of one token")
    if tuple(np.shape(labels)) != shape:
        raise InputError(f"labels has shape {tuple(np.shape(labels))}; expected input_ids' shape {shape}")
    if attention_mask is not None and tuple(np.shape(attention_mask)) != shape:
        raise InputError(f"attention_mask has shape {tuple(np.shape(attention_mask))}; "
                         f"expected input_ids' shape {shape}")
    for name, a in (("input_ids", input_ids), ("labels", labels)):
        if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
            raise InputError(f"{name} must hold integer token ids; got dtype {jnp.result_type(a)}")
    if vocab_size is not None:  # host arrays only: checking device arrays would wait for them
        if isinstance(input_ids, np.ndarray) and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
            raise InputError(f"input_ids hold ids outside [0, vocab_size={vocab_size}): min {input_ids.min()}, "
                             f"max {input_ids.max()}")
        bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))] if isinstance(
            labels, np.ndarray) else ()
        if len(bad):
            raise InputError(f"labels hold {bad[0]}, neither {IGNORE_INDEX} (ignored) nor an id in "
                             f"[0, vocab_size={vocab_size})")
    return input_ids, labels, attention_mask


def make_batch(input_ids, labels, attention_mask=None) -> dict:
    """A validated host batch ``{"input_ids", "labels", "attention_mask"}`` of int32 ``[B, T]`` arrays (the
    mask all ones when not given), the form ``make_train_step``'s step takes."""
    _check_batch(input_ids, labels, attention_mask)
    input_ids, labels = np.asarray(input_ids, np.int32), np.asarray(labels, np.int32)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


# ---- optimizer and train state ------------------------------------------------------------------------
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


# ---- checkpoints ----------------------------------------------------------------------------------------
def save_train_state(directory, state: TrainState, *, force: bool = False) -> str:
    """Writes ``state`` as an Orbax checkpoint at ``directory``, atomically: Orbax writes into a temporary
    directory beside it and renames it when complete, so an interrupted save leaves no checkpoint. An
    existing ``directory`` is refused unless ``force``; then the new checkpoint is written completely before
    the old one is swapped out."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    exists = os.path.exists(directory)
    if exists and not force:
        raise FileExistsError(f"{directory}: already exists (pass force=True to overwrite)")
    swap = exists and jax.process_count() == 1  # several processes: Orbax removes the old one first
    target = f"{directory}.saving-{os.getpid()}" if swap else directory
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, _to_saveable(state), force=force)
        checkpointer.wait_until_finished()
    if swap:
        old = f"{directory}.old-{os.getpid()}"
        os.rename(directory, old)
        os.rename(target, directory)
        shutil.rmtree(old)
    return directory


def restore_train_state(directory, like: TrainState) -> TrainState:
    """The train state saved at ``directory``, with the structure, dtypes and shardings of ``like`` (a
    ``TrainState`` of arrays, donated ones included, or of ``jax.ShapeDtypeStruct``s with shardings, e.g.
    the state ``init_train_state`` returns)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no train-state checkpoint there")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None) or default),
        _to_saveable(like))
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            restored = checkpointer.restore(directory, target)
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{directory}: not a train state of this model and TrainConfig ({first})") from None
    return _from_saveable(restored, like)


def _to_saveable(state: TrainState) -> dict:
    """Params as their nested dict; the optimizer state as its leaves in order (optax's state classes are
    not something to write into a file format)."""
    leaves = jax.tree.leaves(state.opt_state)
    return {"step": state.step, "params": state.params,
            "opt_state": {f"{i:04d}": leaf for i, leaf in enumerate(leaves)}}


def _from_saveable(saved: dict, like: TrainState) -> TrainState:
    opt_leaves = [saved["opt_state"][k] for k in sorted(saved["opt_state"])]
    opt_state = jax.tree.unflatten(jax.tree.structure(like.opt_state), opt_leaves)
    return TrainState(saved["step"], saved["params"], opt_state)
