"""Training library: TF schedule, pure steps, stage losses, fit, checkpoints, sharding."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from verse_jax import heatmaps
from verse_jax.models import SCNOutput
from verse_jax.train import checkpoint, losses, sharding, stage_losses
from verse_jax.train import loop as train_loop
from verse_jax.train import state as train_state


def _toy_loss(params, sigmas, batch, rng):
    pred = batch["x"] @ params["w"] + 1e-3 * jax.random.normal(rng, ())
    loss = jnp.mean((pred - batch["y"]) ** 2) + jnp.sum(sigmas**2)
    return loss, {"mse": loss}


def _toy_dataset():
    def make(i):
        x = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3) * (i % 7)
        return {"x": x, "y": np.ones((2, 2), np.float32)}

    return grain.MapDataset.range(50).shuffle(seed=1).repeat().map(make).to_iter_dataset()


def _toy_run(workdir, num_steps, *, checkpoint_every=2, log_every=1, bad_step=None):
    """Trains the toy model to `num_steps`, resuming from `workdir` when it holds a checkpoint."""
    optimizer = optax.adam(train_state.piecewise_constant_tf(0.1, (2,), (0.5,)))
    mesh = sharding.make_mesh()
    init = lambda: train_state.TrainState.create({"w": jnp.ones((3, 2))}, optimizer, jnp.ones(2))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
    it = iter(_toy_dataset())
    if ckpt.latest_step() is not None:
        state = ckpt.restore(sharding.abstract_like(jax.eval_shape(init), mesh), it)
    else:
        state = sharding.replicate(init(), mesh)
    step = jax.jit(train_state.make_train_step(_toy_loss, optimizer), donate_argnums=0)
    writer = train_loop.MetricWriter(
        workdir, total_steps=num_steps, start_step=int(state.step), progress=False
    )

    def batches():
        for i, b in enumerate(it, start=int(state.step) + 1):
            if i == bad_step:
                b = {**b, "x": np.full_like(b["x"], np.nan)}
            yield sharding.shard_batch(b, mesh)

    try:
        return train_loop.fit(
            state,
            step,
            batches(),
            rng=jax.random.key(0),
            loop=train_loop.LoopSchedule(num_steps, log_every, checkpoint_every=checkpoint_every),
            writer=writer,
            save=lambda s: ckpt.save(s, it),
        )
    finally:
        writer.close()
        ckpt.close()


def test_piecewise_schedule_switches_after_boundary_like_tf():
    schedule = train_state.piecewise_constant_tf(1e-4, (10, 15), (0.5, 0.1))
    lrs = np.asarray([schedule(s) for s in (0, 10, 11, 15, 16, 100)])
    np.testing.assert_allclose(lrs, [1e-4, 1e-4, 5e-5, 5e-5, 1e-5, 1e-5], rtol=1e-6)
    with pytest.raises(ValueError, match="one scale per boundary"):
        train_state.piecewise_constant_tf(1.0, (10,), (0.5, 0.1))


def test_resume_equals_uninterrupted_run_bitwise(tmp_path):
    straight = _toy_run(tmp_path / "a", 5)
    _toy_run(tmp_path / "b", 3)  # "killed" after step 3 (checkpoint at 2: step 3 is redone)
    resumed = _toy_run(tmp_path / "b", 5)
    assert int(resumed.step) == 5
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    records = [
        json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_nonfinite_loss_stops_and_names_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match="at step 3"):
        _toy_run(tmp_path, 6, checkpoint_every=1, log_every=10, bad_step=3)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["1", "2"]  # the NaN update of step 3 never reached a checkpoint


def test_batch_size_must_split_over_devices():
    mesh = sharding.make_mesh()
    assert sharding.check_batch_size(mesh.size * 2, mesh) == mesh.size * 2
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        sharding.check_batch_size(0, mesh)


def _batch(stage, shape=(16, 16, 16), batch=1, num_landmarks=4):
    rng = np.random.default_rng(0)
    b = {"image": rng.normal(size=(batch, *shape, 2 if stage == "seg" else 1)).astype(np.float32)}
    if stage == "seg":
        b["label"] = (rng.random((batch, *shape, 1)) > 0.5).astype(np.float32)
        return b
    b["landmarks_vox"] = rng.uniform(2, 14, size=(batch, num_landmarks, 3)).astype(np.float32)
    b["valid"] = np.arange(num_landmarks)[None].repeat(batch, 0) != 1
    if stage == "scn":
        b["mask"] = np.ones((batch, *shape, 1), np.float32)
    return b


def _init(model, x):
    return jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))["params"]


def test_spine_and_seg_losses_are_the_documented_sums():
    params = {"conv": {"kernel": jnp.full((3, 3, 3, 1, 2), 0.5), "bias": jnp.ones(2)}}
    zeros = lambda variables, x, **kw: jnp.zeros((*x.shape[:4], 1))
    b = _batch("spine")
    spine_loss = jax.jit(stage_losses.make_spine_loss(zeros, weight_decay=0.1))
    loss, metrics = spine_loss(params, None, b, None)
    target = heatmaps.spine_heatmap(b["landmarks_vox"][0], b["valid"][0], (16, 16, 16))
    expected = 0.5 * jnp.sum(target**2) + 0.1 * 0.5 * 54 * 0.25
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert set(metrics) == {"loss_heatmap", "loss_reg"}
    b = _batch("seg")
    loss, _ = jax.jit(stage_losses.make_seg_loss(zeros, weight_decay=0.0))(params, None, b, None)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)


class _ConvHeatmaps(nn.Module):
    """Stand-in for the SCN in loss tests: one 3x3x3 conv, output as SCNOutput."""

    num_landmarks: int = 4

    @nn.compact
    def __call__(self, x, *, train):
        y = nn.Conv(self.num_landmarks, (3, 3, 3))(x)
        y = nn.Dropout(0.5, deterministic=not train)(y)
        return SCNOutput(heatmaps=y, local_heatmaps=y, spatial_heatmaps=y)


def test_scn_loss_builds_targets_from_sigmas_and_reaches_them():
    model = _ConvHeatmaps()
    b = _batch("scn")
    params = _init(model, b["image"])
    loss_fn = stage_losses.make_scn_loss(model.apply)
    sigmas = jnp.full((4,), 4.0)
    grad = jax.jit(jax.grad(lambda s: loss_fn(params, s, b, jax.random.key(1))[0]))(sigmas)
    assert bool(jnp.all(jnp.isfinite(grad)))
    # Landmark 1 is invalid: no target, no regulariser, so exactly no gradient.
    assert float(grad[1]) == 0.0 and float(jnp.abs(grad[jnp.array([0, 2, 3])]).min()) > 0
    # With a zero prediction the data term is exactly the target energy; sigma term 100/2 * 3*16.
    zeros = lambda variables, x, **kw: SCNOutput(*(jnp.zeros((*x.shape[:4], 4)),) * 3)
    loss, m = jax.jit(stage_losses.make_scn_loss(zeros, weight_decay=0.0))(params, sigmas, b, None)
    target = heatmaps.gaussian_heatmaps(b["landmarks_vox"][0], b["valid"][0], sigmas, (16,) * 3)
    np.testing.assert_allclose(m["loss_heatmap"], 0.5 * jnp.sum(target**2), rtol=1e-5)
    np.testing.assert_allclose(m["loss_sigmas"], losses.sigma_regularizer(sigmas, b["valid"][0]))
    np.testing.assert_allclose(m["loss_sigmas"], 100 * 0.5 * 3 * 16.0)
    np.testing.assert_allclose(loss, m["loss_heatmap"] + m["loss_sigmas"], rtol=1e-6)


def test_train_step_is_pure_and_folds_the_step_into_the_rng():
    model = _ConvHeatmaps()
    b = _batch("scn")
    optimizer = optax.adam(1e-3)
    step = jax.jit(train_state.make_train_step(stage_losses.make_scn_loss(model.apply), optimizer))
    state = train_state.TrainState.create(_init(model, b["image"]), optimizer, jnp.full((4,), 4.0))
    s1, m1 = step(state, b, jax.random.key(2))
    s1b, m1b = step(state, b, jax.random.key(2))
    assert int(s1.step) == 1 and float(m1["loss"]) == float(m1b["loss"])
    assert float(s1.sigmas[0]) != 4.0 and float(s1.sigmas[1]) == 4.0  # invalid: untouched
    _, m2 = step(s1, b, jax.random.key(2))
    assert set(m1) == {"loss", "loss_heatmap", "loss_sigmas", "loss_reg", "sigma_mean", "grad_norm"}
    assert float(m2["loss"]) != float(m1["loss"])


_SHARDED = textwrap.dedent(
    """
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
    from verse_jax.train import loop as train_loop
    from verse_jax.train import sharding
    from verse_jax.train import stage_losses
    from verse_jax.train import state as train_state
    from verse_jax.models import SCNOutput
    assert jax.device_count() == 8
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            y = nn.Dropout(0.5, deterministic=not train)(nn.Conv(4, (3, 3, 3))(x))
            return SCNOutput(y, y, y)
    model = Net()
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 16, 16, 16, 1)).astype(np.float32),
        "landmarks_vox": rng.uniform(2, 14, size=(8, 4, 3)).astype(np.float32),
        "valid": rng.random((8, 4)) > 0.3,
        "mask": np.ones((8, 16, 16, 16, 1), np.float32),
    }
    optimizer = optax.sgd(1e-6, momentum=0.9, nesterov=True)
    init = jax.jit(lambda k: model.init(k, batch["image"][:1], train=False))
    params = jax.device_get(init(jax.random.key(0))["params"])
    step = train_state.make_train_step(stage_losses.make_scn_loss(model.apply), optimizer)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(devices)
        state = sharding.replicate(
            train_state.TrainState.create(params, optimizer, np.full((4,), 4.0, np.float32)), mesh)
        sharded = sharding.shard_batch(batch, mesh)
        assert len(sharded["image"].sharding.device_set) == len(devices)
        jitted = jax.jit(step, donate_argnums=0)
        for _ in range(2):
            state, metrics = jitted(state, sharded, jax.random.key(1))
        results.append((jax.device_get(state), float(metrics["loss"])))
    (one, loss1), (eight, loss8) = results
    np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    try:
        sharding.check_batch_size(4, sharding.make_mesh())
    except ValueError as e:
        assert "multiple of the number of devices (8)" in str(e)
    else:
        raise AssertionError("batch 4 on 8 devices was accepted")
    print("SHARDED-OK")
    """
)


def test_sharded_step_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED-OK" in out.stdout


def test_metric_writer_drops_records_after_the_resume_step(tmp_path):
    writer = train_loop.MetricWriter(tmp_path, total_steps=4, progress=False)
    for s in (1, 2, 3):
        writer.write_train(s, {"loss": float(s)})
    writer.write_eval(3, {"id_rate": float("nan")})
    writer.close()
    writer = train_loop.MetricWriter(tmp_path, total_steps=4, start_step=2, progress=False)
    writer.write_train(3, {"loss": 30.0})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"], r["loss"]) for r in records] == [
        (1, "train", 1.0),
        (2, "train", 2.0),
        (3, "train", 30.0),
    ]
