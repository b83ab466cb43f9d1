"""Fine-tuning: the loss, aux loss and gradients equal transformers' (PyTorch autograd) on the same weights; the
sharded train step gives the same loss curve on 1 and 8 devices; a saved and restored train state continues
bit-identically; bad input is refused in one line."""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax
from qwen2_jax import training
from qwen2_jax.model.params import hf_names, lookup, param_table

VOCAB = 128  # tests/hf_reference.TINY


def _padded_batch(seed=0, b=3, t=12, labels_on_padding=False):
    """Row 0 full, row 1 right-padded, row 2 left-padded; labels -100 on padding unless asked otherwise."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, t - 4:] = 0
    mask[2, :5] = 0
    labels = ids.copy() if labels_on_padding else np.where(mask == 1, ids, -100)
    return ids, labels, mask


def _hf_outputs(hf, ids, labels, mask):
    import torch

    out = hf(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask),
             labels=torch.as_tensor(labels), output_router_logits=True)
    return out


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# name -> HF config overrides: the default layout, and dense layers between sparse ones with a larger aux weight
CONFIGS = {
    "all_sparse": {},
    "mixed_dense_norm_topk": {"mlp_only_layers": [1], "norm_topk_prob": True, "num_experts_per_tok": 3,
                              "router_aux_loss_coef": 0.1},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    from hf_reference import make_hf_model, save_hf

    hf = make_hf_model(seed=3, router_std=1.0, **CONFIGS[request.param])
    directory = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, directory, qwen2_jax.from_pretrained(directory, dtype="float32")


@pytest.fixture(scope="module")
def sparse_pair(tmp_path_factory):
    """The all-sparse pair alone (gradients are checked on this layout; the forward on both)."""
    from hf_reference import make_hf_model, save_hf

    hf = make_hf_model(seed=3, router_std=1.0)
    return hf, qwen2_jax.from_pretrained(save_hf(hf, tmp_path_factory.mktemp("sparse")), dtype="float32")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from hf_reference import make_hf_model, save_hf

    return save_hf(make_hf_model(seed=5, router_std=1.0), tmp_path_factory.mktemp("train"))


# ---- loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", ["unpadded", "padded", "padded_labels_on_padding"])
def test_loss_and_aux_loss_equal_transformers_outputs_loss_and_aux_loss(pair, batch):
    hf, _, ours = pair
    ids, labels, mask = _padded_batch(labels_on_padding=batch == "padded_labels_on_padding")
    if batch == "unpadded":
        mask, labels = None, ids
    ref = _hf_outputs(hf, ids, labels, mask)
    got = training.compute_loss(ours, ids, labels, mask)
    assert _rel(got["loss"], ref.loss.item()) < 1e-5
    assert _rel(got["aux_loss"], ref.aux_loss.item()) < 1e-5
    coef = ours.config.router_aux_loss_coef
    np.testing.assert_allclose(got["loss"], got["ce_loss"] + coef * got["aux_loss"], rtol=1e-6)


def test_load_balancing_loss_equals_transformers_function_with_padding_and_top_k():
    import torch
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    rng = np.random.default_rng(1)
    layers, b, t, e = 3, 2, 5, 6
    logits = rng.normal(size=(layers, b * t, e)).astype(np.float32) * 2
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    for top_k in (1, 2, 4):
        for m in (None, mask):
            ref = load_balancing_loss_func(tuple(torch.as_tensor(x) for x in logits), e, top_k,
                                           None if m is None else torch.as_tensor(m))
            got = training.load_balancing_loss(jnp.asarray(logits), e, top_k, None if m is None else jnp.asarray(m))
            assert _rel(got, ref.item()) < 1e-6, (top_k, m is not None)


def test_cross_entropy_ignores_minus_100_and_the_last_position_like_transformers():
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 6))
    labels[0, 2] = labels[1, 0] = labels[1, 4] = -100
    ref = ForCausalLMLoss(torch.as_tensor(logits), torch.as_tensor(labels), 11)
    assert _rel(training.causal_lm_loss(jnp.asarray(logits), jnp.asarray(labels)), ref.item()) < 1e-6


def test_loss_of_a_batch_with_no_counted_label_is_zero_not_nan():
    logits = jnp.zeros((1, 3, 5))
    assert float(training.causal_lm_loss(logits, jnp.full((1, 3), -100))) == 0.0


# ---- gradients ----------------------------------------------------------------------------------------
def _hf_grad(hf, name):
    """PyTorch autograd's gradient for a checkpoint tensor name (HF keeps experts fused at runtime:
    ``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj [E, H, I]``)."""
    params = dict(hf.named_parameters())
    m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
    if not m:
        return params[name].grad.numpy()
    prefix, e, which = m.group(1), int(m.group(2)), m.group(3)
    if which == "down":
        return params[f"{prefix}.down_proj"].grad[e].numpy()
    gate_up = params[f"{prefix}.gate_up_proj"].grad[e].numpy()
    half = gate_up.shape[0] // 2
    return gate_up[:half] if which == "gate" else gate_up[half:]


def _our_grad(cfg, grads, name):
    """Our gradient for a checkpoint tensor name (an expert's: its block of the layer's stack), in HF's layout."""
    for p in param_table(cfg):
        names = hf_names(cfg, p)
        hit = np.argwhere(names == name)
        if hit.size or (names.ndim == 0 and str(names) == name):
            node = lookup(grads, p.path)
            block = np.asarray(node)[tuple(hit[0])] if hit.size else np.asarray(node)
            return block
    raise KeyError(name)


