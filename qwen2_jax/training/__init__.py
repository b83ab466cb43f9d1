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

Modules: ``loss`` (the loss and batches), ``step`` (optimizer, train state, the jitted step), ``checkpoint``
(train-state checkpoints).
"""

from .checkpoint import restore_train_state, save_train_state
from .loss import IGNORE_INDEX, causal_lm_loss, compute_loss, load_balancing_loss, loss_fn, make_batch
from .step import (MasterWeights, TrainConfig, TrainState, init_train_state, make_optimizer, make_train_step,
                   state_shardings, train_step)

__all__ = ["IGNORE_INDEX", "MasterWeights", "TrainConfig", "TrainState", "causal_lm_loss", "compute_loss",
           "init_train_state", "load_balancing_loss", "loss_fn", "make_batch", "make_optimizer", "make_train_step",
           "restore_train_state", "save_train_state", "state_shardings", "train_step"]
