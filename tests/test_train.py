"""PrefixLM loss, the sharded train step, FSDP/tensor sharding, checkpoint/resume and `train.train`."""
from __future__ import annotations

import json
import logging
import os
import signal

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from conftest import register_builtin, tiny_config
from simvlm_jax import checkpointing, losses, partitioning, train
from simvlm_jax.data import pipeline
from simvlm_jax.models import simvlm

GLOBAL_BATCH = 8


# ----------------------------------------------------------------------------- loss

def prefix_lm_loss(logits, targets):
    """Mean PrefixLM loss + per-token metrics from the objective the train step uses."""
    obj = losses.prefix_lm_objective(logits, targets)
    denom = jnp.maximum(obj.weight, 1.0)
    return obj.value / denom, {"token_accuracy": obj.sums["token_accuracy"] / denom,
                               "num_target_tokens": obj.sums["num_target_tokens"]}


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_prefix_lm_loss_is_mean_nll_over_non_pad_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = np.array([[4, 7, 1, 0, 0], [3, 3, 3, 3, 1], [9, 1, 0, 0, 0]], np.int32)
    loss, metrics = prefix_lm_loss(jnp.asarray(logits), jnp.asarray(targets))
    logp = _np_log_softmax(logits.astype(np.float64))
    nll = [-logp[b, t, targets[b, t]] for b in range(3) for t in range(5) if targets[b, t] > 0]
    assert len(nll) == 10
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    assert float(metrics["num_target_tokens"]) == 10
    acc = np.mean([logits[b, t].argmax() == targets[b, t]
                   for b in range(3) for t in range(5) if targets[b, t] > 0])
    np.testing.assert_allclose(float(metrics["token_accuracy"]), acc, rtol=1e-6)
    # A per-token mean, not a per-sequence mean: rows with more tokens weigh more.
    per_row = [np.mean([-logp[b, t, targets[b, t]] for t in range(5) if targets[b, t]]) for b in range(3)]
    assert abs(np.mean(per_row) - np.mean(nll)) > 1e-4


def test_prefix_lm_loss_ignores_padding():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 6, 9)), jnp.float32)
    targets = jnp.asarray([[5, 6, 1, 0, 0, 0], [2, 8, 8, 7, 1, 0]], jnp.int32)
    loss, _ = prefix_lm_loss(logits, targets)
    pad = (targets == 0)[..., None]
    noisy = jnp.where(pad, logits + 100.0 * jnp.asarray(rng.normal(size=logits.shape), jnp.float32), logits)
    np.testing.assert_allclose(float(prefix_lm_loss(noisy, targets)[0]), float(loss), rtol=1e-6)
    grads = jax.grad(lambda lg: prefix_lm_loss(lg, targets)[0])(logits)
    assert float(jnp.abs(jnp.where(pad, grads, 0.0)).max()) == 0.0
    assert float(jnp.abs(jnp.where(pad, 0.0, grads)).min(axis=-1).max()) > 0.0
    # Control: changing logits at a real target position does change the loss.
    moved = logits.at[0, 1].add(5.0 * jnp.arange(9, dtype=jnp.float32))
    assert abs(float(prefix_lm_loss(moved, targets)[0]) - float(loss)) > 1e-3
    # All-padding batch: no division by zero.
    zero_loss, m = prefix_lm_loss(logits, jnp.zeros_like(targets))
    assert float(zero_loss) == 0.0 and float(m["num_target_tokens"]) == 0.0


def test_loss_counts_only_target_tokens_not_the_prefix():
    """Moving tokens from the target into the prefix removes them from the loss."""
    cfg = tiny_config()
    model = simvlm.SimVLM(cfg)
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), simvlm.dummy_batch(cfg))))()["params"]
    loss_fn = jax.jit(lambda p, b: prefix_lm_loss(model.apply({"params": p}, b), b["target_tokens"]))
    caption = np.array([11, 12, 13, 14, 15, 16, 1], np.int32)
    batch = {k: np.array(v) for k, v in simvlm.dummy_batch(cfg, 2).items()}
    for row, k in enumerate([0, 3]):  # no prefix / 3 prefix tokens
        batch["prefix_tokens"][row, :k] = caption[:k]
        batch["target_tokens"][row, : len(caption) - k] = caption[k:]
    _, metrics = loss_fn(params, batch)
    assert float(metrics["num_target_tokens"]) == 7 + 4
    # Changing only the prefix changes the loss value (it conditions the decoder) ...
    b2 = {**batch, "prefix_tokens": batch["prefix_tokens"].copy()}
    b2["prefix_tokens"][1, :3] = [20, 21, 22]
    l1, m1 = loss_fn(params, batch)
    l2, m2 = loss_fn(params, b2)
    assert abs(float(l1) - float(l2)) > 1e-6
    # ... but never the set of predicted tokens.
    assert float(m1["num_target_tokens"]) == float(m2["num_target_tokens"])


