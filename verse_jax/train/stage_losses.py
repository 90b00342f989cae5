"""The loss function of each stage: network output, targets and the loss terms of `losses`.

Each `make_*_loss(apply_fn, ...)` returns `loss_fn(params, sigmas, batch, rng) -> (loss, metrics)`
(`verse_jax.train.state.LossFn`) for `make_train_step`; batches are `(batch, x, y, z, channels)`
float32 arrays as delivered by `verse_jax.data.pipeline`, landmarks `landmarks_vox (batch, K, 3)`
continuous voxel indices of the crop with `valid (batch, K)` flags.
"""

import jax
import jax.numpy as jnp
import numpy as np

from verse_jax import heatmaps
from verse_jax.train import losses


def make_spine_loss(apply_fn, *, weight_decay: float = 5e-4, sigma_vox: float = 3.0):
    """Stage 1 loss: `0.5 * sum((pred - spine_heatmap)^2) / batch + weight decay`.

    `apply_fn` is the U-Net's `model.apply`; the batch holds `image (B, x, y, z, 1)`,
    `landmarks_vox (B, K, 3)` and `valid (B, K)`. The target is `heatmaps.spine_heatmap` with
    `sigma_vox` for both the landmark Gaussians and the blur.
    """

    def loss_fn(params, sigmas, batch, rng):
        del sigmas
        image = batch["image"]
        pred = apply_fn({"params": params}, image, train=True, rngs={"dropout": rng})
        shape = tuple(image.shape[1:4])
        target = jax.vmap(
            lambda p, v: heatmaps.spine_heatmap(
                p, v, shape, sigma_vox=sigma_vox, blur_sigma_vox=sigma_vox
            )
        )(batch["landmarks_vox"], batch["valid"])
        data = losses.heatmap_l2(pred, target[..., None]) / image.shape[0]
        reg = losses.weight_decay(params, weight_decay)
        return data + reg, {"loss_heatmap": data, "loss_reg": reg}

    return loss_fn


def make_scn_loss(
    apply_fn,
    *,
    weight_decay: float = 5e-4,
    sigma_weight: float = 100.0,
    scale: float = 1000.0,
    landmark_weights=None,
):
    """Stage 2 loss: masked heatmap L2 + sigma regulariser + weight decay (TF sum semantics).

    The targets are `heatmaps.gaussian_heatmaps(landmarks_vox, valid, sigmas, scale=scale)` built
    here, so gradients reach the learnable sigmas (K,) (voxels). The batch holds
    `image (B, x, y, z, 1)`, `landmarks_vox (B, K, 3)`, `valid (B, K)` and `mask (B, x, y, z, 1)`.
    Data and sigma terms are averaged over the batch (the paper used batch 1).
    `landmark_weights`: None (the paper), or (K,) factors of each heatmap channel's loss
    (`verse_jax.data.pipeline.landmark_loss_weights`).
    """
    if landmark_weights is not None:
        landmark_weights = np.asarray(landmark_weights, np.float32)

    def loss_fn(params, sigmas, batch, rng):
        image = batch["image"]
        out = apply_fn({"params": params}, image, train=True, rngs={"dropout": rng})
        shape = tuple(image.shape[1:4])
        target = jax.vmap(
            lambda p, v: heatmaps.gaussian_heatmaps(p, v, sigmas, shape, scale=scale)
        )(batch["landmarks_vox"], batch["valid"])
        batch_size = image.shape[0]
        data = losses.heatmap_l2(out.heatmaps, target, batch["mask"], landmark_weights)
        data = data / batch_size
        sig = jax.vmap(lambda v: losses.sigma_regularizer(sigmas, v, sigma_weight))(batch["valid"])
        sig = jnp.mean(sig)
        reg = losses.weight_decay(params, weight_decay)
        metrics = {
            "loss_heatmap": data,
            "loss_sigmas": sig,
            "loss_reg": reg,
            "sigma_mean": jnp.mean(sigmas),
        }
        return data + sig + reg, metrics

    return loss_fn


def make_seg_loss(apply_fn, *, weight_decay: float = 1e-6, dice_weight: float = 0.0):
    """Stage 3 loss: mean sigmoid cross-entropy of `label (B, x, y, z, 1)` + weight decay.

    `dice_weight` > 0 adds `dice_weight * losses.soft_dice_loss` (not in the paper, which uses the
    cross-entropy alone; the demo presets use it so that the small network leaves the all-background
    answer within the first hundred steps).
    """

    def loss_fn(params, sigmas, batch, rng):
        del sigmas
        logits = apply_fn({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        data = losses.sigmoid_cross_entropy(logits, batch["label"])
        reg = losses.weight_decay(params, weight_decay)
        terms = {"loss_xent": data, "loss_reg": reg}
        if dice_weight > 0:
            dice = losses.soft_dice_loss(logits, batch["label"])
            terms["loss_dice"] = dice
            data = data + dice_weight * dice
        return data + reg, terms

    return loss_fn
