"""Linen networks of the three stages: ``UNet3D`` and ``SpatialConfigurationNet``, with presets.

Inputs are ``(batch, x, y, z, channels)``; dropout uses the rng collection "dropout". ``registry``
builds a stage's network from its definition (``StageNetwork``: what the predictors take).
"""

from verse_jax.models.layers import Conv3D, ConvBlock, resolve_conv_impl
from verse_jax.models.scn import (
    SCNOutput,
    SpatialConfigurationNet,
    initial_sigmas,
    vertebrae_localization_net,
)
from verse_jax.models.unet import UNet3D, spine_localization_net, vertebrae_segmentation_net

__all__ = [
    "Conv3D",
    "ConvBlock",
    "SCNOutput",
    "SpatialConfigurationNet",
    "UNet3D",
    "initial_sigmas",
    "resolve_conv_impl",
    "spine_localization_net",
    "vertebrae_localization_net",
    "vertebrae_segmentation_net",
]
