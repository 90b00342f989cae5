"""SpatialConfiguration-Net (stage 2, vertebrae localisation), as in the reference's VerSe 2019 net.

conv0 -> local-appearance U-Net -> ``local_heatmaps`` (3x3x3, linear); spatial-configuration branch:
average pooling by ``spatial_downsample`` -> ``sconv0..2`` (7x7x7, LeakyReLU 0.1) ->
``spatial_downsampled`` (7x7x7, tanh) -> cubic upsampling; ``heatmaps = local * spatial``.
Parameter paths: ``conv0``, ``contracting_level{l}/conv{i}``, ``expanding_level{l}/conv{i}``,
``local_heatmaps``, ``sconv{0,1,2}``, ``spatial_downsampled``. The learnable per-landmark sigmas are
not a Linen parameter: they live in the training state (``initial_sigmas``).
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from verse_jax.models.layers import (
    Conv3D,
    avg_pool,
    check_input,
    get_activation,
    head_init,
    upsample,
)
from verse_jax.models.unet import preset_kwargs, unet_body


class SCNOutput(NamedTuple):
    """SCN outputs, each (batch, x, y, z, num_landmarks) float32."""

    heatmaps: jax.Array
    local_heatmaps: jax.Array
    spatial_heatmaps: jax.Array


class SpatialConfigurationNet(nn.Module):
    """SpatialConfiguration-Net.

    Attributes:
        num_landmarks: heatmap channels (25 for VerSe 2019, 26 with T13).
        num_filters_base: filters of conv0, the local U-Net and sconv0..2 (64).
        num_levels: levels of the local U-Net (4).
        activation: activation of all convs except the heads ('leaky_relu', slope 0.1).
        dropout_ratio: dropout after every conv of the local U-Net (0.5); none elsewhere.
        spatial_downsample: pooling factor of the spatial-configuration branch (4).
        spatial_kernel_size: kernel edge of the branch's convs (7).
        head_init_std: stddev of the truncated normal init of both heads (0.001).
        dtype: compute dtype; parameters and outputs are float32.
        conv_impl: "auto" | "lax" | "winograd" (Winograd only ever for the 3x3x3 convs).
    """

    num_landmarks: int = 25
    num_filters_base: int = 64
    num_levels: int = 4
    activation: str = "leaky_relu"
    dropout_ratio: float = 0.5
    spatial_downsample: int = 4
    spatial_kernel_size: int = 7
    head_init_std: float = 0.001
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> SCNOutput:
        """Applies the network.

        Args:
            x: (batch, x, y, z, channels) image; spatial sizes divisible by 2^(num_levels - 1) and
                by spatial_downsample.
            train: enables dropout (needs the "dropout" rng).

        Returns:
            SCNOutput of three (batch, x, y, z, num_landmarks) float32 arrays.
        """
        if self.num_levels < 1 or self.spatial_downsample < 1:
            raise ValueError(
                "SpatialConfigurationNet: num_levels and spatial_downsample must be >= 1, got "
                f"{self.num_levels} and {self.spatial_downsample}"
            )
        divisor = math.lcm(2 ** (self.num_levels - 1), self.spatial_downsample)
        check_input(x, divisor, type(self).__name__)
        act = get_activation(self.activation)
        conv = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        node = act(Conv3D(self.num_filters_base, **conv, name="conv0")(x))
        node = unet_body(
            node,
            num_levels=self.num_levels,
            num_filters_base=self.num_filters_base,
            activation=self.activation,
            dropout_ratio=self.dropout_ratio,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            train=train,
        )
        heads = dict(kernel_init=head_init(self.head_init_std), **conv)
        local = Conv3D(self.num_landmarks, **heads, name="local_heatmaps")(node)
        node = avg_pool(local, self.spatial_downsample)
        k = self.spatial_kernel_size
        for i in range(3):
            node = act(Conv3D(self.num_filters_base, k, **conv, name=f"sconv{i}")(node))
        node = Conv3D(self.num_landmarks, k, **heads, name="spatial_downsampled")(node)
        spatial = upsample(jnp.tanh(node), self.spatial_downsample, "cubic")
        heatmaps = local * spatial
        return SCNOutput(
            heatmaps=heatmaps.astype(jnp.float32),
            local_heatmaps=local.astype(jnp.float32),
            spatial_heatmaps=spatial.astype(jnp.float32),
        )


def initial_sigmas(num_landmarks: int, value: float = 4.0) -> jax.Array:
    """Initial learnable heatmap sigmas in voxels, (num_landmarks,) float32; 4 in the paper."""
    if num_landmarks < 1 or value <= 0:
        raise ValueError(f"need num_landmarks >= 1 and value > 0, got {num_landmarks}, {value}")
    return jnp.full((num_landmarks,), value, jnp.float32)


SCN_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(num_filters_base=64, num_levels=4, dropout_ratio=0.5, spatial_downsample=4),
    # Crops around 32 x 32 x 64 voxels on a laptop CPU; light dropout so a small net learns fast.
    "demo": dict(num_filters_base=16, num_levels=3, dropout_ratio=0.1, spatial_downsample=4),
    "tiny": dict(num_filters_base=4, num_levels=2, dropout_ratio=0.5, spatial_downsample=4),
}


def vertebrae_localization_net(
    num_landmarks: int = 25, preset: str = "paper", **overrides: Any
) -> SpatialConfigurationNet:
    """Stage 2 SCN: 1 input channel (CT at 2 mm) -> num_landmarks heatmaps (25, or 26 with T13).

    Paper preset: 4-level local U-Net, 64 filters, dropout 0.5, spatial_downsample 4; 6,054,962
    parameters for 25 landmarks (plus 25 sigmas kept outside the Linen parameters).
    """
    kwargs = preset_kwargs(SCN_PRESETS, preset, overrides)
    return SpatialConfigurationNet(**{"num_landmarks": num_landmarks, **kwargs})
