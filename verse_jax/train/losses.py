"""Loss terms of the three stages, as pure functions (TF1 semantics of the reference).

``tf.nn.l2_loss(t) = sum(t^2) / 2``: heatmap losses and weight decay are sums, not means; the
segmentation loss is a mean sigmoid cross-entropy. All results are float32 scalars.
"""

import jax
import jax.numpy as jnp


def heatmap_l2(
    pred: jax.Array,
    target: jax.Array,
    mask: jax.Array | None = None,
    channel_weights: jax.Array | None = None,
) -> jax.Array:
    """Masked heatmap L2 loss ``0.5 * sum((mask * (pred - target))^2)`` over every element.

    Args:
        pred: (batch, x, y, z, K) predicted heatmaps (any shape, same as target).
        target: same shape as ``pred``.
        mask: None, or an array of the same rank broadcastable to ``pred`` (e.g. (batch, x, y, z,
            1)), 1 where the loss counts.
        channel_weights: None, or (K,) factors of each channel's sum (last axis):
            ``0.5 * sum_k w_k sum((mask * (pred - target))[..., k]^2)``.

    Returns:
        Scalar float32 (summed over the batch too; divide by the batch size for a per-crop loss).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if mask is not None:
        if mask.ndim != pred.ndim:
            raise ValueError(f"mask must have the rank of pred {pred.shape}, got {mask.shape}")
        diff = diff * mask.astype(jnp.float32)
    if channel_weights is None:
        return 0.5 * jnp.sum(diff * diff)
    weights = jnp.asarray(channel_weights, jnp.float32)
    if weights.shape != pred.shape[-1:]:
        raise ValueError(f"channel_weights must be ({pred.shape[-1]},), got {weights.shape}")
    per_channel = jnp.sum(diff * diff, axis=tuple(range(diff.ndim - 1)))
    return 0.5 * jnp.sum(per_channel * weights)


def sigma_regularizer(sigmas: jax.Array, valid: jax.Array, weight: float = 100.0) -> jax.Array:
    """SCN sigma loss ``weight * 0.5 * sum((sigmas * valid)^2)``.

    Args:
        sigmas: (K,) learnable heatmap sigmas in voxels.
        valid: (K,) or (batch, K) bool/float landmark validity in the crop(s); summed over batch.
        weight: regularisation factor (100 in the paper).

    Returns:
        Scalar float32.
    """
    if valid.shape[-1:] != sigmas.shape:
        raise ValueError(f"valid {valid.shape} must end with the sigmas' shape {sigmas.shape}")
    masked = jnp.broadcast_to(sigmas.astype(jnp.float32), valid.shape) * valid.astype(jnp.float32)
    return weight * 0.5 * jnp.sum(masked * masked)


def weight_decay(params, weight: float) -> jax.Array:
    """Coupled L2 ``weight * 0.5 * sum ||W||^2`` over convolution kernels only.

    Kernels are the leaves named ``kernel``; biases (and anything else, e.g. sigmas) are skipped.

    Args:
        params: a parameter pytree (Flax ``params`` dict, or the whole variables dict).
        weight: regularisation factor (5e-4 spine/SCN, 1e-6 segmentation in the paper).

    Returns:
        Scalar float32.
    """
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        if name == "kernel":
            total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return weight * 0.5 * total


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean sigmoid cross-entropy over all elements (numerically stable form).

    ``max(x, 0) - x * z + log(1 + exp(-|x|))`` for logits x and labels z in [0, 1].

    Args:
        logits: (batch, x, y, z, 1) network outputs (any shape).
        labels: same shape as ``logits``, in [0, 1].

    Returns:
        Scalar float32.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits and labels shapes differ: {logits.shape} vs {labels.shape}")
    x = logits.astype(jnp.float32)
    z = labels.astype(jnp.float32)
    return jnp.mean(jnp.maximum(x, 0.0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x))))


def soft_dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Mean over the batch of ``1 - soft Dice(sigmoid(logits), labels)`` per crop.

    ``soft Dice = (2 sum(p z) + smooth) / (sum(p) + sum(z) + smooth)`` over each crop's voxels, so
    a crop counts the same whatever its foreground size (the cross-entropy mean is dominated by
    background voxels early in training).

    Args:
        logits: (batch, x, y, z, 1) network outputs.
        labels: same shape, in [0, 1].
        smooth: added to numerator and denominator (a crop without foreground scores 1 when the
            prediction is empty too).

    Returns:
        Scalar float32 in [0, 1].
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits and labels shapes differ: {logits.shape} vs {labels.shape}")
    p = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
    z = labels.astype(jnp.float32).reshape(labels.shape[0], -1)
    dice = (2 * jnp.sum(p * z, axis=1) + smooth) / (
        jnp.sum(p, axis=1) + jnp.sum(z, axis=1) + smooth
    )
    return jnp.mean(1.0 - dice)