GRAD_NAMES = ["model.layers.1.mlp.gate.weight", "model.layers.2.mlp.experts.5.gate_proj.weight",
              "model.layers.0.mlp.experts.2.down_proj.weight", "model.layers.2.mlp.shared_expert_gate.weight",
              "model.layers.1.self_attn.q_proj.bias", "model.embed_tokens.weight"]


@functools.cache  # one compilation per model structure, shared by the tests
def _jitted_value_and_grad(graphdef, remat):
    def loss(params, ids, labels, mask):
        return training.loss_fn(graphdef, params, ids, labels, mask, remat=remat)["loss"]

    return jax.jit(jax.value_and_grad(loss))


def _value_and_grad(ours, remat=False):
    from flax import nnx

    graphdef, state = nnx.split(ours)
    return _jitted_value_and_grad(graphdef, remat)(nnx.to_pure_dict(state), *_padded_batch(seed=4))


def test_gradients_of_router_expert_shared_gate_and_bias_equal_pytorch_autograd(sparse_pair):
    hf, ours = sparse_pair
    ids, labels, mask = _padded_batch(seed=4)
    hf.zero_grad()
    _hf_outputs(hf, ids, labels, mask).loss.backward()
    _, grads = _value_and_grad(ours)
    for name in GRAD_NAMES:
        ref = _hf_grad(hf, name)
        assert np.abs(ref).max() > 0, name  # the batch reaches this weight
        assert _rel(_our_grad(ours.config, grads, name), ref) < 1e-4, name


def test_rematerialised_layers_give_the_same_loss_and_gradients(hf_dir):
    ours = qwen2_jax.from_pretrained(hf_dir, dtype="float32")  # the all_sparse structure: its plain grad is compiled
    (plain, g_plain), (remat, g_remat) = _value_and_grad(ours), _value_and_grad(ours, remat=True)
    assert _rel(remat, plain) < 1e-6
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        assert _rel(a, b) < 1e-5


# ---- the train step -----------------------------------------------------------------------------------
TC = training.TrainConfig(learning_rate=3e-3, warmup_steps=3, total_steps=10, weight_decay=0.01, max_grad_norm=1.0)


