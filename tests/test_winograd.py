"""Winograd 3x3x3 convolution against lax.conv: forward and gradients, odd and even sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from verse_jax.models.winograd import transform_matrices, winograd_conv3d

TOLERANCE = {2: 1e-6, 4: 1e-4}  # error relative to the largest reference magnitude


def _lax_conv(x, kernel):
    return lax.conv_general_dilated(
        x,
        kernel,
        (1, 1, 1),
        "SAME",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=lax.Precision.HIGHEST,
    )


def _random(seed, shape, cin, cout):
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape + (cin,), jnp.float32)
    kernel = jax.random.normal(kk, (3, 3, 3, cin, cout), jnp.float32) / np.sqrt(27 * cin)
    return x, kernel


def _relative_error(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("tile", [2, 4])
def test_one_dimensional_transforms_are_exact(tile):
    bt, g, at = transform_matrices(tile)
    rng = np.random.default_rng(tile)
    d, taps = rng.standard_normal(tile + 2), rng.standard_normal(3)
    expected = np.array([d[i : i + 3] @ taps for i in range(tile)])
    np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize(
    ("shape", "cin", "cout"),
    [((1, 8, 8, 8), 4, 4), ((2, 7, 9, 10), 3, 5), ((1, 1, 1, 1), 1, 2), ((1, 13, 6, 5), 1, 8)],
)
def test_forward_matches_lax_conv(tile, shape, cin, cout):
    x, kernel = _random(0, shape, cin, cout)
    y = jax.jit(winograd_conv3d, static_argnames="tile")(x, kernel, tile=tile)
    reference = _lax_conv(x, kernel)
    assert y.shape == reference.shape
    assert y.dtype == jnp.float32
    assert _relative_error(y, reference) < TOLERANCE[tile]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize(("shape", "cin", "cout"), [((1, 8, 6, 8), 3, 4), ((2, 5, 7, 9), 2, 3)])
def test_gradients_match_lax_conv(tile, shape, cin, cout):
    x, kernel = _random(1, shape, cin, cout)
    cotangent = jax.random.normal(jax.random.key(2), shape + (cout,), jnp.float32)

    def loss(conv):
        return lambda x, k: jnp.sum(conv(x, k) * cotangent)

    wino = jax.jit(jax.grad(loss(lambda x, k: winograd_conv3d(x, k, tile=tile)), argnums=(0, 1)))
    ref = jax.jit(jax.grad(loss(_lax_conv), argnums=(0, 1)))
    for got, expected in zip(wino(x, kernel), ref(x, kernel), strict=True):
        assert got.shape == expected.shape
        assert _relative_error(got, expected) < TOLERANCE[tile]


def test_bad_arguments_raise():
    x, kernel = _random(0, (1, 4, 4, 4), 2, 2)
    with pytest.raises(ValueError, match="tile"):
        winograd_conv3d(x, kernel, tile=3)
    with pytest.raises(ValueError, match="channels"):
        winograd_conv3d(x, kernel[:, :, :, :1], tile=2)
    with pytest.raises(ValueError, match="kernel"):
        winograd_conv3d(x, kernel[:2], tile=2)
    with pytest.raises(ValueError, match="shape"):
        winograd_conv3d(x[0], kernel, tile=2)
