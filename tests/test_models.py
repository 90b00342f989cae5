"""Tests of the Linen networks: shapes, parameter counts, dropout, dtypes, conv implementations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from verse_jax.models import (
    Conv3D,
    SCNOutput,
    initial_sigmas,
    resolve_conv_impl,
    spine_localization_net,
    vertebrae_localization_net,
    vertebrae_segmentation_net,
)


def _num_params(net, shape):
    variables = jax.eval_shape(
        lambda: net.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False)
    )
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "factory, shape, expected",
    [
        (spine_localization_net, (1, 64, 64, 128, 1), 2_548_353),
        (vertebrae_localization_net, (1, 96, 96, 128, 1), 6_054_962),
        (vertebrae_segmentation_net, (1, 128, 128, 96, 2), 2_550_081),
    ],
)
def test_paper_presets_have_the_papers_parameter_counts(factory, shape, expected):
    assert _num_params(factory(), shape) == expected


def test_scn_with_t13_adds_two_heads_worth_of_parameters():
    n25 = _num_params(vertebrae_localization_net(25), (1, 96, 96, 128, 1))
    n26 = _num_params(vertebrae_localization_net(26), (1, 96, 96, 128, 1))
    # local_heatmaps (27 * 64 + 1), spatial_downsampled (343 * 64 + 1), sconv0 kernel 343 * 64.
    assert n26 - n25 == 27 * 64 + 1 + 343 * 64 + 1 + 343 * 64


def test_parameter_paths_read_like_the_reference():
    variables = jax.eval_shape(
        lambda: vertebrae_localization_net().init(
            jax.random.key(0), jnp.zeros((1, 96, 96, 128, 1)), train=False
        )
    )
    params = variables["params"]
    assert params["contracting_level0"]["conv0"]["kernel"].shape == (3, 3, 3, 64, 64)
    assert params["expanding_level0"]["conv0"]["kernel"].shape == (3, 3, 3, 128, 64)
    assert params["expanding_level3"]["conv0"]["kernel"].shape == (3, 3, 3, 64, 64)
    assert params["sconv0"]["kernel"].shape == (7, 7, 7, 25, 64)
    assert params["spatial_downsampled"]["bias"].shape == (25,)
    assert params["conv0"]["kernel"].dtype == jnp.float32


# Tiny networks, initialised once per test session (jitted, with the cheap-to-compile "rbg" key:
# threefry initialisation of many small kernels compiles for seconds on a 2-core machine).
TINY = {
    "spine": (spine_localization_net("tiny", conv_impl="lax"), 1, 1),
    "scn": (vertebrae_localization_net(5, "tiny", conv_impl="lax"), 1, 5),
    "seg": (vertebrae_segmentation_net("tiny", conv_impl="lax"), 2, 1),
}


@functools.cache
def _tiny_variables(name):
    net, cin, _ = TINY[name]
    x = jnp.zeros((1, 8, 8, 8, cin), jnp.float32)
    init = jax.jit(lambda key: net.init(key, x, train=False))
    return init(jax.random.key(0, impl="rbg"))


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_presets_output_shapes(name):
    # Shapes only (traced, not compiled): the other tests run each tiny network for real.
    net, cin, cout = TINY[name]
    x = jax.ShapeDtypeStruct((2, 16, 8, 24, cin), jnp.float32)
    out = jax.eval_shape(functools.partial(net.apply, train=False), _tiny_variables(name), x)
    outputs = out if isinstance(out, SCNOutput) else (out,)
    assert len(outputs) == (3 if name == "scn" else 1)
    for y in outputs:
        assert y.shape == (2, 16, 8, 24, cout)
        assert y.dtype == jnp.float32


def test_initialisation_matches_the_reference():
    params = _tiny_variables("spine")["params"]
    kernel = params["expanding_level0"]["conv0"]["kernel"]  # (3, 3, 3, 8, 4): fan_in = 27 * 8
    he_std = np.sqrt(2.0 / (27 * 8))
    assert abs(float(jnp.std(kernel)) - he_std) < 0.15 * he_std
    assert float(jnp.max(jnp.abs(kernel))) <= 2.0 * he_std / 0.87962566 + 1e-6
    head = params["output"]["kernel"]
    assert float(jnp.max(jnp.abs(head))) <= 0.002 / 0.87962566 + 1e-9
    assert float(jnp.std(head)) > 1e-4
    biases = [v for p, v in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "bias"]
    assert len(biases) == 13  # 3 levels x 2 blocks x 2 convs + head
    assert all(float(jnp.max(jnp.abs(b))) == 0.0 for b in biases)


def test_sizes_not_divisible_raise_value_error():
    net = spine_localization_net("tiny", conv_impl="lax")  # 3 levels: divisible by 4
    with pytest.raises(ValueError, match="divisible by 4"):
        net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 6, 1)), train=False)
    scn = vertebrae_localization_net(3, "tiny", conv_impl="lax", spatial_downsample=8)
    with pytest.raises(ValueError, match="divisible by 8"):
        scn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4, 1)), train=False)
    with pytest.raises(ValueError, match="preset"):
        spine_localization_net("huge")
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("fft", 3)


def test_dropout_on_in_training_and_off_otherwise():
    net = TINY["seg"][0]
    variables = _tiny_variables("seg")
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 2))
    train = jax.jit(lambda v, x, key: net.apply(v, x, train=True, rngs={"dropout": key}))
    a = train(variables, x, jax.random.key(2, impl="rbg"))
    b = train(variables, x, jax.random.key(3, impl="rbg"))
    c = net.apply(variables, x, train=False)
    d = net.apply(variables, x, train=False, rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(c, d)


def test_jitted_apply_compiles_once_for_repeated_shapes():
    net = TINY["spine"][0]
    variables = _tiny_variables("spine")
    traces = []

    @jax.jit
    def apply(variables, x):
        traces.append(1)
        return net.apply(variables, x, train=False)

    for i in range(3):
        apply(variables, jnp.full((1, 8, 8, 8, 1), float(i))).block_until_ready()
    assert len(traces) == 1


def test_bfloat16_compute_returns_float32():
    net, _, _ = TINY["scn"]
    variables = _tiny_variables("scn")
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 1))
    out = jax.jit(functools.partial(net.copy(dtype=jnp.bfloat16).apply, train=False))(variables, x)
    ref = jax.jit(functools.partial(net.apply, train=False))(variables, x)
    assert all(bool(jnp.all(jnp.isfinite(r))) for r in ref)
    np.testing.assert_allclose(ref.heatmaps, ref.local_heatmaps * ref.spatial_heatmaps, rtol=1e-6)
    assert float(jnp.max(jnp.abs(ref.spatial_heatmaps))) <= 1.0 + 1e-6  # tanh, cubic overshoot
    for y, r in zip(out, ref, strict=True):
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, r, atol=0.05 * float(jnp.max(jnp.abs(r))) + 1e-7)


def test_conv3d_lax_matches_a_direct_sum():
    x = jax.random.normal(jax.random.key(0), (1, 4, 5, 3, 2))
    conv = Conv3D(3, conv_impl="lax")
    params = conv.init(jax.random.key(1, impl="rbg"), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
    y = conv.apply(params, x)
    kernel = np.asarray(params["params"]["kernel"], np.float64)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((1, 4, 5, 3, 3)) + 0.1
    for i, j, k in np.ndindex(3, 3, 3):
        ref += xp[:, i : i + 4, j : j + 5, k : k + 3, :] @ kernel[i, j, k]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_auto_conv_impl_picks_winograd_on_cpu_for_3x3x3_only():
    expected = "winograd" if jax.default_backend() == "cpu" else "lax"
    assert resolve_conv_impl("auto", 3) == expected
    assert resolve_conv_impl("auto", 7) == "lax"
    assert resolve_conv_impl("winograd", 7) == "lax"


def test_auto_conv3d_matches_lax():
    pytest.importorskip("verse_jax.models.winograd")
    x = jax.random.normal(jax.random.key(0), (1, 8, 4, 8, 3))
    conv = Conv3D(5, conv_impl="lax")
    params = conv.init(jax.random.key(1, impl="rbg"), x)
    ref = conv.apply(params, x)
    impl = "auto" if jax.default_backend() == "cpu" else "winograd"  # both mean Winograd here
    y = jax.jit(conv.copy(conv_impl=impl).apply)(params, x)
    np.testing.assert_allclose(y, ref, atol=1e-4 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.slow
def test_winograd_and_lax_networks_agree():
    pytest.importorskip("verse_jax.models.winograd")
    net, _, _ = TINY["scn"]
    variables = _tiny_variables("scn")
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16, 1))
    ref = jax.jit(functools.partial(net.apply, train=False))(variables, x)
    impl = "auto" if jax.default_backend() == "cpu" else "winograd"  # both mean Winograd here
    out = jax.jit(functools.partial(net.copy(conv_impl=impl).apply, train=False))(variables, x)
    for y, r in zip(out, ref, strict=True):
        np.testing.assert_allclose(y, r, atol=1e-4 * float(jnp.max(jnp.abs(r))) + 1e-9)


def test_unet_gradients_are_finite_and_reach_the_first_layer():
    net = TINY["spine"][0]
    variables = _tiny_variables("spine")
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 1))
    target = jax.random.normal(jax.random.key(1), (1, 8, 8, 8, 1))

    @jax.jit
    def grad(variables):
        def loss(v):
            y = net.apply(v, x, train=True, rngs={"dropout": jax.random.key(2, impl="rbg")})
            return jnp.sum((y - target) ** 2)

        return jax.grad(loss)(variables)

    grads = grad(variables)["params"]
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.max(jnp.abs(grads["output"]["kernel"]))) > 0
    assert float(jnp.max(jnp.abs(grads["contracting_level0"]["conv0"]["kernel"]))) > 0


def test_initial_sigmas():
    sigmas = initial_sigmas(26)
    assert sigmas.shape == (26,) and sigmas.dtype == jnp.float32
    assert float(sigmas[0]) == 4.0
    with pytest.raises(ValueError):
        initial_sigmas(0)
