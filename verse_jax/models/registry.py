"""Networks from stage definitions: the factory registry and a stage's network with its params.

A stage definition (``stages.StageSpec``) names its network factory; :func:`build_model` builds
the Linen module from that name and the factory's keyword arguments. :class:`StageNetwork` is
what the predictors take: the module, its parameters and the stage definition, with jitted apply
functions shared by every network of the same config. Training validation builds one from the
current parameters, ``infer.bundle`` from a stage export.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from verse_jax.models.scn import vertebrae_localization_net
from verse_jax.models.unet import spine_localization_net, vertebrae_segmentation_net
from verse_jax.stages import StageGrid, StageSpec

FACTORIES = {
    "spine_localization_net": spine_localization_net,
    "vertebrae_localization_net": vertebrae_localization_net,
    "vertebrae_segmentation_net": vertebrae_segmentation_net,
}
TRANSFORMS = (None, "heatmaps", "sigmoid")


def build_model(factory: str, factory_kwargs: dict) -> nn.Module:
    """Linen module from a factory name (a key of ``FACTORIES``) and its kwargs.

    Raises:
        ValueError: unknown factory, or kwargs the factory rejects (the message names both).
    """
    if factory not in FACTORIES:
        raise ValueError(f"unknown network factory {factory!r}; known: {sorted(FACTORIES)}")
    try:
        return FACTORIES[factory](**factory_kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"cannot build {factory}(**{factory_kwargs!r}): {err}") from err


def build_network(spec: StageSpec, factory_kwargs: dict) -> nn.Module:
    """The network of stage definition ``spec`` (its factory) with ``factory_kwargs``."""
    return build_model(spec.factory, factory_kwargs)


def abstract_params(model: nn.Module, crop_size, input_channels: int) -> Any:
    """Shape/dtype tree of ``model``'s params for a ``(1, *crop_size, input_channels)`` input."""
    x = jax.ShapeDtypeStruct((1, *map(int, crop_size), int(input_channels)), jnp.float32)
    variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
    return variables["params"]


@functools.lru_cache(maxsize=64)
def apply_function(model: nn.Module, transform=None):
    """``apply(params, x)`` of a Linen module (inference mode); one function per equal config.

    Args:
        model: the module (Linen modules hash by their fields).
        transform: None (raw module output), ``"heatmaps"`` (``SCNOutput.heatmaps``) or
            ``"sigmoid"`` (sigmoid of the logits).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be None, 'heatmaps' or 'sigmoid', got {transform!r}")

    def apply(params, x):
        out = model.apply({"params": params}, x, train=False)
        if transform == "heatmaps":
            return out.heatmaps
        if transform == "sigmoid":
            return jax.nn.sigmoid(out)
        return out

    return apply


@functools.lru_cache(maxsize=64)
def _jitted_apply(model: nn.Module, transform=None):
    return jax.jit(apply_function(model, transform))


@dataclasses.dataclass(frozen=True, eq=False)
class StageNetwork:
    """A stage's network as the predictors use it: definition, Linen module, params pytree.

    Jitted apply functions are cached per network config (Linen modules hash by their fields)
    and JAX caches the compiled code per input shape, so repeated cases do not recompile.
    """

    spec: StageSpec
    model: nn.Module
    params: Any

    @property
    def stage(self) -> str:
        return self.spec.name

    @property
    def grid(self) -> StageGrid:
        return StageGrid(self.spec.spacing_mm, self.spec.crop_size, self.spec.smoothing_mm)

    @property
    def num_landmarks(self) -> int:
        return self.spec.num_landmarks

    @property
    def input_channels(self) -> int:
        return self.spec.input_channels

    def apply_partial(self, transform=None) -> jax.tree_util.Partial:
        """``Partial(apply, params)``: ``x (B, x, y, z, c) -> output``, params traced.

        The function is the same object for equal network configs (``apply_function``), which
        suits ``sliding_window``'s compilation cache.

        Args:
            transform: None (raw module output), ``"heatmaps"`` (``SCNOutput.heatmaps``) or
                ``"sigmoid"`` (sigmoid of the logits).
        """
        return jax.tree_util.Partial(apply_function(self.model, transform), self.params)

    def apply_fn(self, transform=None):
        """Jitted ``x (B, x, y, z, c) -> output`` (see :meth:`apply_partial` for ``transform``).

        Compiled once per (network config, transform, input shape), shared by all stages.
        """
        jitted = _jitted_apply(self.model, transform)
        return lambda x: jitted(self.params, x)
