"""3-D U-Net ("UnetClassicAvgLinear3d" of the reference) and the stage 1 and 3 networks.

Per level: two (conv 3x3x3 -> activation -> dropout) on the way down, average pooling 2x2x2, and on
the way up trilinear x2 upsampling, concatenation ``[skip, upsampled]`` (skip first) and two more
convs. The deepest level runs its contracting and expanding blocks back to back (4 convs). The same
number of filters at every level. Parameter paths: ``contracting_level{l}/conv{0,1}``,
``expanding_level{l}/conv{0,1}``, ``output`` (reference: ``contracting/level{l}/conv{i}``, ...).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from verse_jax.models.layers import Conv3D, ConvBlock, avg_pool, check_input, head_init, upsample


def unet_body(
    x: jax.Array,
    *,
    num_levels: int,
    num_filters_base: int,
    activation: str,
    dropout_ratio: float,
    conv_impl: str,
    dtype: Any,
    train: bool,
) -> jax.Array:
    """Contracting and expanding path; call inside a compact method (submodules join the caller).

    Args:
        x: (batch, x, y, z, c), spatial sizes divisible by 2^(num_levels - 1).

    Returns:
        (batch, x, y, z, num_filters_base) features of the last expanding conv (after dropout).
    """
    block = dict(
        features=num_filters_base,
        activation=activation,
        dropout_ratio=dropout_ratio,
        conv_impl=conv_impl,
        dtype=dtype,
    )
    skips = []
    for level in range(num_levels):
        x = ConvBlock(**block, name=f"contracting_level{level}")(x, train=train)
        if level < num_levels - 1:
            skips.append(x)
            x = avg_pool(x, 2)
    for level in reversed(range(num_levels)):
        if level < num_levels - 1:
            x = jnp.concatenate([skips[level], upsample(x, 2, "linear")], axis=-1)
        x = ConvBlock(**block, name=f"expanding_level{level}")(x, train=train)
    return x


class UNet3D(nn.Module):
    """U-Net with a 3x3x3 linear output head (stage 1 spine localisation, stage 3 segmentation).

    Attributes:
        num_levels: number of resolution levels (5 in the paper).
        num_filters_base: filters of every conv (64 in the paper).
        activation: 'relu' (paper) or 'leaky_relu' (slope 0.1).
        dropout_ratio: dropout rate after every conv (0.5 spine, 0.25 segmentation).
        num_outputs: output channels of the head.
        head_init_std: stddev of the head's truncated normal kernel init (0.001).
        dtype: compute dtype; parameters stay float32 and the output is float32.
        conv_impl: "auto" | "lax" | "winograd" (see ``layers.resolve_conv_impl``).
    """

    num_levels: int = 5
    num_filters_base: int = 64
    activation: str = "relu"
    dropout_ratio: float = 0.5
    num_outputs: int = 1
    head_init_std: float = 0.001
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Applies the network.

        Args:
            x: (batch, x, y, z, channels) image, spatial sizes divisible by 2^(num_levels - 1).
            train: enables dropout (needs the "dropout" rng).

        Returns:
            (batch, x, y, z, num_outputs) float32, linear (heatmap or logits).
        """
        if self.num_levels < 1:
            raise ValueError(f"UNet3D: num_levels must be >= 1, got {self.num_levels}")
        check_input(x, 2 ** (self.num_levels - 1), type(self).__name__)
        features = unet_body(
            x,
            num_levels=self.num_levels,
            num_filters_base=self.num_filters_base,
            activation=self.activation,
            dropout_ratio=self.dropout_ratio,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            train=train,
        )
        head = Conv3D(
            self.num_outputs,
            kernel_init=head_init(self.head_init_std),
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="output",
        )
        return head(features).astype(jnp.float32)


SPINE_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(num_levels=5, num_filters_base=64, dropout_ratio=0.5),
    # Crops around 32 x 32 x 64 voxels on a laptop CPU; light dropout so a small net learns fast.
    "demo": dict(num_levels=4, num_filters_base=16, dropout_ratio=0.1),
    "tiny": dict(num_levels=3, num_filters_base=4, dropout_ratio=0.5),
}

SEGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(num_levels=5, num_filters_base=64, dropout_ratio=0.25),
    "demo": dict(num_levels=4, num_filters_base=16, dropout_ratio=0.1),
    "tiny": dict(num_levels=3, num_filters_base=4, dropout_ratio=0.25),
}


def preset_kwargs(presets: dict[str, dict[str, Any]], preset: str, overrides: dict) -> dict:
    """The preset's fields updated by ``overrides``; ValueError for an unknown preset."""
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    return {**presets[preset], **overrides}


def spine_localization_net(preset: str = "paper", **overrides: Any) -> UNet3D:
    """Stage 1 U-Net: 1 input channel (CT at 8 mm) -> 1 spine heatmap channel.

    Paper preset: 5 levels, 64 filters, ReLU, dropout 0.5; 2,548,353 parameters.
    """
    kwargs = preset_kwargs(SPINE_PRESETS, preset, overrides)
    return UNet3D(**{"activation": "relu", "num_outputs": 1, **kwargs})


def vertebrae_segmentation_net(preset: str = "paper", **overrides: Any) -> UNet3D:
    """Stage 3 U-Net: 2 input channels (CT at 1 mm, centroid Gaussian) -> 1 logit channel.

    Paper preset: 5 levels, 64 filters, ReLU, dropout 0.25; 2,550,081 parameters.
    """
    kwargs = preset_kwargs(SEGMENTATION_PRESETS, preset, overrides)
    return UNet3D(**{"activation": "relu", "num_outputs": 1, **kwargs})