def test_make_optimizer_schedule_and_decay_mask(clean_gin):
    tx, lr = train.make_optimizer(total_steps=100, learning_rate=1e-2, warmup_steps=10, schedule="cosine",
                                  end_lr_fraction=0.1)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 5e-3, rtol=1e-5)
    np.testing.assert_allclose(float(lr(10)), 1e-2, rtol=1e-5)
    np.testing.assert_allclose(float(lr(100)), 1e-3, rtol=1e-4)
    assert float(lr(50)) < 1e-2
    with pytest.raises(ValueError, match="schedule"):
        train.make_optimizer(total_steps=10, schedule="exponential")
    mask = train.decay_mask({"dense": {"kernel": 1, "bias": 2}, "ln": {"scale": 3}, "embed": {"embedding": 4}})
    assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False},
                    "embed": {"embedding": False}}


def test_make_mesh():
    mesh = partitioning.make_mesh(data=2, fsdp=-1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert partitioning.num_batch_shards(mesh) == 8
    for kwargs, match in [(dict(data=3, fsdp=1), "does not fit the 8 devices"), (dict(data=-1, fsdp=-1), "only one axis"),
                          (dict(data=3, fsdp=-1), "does not fit"), (dict(data=0, fsdp=-1), "positive")]:
        with pytest.raises(ValueError, match=match):
            partitioning.make_mesh(**kwargs)


# ----------------------------------------------------------------------------- sharded training

def _bind_optimizer():
    gin.bind_parameter("make_optimizer.learning_rate", 1e-2)
    gin.bind_parameter("make_optimizer.warmup_steps", 2)
    gin.bind_parameter("make_optimizer.weight_decay", 0.0)


def make_trainer(mesh, total_steps=20, **cfg_overrides):
    gin.clear_config()
    _bind_optimizer()
    try:
        return train.Trainer(tiny_config(**cfg_overrides), mesh, train.make_optimizer(total_steps))
    finally:
        gin.clear_config()


def fixed_batch(cfg, n=GLOBAL_BATCH, seed=0):
    rng = np.random.default_rng(seed)
    prefix = np.zeros((n, cfg.max_prefix_len), np.int32)
    target = np.zeros((n, cfg.max_target_len), np.int32)
    for i in range(n):
        k = int(rng.integers(0, 4))
        m = int(rng.integers(3, cfg.max_target_len + 1))
        prefix[i, :k] = rng.integers(3, 60, k)
        target[i, :m] = rng.integers(3, 60, m)
        target[i, m - 1] = 1
    return {"image": rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3)).astype(np.uint8),
            "has_image": (np.arange(n) % 4 != 3).astype(np.int32),
            "prefix_tokens": prefix, "target_tokens": target}


def host_copy(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def mesh_2x4():
    return partitioning.make_mesh(data=2, fsdp=4)


@pytest.fixture(scope="module")
def trainer_2x4(mesh_2x4):
    return make_trainer(mesh_2x4)


def test_train_step_lowers_loss_on_fixed_batch(trainer_2x4, mesh_2x4):
    trainer = trainer_2x4
    batch = partitioning.host_batch_to_global(fixed_batch(trainer.config), mesh_2x4)
    state = trainer.init_state()
    losses = []
    for _ in range(20):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 20
    assert np.all(np.isfinite(losses))
    assert losses[0] == losses[1], losses  # warmup: the learning rate of step 0 is 0
    assert np.all(np.diff(losses[1:]) < 0), losses  # then it falls every step
    assert losses[-1] < 0.75 * losses[0], losses
    assert float(metrics["num_target_tokens"]) == float((batch["target_tokens"] > 0).sum())
    assert float(metrics["grad_norm"]) > 0
    # Warmup of 2 steps then cosine decay to 0 at step 20 (metrics report the lr of the step taken).
    np.testing.assert_allclose(float(metrics["learning_rate"]), float(trainer.lr_schedule(19)), rtol=1e-6)


def test_compile_step_runs_the_same_step_without_jit(mesh_2x4):
    """The loop compiles before its first step (so processes can wait for each other): `step` then
    runs that executable, and it computes what the jitted step computes."""
    ref, aot = make_trainer(mesh_2x4), make_trainer(mesh_2x4)
    batch = partitioning.host_batch_to_global(fixed_batch(ref.config), mesh_2x4)
    ref_state, _ = ref.step(ref.init_state(), batch)
    ref_state, ref_metrics = ref.step(ref_state, batch)
    state = aot.init_state()
    aot.compile_step(state, batch)
    aot._step = None  # pylint: disable=protected-access  (the jitted step must not be called)
    state, _ = aot.step(state, batch)
    state, metrics = aot.step(state, batch)
    assert float(metrics["loss"]) == float(ref_metrics["loss"])
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(host_copy(state.params)), leaves(host_copy(ref_state.params))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError):  # another batch shape is not the compiled one: jit's path
        aot.step(state, partitioning.host_batch_to_global(fixed_batch(ref.config, n=16), mesh_2x4))


