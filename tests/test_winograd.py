"""Winograd 3x3x3 convolution against lax.conv: forward and gradients, odd and even sizes."""

import json
import pathlib
import subprocess
import sys

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


# Odd and even sizes, batch 2, several slabs per call (a loop for both tiles); one voxel, 1 -> 8.
CASES = [((2, 9, 17, 20), 2, 3), ((1, 1, 2, 1), 1, 8)]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize(("shape", "cin", "cout"), CASES)
def test_forward_matches_lax_conv(tile, shape, cin, cout):
    x, kernel = _random(0, shape, cin, cout)
    y = jax.jit(winograd_conv3d, static_argnames="tile")(x, kernel, tile=tile)
    reference = _lax_conv(x, kernel)
    assert y.shape == reference.shape
    assert y.dtype == jnp.float32
    assert _relative_error(y, reference) < TOLERANCE[tile]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize(("shape", "cin", "cout"), CASES[:1])
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


def _random_like(seed, shapes):
    """Random normal leaves scaled by 1 / sqrt(fan_in), from numpy (jitted init compiles slowly)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(
            rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype
        ),
        shapes,
    )


def _scn_outputs_agree(preset, size, tolerance):
    models = pytest.importorskip("verse_jax.models")
    x = jax.random.uniform(jax.random.key(3), (1, *size, 1), jnp.float32, -1.0, 1.0)
    lax_net = models.vertebrae_localization_net(preset=preset, conv_impl="lax")
    wino_net = models.vertebrae_localization_net(preset=preset, conv_impl="winograd")
    shapes = jax.eval_shape(lambda: lax_net.init(jax.random.key(4), x, train=False))
    params = _random_like(4, shapes)
    reference = jax.jit(lambda p, x: lax_net.apply(p, x, train=False))(params, x)
    got = jax.jit(lambda p, x: wino_net.apply(p, x, train=False))(params, x)
    for name in ("heatmaps", "local_heatmaps", "spatial_heatmaps"):
        assert _relative_error(getattr(got, name), getattr(reference, name)) < tolerance, name


def test_tiny_scn_winograd_matches_lax():
    _scn_outputs_agree("tiny", (8, 8, 8), TOLERANCE[4])


@pytest.mark.slow
def test_paper_scn_winograd_matches_lax_on_small_crop():
    _scn_outputs_agree("paper", (32, 32, 32), TOLERANCE[4])


@pytest.mark.slow
def test_conv_speed_benchmark_quick_runs(tmp_path):
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "conv_speed.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], check=True)
    (result,) = tmp_path.glob("conv_speed-cpu-*-quick.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["contender"] for r in rows} >= {"lax", "wino_f2", "wino_f4"}
    assert all(r["median_s"] > 0 for r in rows)
