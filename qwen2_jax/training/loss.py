"""The training loss: cross-entropy plus the router's load-balancing loss, as transformers' ``Qwen2MoeForCausalLM``
computes ``outputs.loss`` with ``output_router_logits=True``; batches checked and made."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen2_jax.errors import InputError
from qwen2_jax.model import moe

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
