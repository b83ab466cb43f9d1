"""Train-state checkpoints through Orbax: written atomically, restored into the shardings of a live state."""

from __future__ import annotations

import os
import shutil

import jax

from qwen2_jax.model.hf_files import CheckpointError
from .step import TrainState

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
