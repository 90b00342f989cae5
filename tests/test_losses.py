"""Tests of the loss terms on hand-computed inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from verse_jax.train.losses import (
    heatmap_l2,
    sigma_regularizer,
    sigmoid_cross_entropy,
    weight_decay,
)


def test_heatmap_l2_is_half_the_sum_of_squares():
    pred = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    target = jnp.array([[0.0, 2.0], [1.0, 1.0]])
    assert float(heatmap_l2(pred, target)) == 0.5 * (1 + 0 + 4 + 9)


def test_heatmap_l2_mask_broadcasts_over_channels():
    pred = jnp.ones((1, 2, 1, 1, 3))
    target = jnp.zeros((1, 2, 1, 1, 3))
    mask = jnp.array([1.0, 0.0]).reshape(1, 2, 1, 1, 1)
    assert float(heatmap_l2(pred, target, mask)) == 0.5 * 3
    with pytest.raises(ValueError, match="rank"):
        heatmap_l2(pred, target, jnp.ones((2, 1, 1, 1)))
    with pytest.raises(ValueError, match="shapes differ"):
        heatmap_l2(pred, target[..., :2])


def test_heatmap_l2_channel_weights_scale_each_channels_sum():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 3, 2, 4, 3)).astype(np.float32)
    target = rng.normal(size=pred.shape).astype(np.float32)
    mask = (rng.random((2, 3, 2, 4, 1)) > 0.3).astype(np.float32)
    weights = np.array([1.0, 2.5, 0.0], np.float32)
    diff = (pred.astype(np.float64) - target) * mask
    expected = 0.5 * sum(weights[k] * np.sum(diff[..., k] ** 2) for k in range(3))
    got = heatmap_l2(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), weights)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    ones = heatmap_l2(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), np.ones(3))
    plain = heatmap_l2(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_allclose(float(ones), float(plain), rtol=1e-6)
    with pytest.raises(ValueError, match="channel_weights"):
        heatmap_l2(jnp.asarray(pred), jnp.asarray(target), None, np.ones(2))


def test_sigma_regularizer_counts_valid_landmarks_only():
    sigmas = jnp.array([2.0, 3.0, 4.0])
    valid = jnp.array([True, False, True])
    assert float(sigma_regularizer(sigmas, valid)) == 100.0 * 0.5 * (4 + 16)
    batch_valid = jnp.array([[True, False, True], [False, True, False]])
    assert float(sigma_regularizer(sigmas, batch_valid, weight=1.0)) == 0.5 * (4 + 16 + 9)
    grad = jax.grad(sigma_regularizer)(sigmas, valid)
    np.testing.assert_allclose(grad, [200.0, 0.0, 400.0])


def test_weight_decay_uses_kernels_only():
    params = {
        "params": {
            "conv0": {"kernel": jnp.full((3, 3, 3, 1, 2), 1.0), "bias": jnp.full((2,), 10.0)},
            "block": {"conv1": {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.ones((2,))}},
        },
        "sigmas": jnp.full((25,), 4.0),
    }
    assert float(weight_decay(params, 0.1)) == pytest.approx(0.1 * 0.5 * (54 + 25))
    assert float(weight_decay(params["params"], 1.0)) == pytest.approx(0.5 * 79)
    grads = jax.grad(weight_decay)(params, 1.0)
    assert float(jnp.sum(jnp.abs(grads["params"]["conv0"]["bias"]))) == 0.0
    assert float(jnp.sum(jnp.abs(grads["sigmas"]))) == 0.0


def test_sigmoid_cross_entropy_matches_the_definition():
    logits = jnp.array([0.0, 2.0, -3.0, 50.0, -50.0])
    labels = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0])
    x, z = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    # -z log(sigmoid(x)) - (1 - z) log(1 - sigmoid(x)), written without overflow.
    expected = np.mean(z * np.logaddexp(0.0, -x) + (1 - z) * np.logaddexp(0.0, x))
    assert float(sigmoid_cross_entropy(logits, labels)) == pytest.approx(expected, rel=1e-5)
    assert float(sigmoid_cross_entropy(jnp.zeros(4), jnp.ones(4))) == pytest.approx(np.log(2))
