"""Shared building blocks of the U-Net and the SpatialConfiguration-Net.

All arrays are channels last, ``(batch, x, y, z, channels)``. Parameters are float32; the compute
dtype (``dtype``) is float32 by default or bfloat16 on accelerators.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from verse_jax.models.winograd import winograd_conv3d

Initializer = Callable[..., jax.Array]

# TF1 ``variance_scaling(2.0, 'fan_in', 'truncated_normal')``: the reference's ``he_initializer``.
he_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

CONV_IMPLS = ("auto", "lax", "winograd")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    # The reference's LeakyReLU has alpha 0.1 (TF's default would be 0.2).
    "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.1),
    "linear": lambda x: x,
}


def head_init(stddev: float) -> Initializer:
    """Truncated normal (at +-2 stddev of the untruncated normal) for heatmap/output heads."""
    return nn.initializers.truncated_normal(stddev=stddev)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Activation function by name: 'relu', 'leaky_relu' (slope 0.1) or 'linear'."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def resolve_conv_impl(conv_impl: str, kernel_size: int) -> str:
    """Which convolution runs: 'lax' or 'winograd'.

    Winograd covers only 3x3x3 kernels; other sizes always use ``lax``. "auto" picks Winograd on the
    CPU backend (where XLA's direct convolution is slow) and ``lax`` elsewhere.
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if kernel_size != 3:
        return "lax"
    if conv_impl == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "lax"
    return conv_impl


class Conv3D(nn.Module):
    """3-D convolution, stride 1, SAME zero padding, with bias; ``nn.Conv`` parameter layout.

    Parameters: ``kernel`` (k, k, k, cin, cout) and ``bias`` (cout,), float32, so checkpoints are
    the same whichever implementation (``conv_impl``) runs.

    Attributes:
        features: number of output channels.
        kernel_size: edge length k of the cubic kernel.
        kernel_init: kernel initialiser (He truncated normal by default).
        bias_init: bias initialiser (zeros by default).
        conv_impl: "auto" (Winograd on CPU for 3x3x3, lax otherwise), "lax" or "winograd".
        dtype: compute dtype; inputs, kernel and bias are cast to it.
    """

    features: int
    kernel_size: int = 3
    kernel_init: Initializer = he_init
    bias_init: Initializer = nn.initializers.zeros_init()
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the convolution: x (batch, x, y, z, cin) -> (batch, x, y, z, features)."""
        k = self.kernel_size
        impl = resolve_conv_impl(self.conv_impl, k)
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, k, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if impl == "winograd":
            y = winograd_conv3d(x, kernel)
        else:
            y = lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, 1, 1),
                padding="SAME",
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            )
        return y + bias.astype(self.dtype).reshape((1, 1, 1, 1, -1))


class ConvBlock(nn.Module):
    """Two (conv 3x3x3 -> activation -> dropout) steps: one U-Net level half.

    Submodules are named ``conv0`` and ``conv1`` as in the reference. Dropout (inverted, rng
    collection "dropout") follows every conv and is off when ``train=False``.
    """

    features: int
    activation: str = "relu"
    dropout_ratio: float = 0.0
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x (batch, x, y, z, cin) -> (batch, x, y, z, features)."""
        act = get_activation(self.activation)
        for i in range(2):
            x = Conv3D(self.features, conv_impl=self.conv_impl, dtype=self.dtype, name=f"conv{i}")(
                x
            )
            x = act(x)
            if self.dropout_ratio > 0.0:
                x = nn.Dropout(self.dropout_ratio, deterministic=not train)(x)
        return x


def avg_pool(x: jax.Array, factor: int) -> jax.Array:
    """Average pooling with window = stride = ``factor`` on the three spatial axes.

    Args:
        x: (batch, x, y, z, c), spatial sizes divisible by ``factor`` (checked by the callers).

    Returns:
        (batch, x / factor, y / factor, z / factor, c), same dtype.
    """
    b, sx, sy, sz, c = x.shape
    f = factor
    x = x.reshape(b, sx // f, f, sy // f, f, sz // f, f, c)
    return jnp.mean(x, axis=(2, 4, 6), dtype=jnp.float32).astype(x.dtype)


def upsample(x: jax.Array, factor: int, method: str) -> jax.Array:
    """Resizes the spatial axes by an integer ``factor`` (half-pixel centres, edge renormalised).

    Args:
        x: (batch, x, y, z, c).
        factor: integer scale factor.
        method: 'linear' (trilinear, as TF's edge-clamped resize) or 'cubic' (Keys, a = -0.5).

    Returns:
        (batch, factor x, factor y, factor z, c) in the dtype of ``x``.
    """
    b, sx, sy, sz, c = x.shape
    y = jax.image.resize(x, (b, sx * factor, sy * factor, sz * factor, c), method=method)
    return y.astype(x.dtype)


def check_input(x: jax.Array, divisor: int, what: str) -> None:
    """Raises ValueError unless x is (batch, x, y, z, c) with spatial sizes divisible by divisor."""
    if x.ndim != 5:
        raise ValueError(f"{what}: input must be (batch, x, y, z, channels), got shape {x.shape}")
    bad = [s for s in x.shape[1:4] if s % divisor]
    if bad:
        raise ValueError(
            f"{what}: spatial sizes {tuple(x.shape[1:4])} must be divisible by {divisor}"
        )