def test_params_and_optimizer_state_are_fsdp_sharded(trainer_2x4, mesh_2x4):
    state = trainer_2x4.init_state()
    kernel = state.params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]  # ('embed', 'mlp')
    assert isinstance(kernel.sharding, NamedSharding)
    assert kernel.sharding.mesh.shape == mesh_2x4.shape
    assert kernel.sharding.spec[0] == "fsdp"
    assert "fsdp" in jax.tree_util.tree_leaves(tuple(kernel.sharding.spec))
    assert kernel.shape == (32, 64)
    assert kernel.addressable_shards[0].data.shape == (32 // 4, 64)
    assert len({s.data.shape for s in kernel.addressable_shards}) == 1
    # Embedding ('vocab', 'embed'): sharded on its embed axis.
    emb = state.params["token_embed"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (256, 32 // 4)
    # Adam moments follow the params' sharding (ZeRO-3).
    mu = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")][0].mu
    mu_kernel = mu["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]
    assert mu_kernel.sharding.spec == kernel.sharding.spec
    assert mu_kernel.addressable_shards[0].data.shape == (8, 64)
    # Norm scales are replicated.
    scale = state.params["encoder"]["encoder_norm"]["scale"]
    assert scale.addressable_shards[0].data.shape == scale.shape


def _loss_and_grads(trainer, mesh, params_host, batch_host):
    """Loss + grads of the trainer's model on `mesh` (params placed with the trainer's logical specs)."""
    shardings = partitioning.logical_to_sharding(trainer.state_logical_specs.params, mesh, trainer.rules)
    params = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), params_host, shardings)
    batch = partitioning.host_batch_to_global(batch_host, mesh)

    def fn(p, b):
        logits = trainer.model.apply({"params": p}, b)
        return prefix_lm_loss(logits, b["target_tokens"])[0]

    with partitioning.activate(mesh, trainer.rules):
        loss, grads = jax.jit(jax.value_and_grad(fn))(params, batch)
    return float(loss), host_copy(grads), params


def test_sharded_loss_matches_single_device(trainer_2x4, mesh_2x4):
    params_host = host_copy(trainer_2x4.init_state().params)
    batch = fixed_batch(trainer_2x4.config, seed=3)
    single = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    ref_loss, ref_grads, _ = _loss_and_grads(trainer_2x4, single, params_host, batch)
    tensor_mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    for mesh in (mesh_2x4, tensor_mesh):
        loss, grads, placed = _loss_and_grads(trainer_2x4, mesh, params_host, batch)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(dict(mesh.shape)))
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
                               grads, ref_grads)
    # The tensor mesh really splits heads / mlp / vocab.
    wi = placed["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]  # ('embed', 'mlp') -> ('fsdp', 'tensor')
    assert wi.addressable_shards[0].data.shape == (32 // 2, 64 // 2)


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def data_mixture(dataset):
    return register_builtin(dataset)


def _train_iter(name, seed=0):
    return pipeline.make_train_iterator(name, global_batch_size=GLOBAL_BATCH, seed=seed, num_threads=1,
                                        prefetch_buffer_size=2)


def _assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_checkpoint_roundtrip_and_exact_resume(trainer_2x4, mesh_2x4, data_mixture, tmp_path):
    trainer = trainer_2x4
    it = _train_iter(data_mixture)
    state = trainer.init_state()
    for _ in range(2):
        state, _ = trainer.step(state, partitioning.host_batch_to_global(next(it), mesh_2x4))
    manager = checkpointing.make_manager(str(tmp_path), save_every=1, async_save=False)
    assert checkpointing.save(manager, 2, state, it)
    manager.wait_until_finished()
    assert manager.latest_step() == 2
    saved = host_copy(state)
    next_batch = next(it)

    # Restore into a fresh Trainer's abstract state and a fresh iterator.
    fresh = make_trainer(mesh_2x4)
    it2 = _train_iter(data_mixture)
    next(it2)  # advance it: restore must rewind it to the saved position
    restored, step = checkpointing.restore(manager, fresh.abstract_state, it2)
    assert step == 2
    _assert_trees_equal(host_copy(restored.params), saved.params)
    _assert_trees_equal(host_copy(restored.opt_state), saved.opt_state)
    assert int(restored.step) == 2
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(fresh.abstract_state)):
        assert a.sharding == b.sharding
    restored_batch = next(it2)
    assert restored_batch.keys() == next_batch.keys()
    for k in next_batch:
        np.testing.assert_array_equal(restored_batch[k], next_batch[k], err_msg=k)

    # One more step from the original and from the restored state: identical params.
    s_orig, m_orig = trainer.step(state, partitioning.host_batch_to_global(next_batch, mesh_2x4))
    s_rest, m_rest = trainer.step(restored, partitioning.host_batch_to_global(restored_batch, mesh_2x4))
    _assert_trees_equal(host_copy(s_rest.params), host_copy(s_orig.params))
    assert float(m_orig["loss"]) == float(m_rest["loss"])
    # Control: the step did change the params.
    assert not np.array_equal(host_copy(s_orig.params)["token_embed"]["embedding"],
                              saved.params["token_embed"]["embedding"])

    # Restore onto a different mesh (fsdp=2 x tensor=2 on 4 devices; data=8 on all 8).
    for mesh in (partitioning.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4]),
                 partitioning.make_mesh(data=8)):
        other = make_trainer(mesh)
        r, step = checkpointing.restore(manager, other.abstract_state, None)
        assert step == 2
        _assert_trees_equal(host_copy(r.params), saved.params)
        _assert_trees_equal(host_copy(r.opt_state), saved.opt_state)
        kernel = r.params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]
        assert kernel.sharding.mesh.shape == mesh.shape
        expected = (32 // mesh.shape["fsdp"], 64 // mesh.shape["tensor"])
        assert kernel.addressable_shards[0].data.shape == expected
    manager.close()


def test_cpu_saves_are_synchronous_and_an_async_save_survives_the_donating_step(tmp_path):
    """On CPU devices the default manager saves synchronously: orbax writes CPU arrays in place,
    so after an asynchronous save the next step could not donate the state and would allocate a
    second one. An asynchronous save (the accelerators' default) still writes the state as it was
    when saved, although the step right after it donates those buffers."""
    assert not checkpointing.make_manager(str(tmp_path / "default"))._options.enable_async_checkpointing  # pylint: disable=protected-access
    manager = checkpointing.make_manager(str(tmp_path / "async"), async_save=True)
    assert manager._options.enable_async_checkpointing  # pylint: disable=protected-access
    state = {"w": jnp.arange(1 << 22, dtype=jnp.float32), "step": jnp.int32(1)}
    saved = jax.tree.map(np.array, state)
    assert checkpointing.save(manager, 1, state, None)
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    state = jax.block_until_ready(step(state))
    manager.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, at = checkpointing.restore(manager, abstract, None)
    assert at == 1
    _assert_trees_equal(jax.tree.map(np.asarray, restored), saved)
    np.testing.assert_array_equal(np.asarray(state["w"]), saved["w"] + 1)
    manager.close()


def test_restore_without_checkpoint_returns_none(trainer_2x4, tmp_path):
    manager = checkpointing.make_manager(str(tmp_path), async_save=False)
    assert checkpointing.restore(manager, trainer_2x4.abstract_state, None) is None


# ----------------------------------------------------------------------------- train.train

def _ckpt_steps(ckpt_dir):
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _read_metrics(work_dir):
    with open(os.path.join(work_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _bind_train_gin(mixture, save_every):
    gin.bind_parameter("make_train_iterator.mixture_or_task_name", mixture)
    gin.bind_parameter("make_train_iterator.num_threads", 1)
    gin.bind_parameter("make_train_iterator.prefetch_buffer_size", 2)
    gin.bind_parameter("make_manager.save_every", save_every)
    gin.bind_parameter("make_manager.async_save", False)
    _bind_optimizer()


@pytest.mark.slow
def test_train_end_to_end_and_resume(dataset, data_mixture, mesh_2x4, tmp_path, clean_gin, caplog):
    _bind_train_gin(data_mixture, save_every=2)
    work_dir = str(tmp_path / "run")
    cfg = tiny_config()
    kw = dict(global_batch_size=GLOBAL_BATCH, mesh=mesh_2x4, model=cfg, log_every=1)
    caplog.set_level(logging.INFO, logger="simvlm_jax")

    out = train.train(work_dir, num_steps=3, **kw)
    assert out["step"] == 3
    assert np.isfinite(out["metrics"]["loss"])
    ckpt_dir = out["checkpoint_dir"]
    # Every 2 steps + the final step (orbax's manager also saves the first step of a fresh run).
    assert set(_ckpt_steps(ckpt_dir)) - {1} == {2, 3}
    assert [m["step"] for m in _read_metrics(work_dir)] == [1, 2, 3]
    assert os.path.exists(os.path.join(work_dir, "config.gin"))
    assert not any("Resumed" in r.getMessage() for r in caplog.records)
    params_3 = host_copy(out["state"].params)

    caplog.clear()
    out2 = train.train(work_dir, num_steps=5, **kw)
    assert out2["step"] == 5
    assert any("Resumed" in r.getMessage() and "step 3" in r.getMessage() for r in caplog.records)
    assert [m["step"] for m in _read_metrics(work_dir)] == [1, 2, 3, 4, 5]
    assert _ckpt_steps(ckpt_dir) == [3, 4, 5]  # keeps the last 3 (make_manager.keep)
    # The step-3 checkpoint it resumed from holds the first run's final params.
    manager = checkpointing.make_manager(work_dir, async_save=False)
    r3, _ = checkpointing.restore(manager, out2["trainer"].abstract_state, None, step=3)
    _assert_trees_equal(host_copy(r3.params), params_3)

    # Already at num_steps: nothing more to do.
    out3 = train.train(work_dir, num_steps=5, **kw)
    assert out3["step"] == 5
    assert len(_read_metrics(work_dir)) == 5


def test_train_rejects_indivisible_batch(mesh_2x4, tmp_path, clean_gin):
    with pytest.raises(ValueError, match="global_batch_size"):
        train.train(str(tmp_path), num_steps=1, global_batch_size=6, mesh=mesh_2x4,
                    model=tiny_config())


def _sigterm_at(step_to_signal):
    """An `eval_fn` hook that sends this process SIGTERM (a preemption) after step `step_to_signal`."""
    def eval_fn(params, step):
        if step == step_to_signal:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}
    return eval_fn


@pytest.mark.slow
def test_preemption_signal_saves_and_stops(data_mixture, mesh_2x4, tmp_path, clean_gin):
    _bind_train_gin(data_mixture, save_every=100)
    work_dir = str(tmp_path / "run")
    out = train.train(work_dir, num_steps=6, global_batch_size=GLOBAL_BATCH, mesh=mesh_2x4,
                      model=tiny_config(), log_every=100, eval_every=1, eval_fn=_sigterm_at(3))
    assert out["step"] == 3
    assert 3 in _ckpt_steps(out["checkpoint_dir"]) and max(_ckpt_steps(out["checkpoint_dir"])) == 3
    assert signal.getsignal(signal.SIGTERM) is not None  # the old handler is back


@pytest.mark.slow
def test_preemption_signal_on_a_checkpoint_step(data_mixture, mesh_2x4, tmp_path, clean_gin):
    _bind_train_gin(data_mixture, save_every=2)
    work_dir = str(tmp_path / "run")
    out = train.train(work_dir, num_steps=6, global_batch_size=GLOBAL_BATCH, mesh=mesh_2x4,
                      model=tiny_config(), log_every=100, eval_every=1, eval_fn=_sigterm_at(2))
    assert out["step"] == 2
    assert max(_ckpt_steps(out["checkpoint_dir"])) == 2


def test_loss_spike_detector_flags_and_logs_spikes(caplog):
    det = train.LossSpikeDetector(factor=2.0)
    flags = [det.update(s, l) for s, l in enumerate([4.0, 3.5, 3.0, 2.8, 9.0, 2.7, float("nan"), 2.6])]
    assert flags == [False, False, False, False, True, False, False, False]
    assert "Loss spike at step 4" in caplog.text