def _batches(n, b=4, t=10):
    """A fixed pattern to learn (so that the curve falls), with left and right padding."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        ids = (np.arange(t)[None] * 3 + rng.integers(0, 4, size=(b, 1))) % VOCAB
        mask = np.ones((b, t), np.int64)
        mask[1, t - 3:] = 0
        mask[2, :2] = 0
        out.append(training.make_batch(ids, np.where(mask == 1, ids, -100), mask))
    return out


def loss_curve(directory, spec, steps=10):
    """The losses of ``steps`` train steps on a mesh given by ``spec`` (run in a subprocess for 8 devices)."""
    from qwen2_jax.sharding import make_mesh

    mesh = make_mesh(spec)
    model = qwen2_jax.from_pretrained(directory, dtype="float32")
    graphdef, state = training.init_train_state(model, TC, mesh)
    step = training.make_train_step(graphdef, TC, state, mesh)
    losses = []
    for batch in _batches(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.fixture(scope="module")
def trainer(hf_dir):
    """dtype -> (fresh(): a new train state at step 0, step): one compiled step per dtype for the module."""
    made = {}

    def get(dtype):
        if dtype not in made:
            def fresh():
                return training.init_train_state(qwen2_jax.from_pretrained(hf_dir, dtype=dtype), TC)[1]

            graphdef, like = training.init_train_state(qwen2_jax.from_pretrained(hf_dir, dtype=dtype), TC)
            made[dtype] = fresh, training.make_train_step(graphdef, TC, like)
        return made[dtype]

    return get


def _run(step, state, batches):
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_train_step_gives_the_same_loss_curve_on_1_and_8_devices(hf_dir, trainer):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, __file__, "curve", hf_dir, "data=2,expert=2,tensor=2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(__file__))
    fresh, step = trainer("float32")  # meanwhile, one device
    _, one = _run(step, fresh(), _batches(10))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    eight = json.loads(out.strip().splitlines()[-1])
    assert one[-1] < 0.8 * one[0]  # it learns
    np.testing.assert_allclose(eight, one, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_restore_continue_is_bit_identical_to_an_uninterrupted_run(trainer, tmp_path, dtype):
    fresh, step = trainer(dtype)
    batches = _batches(6)
    state = fresh()
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    final, uninterrupted = _run(step, state, batches)

    state, _ = _run(step, fresh(), batches[:3])
    training.save_train_state(tmp_path / "ckpt", state)
    del state
    state = training.restore_train_state(tmp_path / "ckpt", like)
    assert int(state.step) == 3
    state, resumed = _run(step, state, batches[3:])
    assert resumed == uninterrupted[3:]
    assert jax.tree.structure(state) == jax.tree.structure(final)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(final)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing temporary left beside it


def test_bfloat16_parameters_keep_a_float32_master_copy_and_float32_moments(trainer):
    fresh, step = trainer("bfloat16")
    state, _ = _run(step, fresh(), _batches(3))
    assert isinstance(state.opt_state, training.MasterWeights)
    assert {a.dtype for a in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(state.opt_state) if a.ndim} == {jnp.dtype(jnp.float32)}
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.opt_state.master)):
        assert np.array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
    # The master copy holds what bfloat16 cannot: it differs from its rounded copy almost everywhere.
    master = jax.tree.leaves(state.opt_state.master)
    assert np.mean([np.mean(np.asarray(m) != np.asarray(m.astype(jnp.bfloat16).astype(jnp.float32)))
                    for m in master if m.size > 64]) > 0.9


def test_train_step_reports_loss_grad_norm_and_learning_rate_of_the_schedule(trainer):
    fresh, step = trainer("float32")
    state, rates = fresh(), []
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, _batches(1)[0])
    rates.append(float(metrics["learning_rate"]))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        assert np.array_equal(np.asarray(a), b)  # the rate of step 0 is 0: Adam and weight decay do nothing
    for batch in _batches(4)[1:]:
        state, metrics = step(state, batch)
        assert set(metrics) == {"loss", "ce_loss", "aux_loss", "grad_norm", "learning_rate"}
        assert float(metrics["grad_norm"]) > 0
        rates.append(float(metrics["learning_rate"]))
    np.testing.assert_allclose(rates, [0.0, 1e-3, 2e-3, 3e-3], rtol=1e-6)  # linear warm-up over 3 steps


@pytest.mark.parametrize("decay,expected_end", [("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)])
def test_schedule_warms_up_linearly_then_decays(decay, expected_end):
    tc = training.TrainConfig(learning_rate=1.0, warmup_steps=2, total_steps=6, decay=decay)
    rates = [float(tc.schedule()(i)) for i in range(7)]
    assert rates[:3] == [0.0, 0.5, 1.0]
    assert rates[-1] == pytest.approx(expected_end)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))


# ---- bad input ----------------------------------------------------------------------------------------
def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_labels_of_the_wrong_shape_are_refused_in_one_line(pair):
    _, _, ours = pair
    ids = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError) as e:
        training.compute_loss(ours, ids, np.zeros((2, 4), np.int32))
    assert "labels has shape (2, 4)" in _one_line(e) and "(2, 5)" in _one_line(e)
    with pytest.raises(ValueError) as e:
        training.make_batch(ids, np.zeros((5, 2), np.int32))
    assert "labels has shape (5, 2)" in _one_line(e)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0)])
def test_an_empty_batch_is_refused_in_one_line(shape):
    with pytest.raises(ValueError) as e:
        training.make_batch(np.zeros(shape, np.int32), np.zeros(shape, np.int32))
    assert "empty batch" in _one_line(e) and str(shape) in _one_line(e)


@pytest.mark.parametrize("rate", [0.0, -1e-4, float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_positive_is_refused_in_one_line(rate):
    with pytest.raises(ValueError) as e:
        training.TrainConfig(learning_rate=rate)
    assert "learning_rate must be a positive number" in _one_line(e)


def test_labels_that_are_neither_ignored_nor_token_ids_are_refused_in_one_line(pair):
    _, _, ours = pair
    ids = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError) as e:
        training.compute_loss(ours, ids, np.array([[1, -100, VOCAB, 2]]))
    assert f"labels hold {VOCAB}" in _one_line(e)


def _small_state(value):
    return training.TrainState(jnp.zeros((), jnp.int32), {"w": jnp.full(3, value)}, (jnp.zeros(3),))


def test_saving_over_an_existing_checkpoint_is_refused_unless_forced(tmp_path):
    training.save_train_state(tmp_path / "ckpt", _small_state(1.0))
    with pytest.raises(FileExistsError) as e:
        training.save_train_state(tmp_path / "ckpt", _small_state(2.0))
    assert "already exists" in _one_line(e)
    training.save_train_state(tmp_path / "ckpt", _small_state(2.0), force=True)
    assert np.array_equal(training.restore_train_state(tmp_path / "ckpt", _small_state(0.0)).params["w"], [2, 2, 2])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_restoring_into_a_state_of_another_structure_is_refused_in_one_line(tmp_path):
    training.save_train_state(tmp_path / "ckpt", _small_state(1.0))
    other = training.TrainState(jnp.zeros((), jnp.int32), {"v": jnp.ones(3)}, (jnp.zeros(3),))
    with pytest.raises(ValueError) as e:
        training.restore_train_state(tmp_path / "ckpt", other)
    assert "not a train state of this model" in _one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        training.restore_train_state(tmp_path / "missing", other)
    assert "missing" in _one_line(e)


def test_weight_decay_masks_biases_and_norm_scales_only():
    params = {"model": {"norm": {"weight": 0}, "layers": {0: {"input_layernorm": {"weight": 0},
                                                              "self_attn": {"q_proj": {"weight": 0, "bias": 0}},
                                                              "mlp": {"experts": {"gate_up_proj": 0}}}},
                        "embed_tokens": {"embedding": 0}},
              "lm_head": {"weight": 0}}
    mask = training.step._decays(params)
    assert mask == {"model": {"norm": {"weight": False},
                              "layers": {0: {"input_layernorm": {"weight": False},
                                             "self_attn": {"q_proj": {"weight": True, "bias": False}},
                                             "mlp": {"experts": {"gate_up_proj": True}}}},
                              "embed_tokens": {"embedding": True}},
                    "lm_head": {"weight": True}}


if __name__ == "__main__":  # the subprocess of the 8-device test: prints the loss curve as JSON
    if sys.argv[1] == "curve":
        print(json.dumps(loss_curve(sys.argv[2], sys.argv[3])))
