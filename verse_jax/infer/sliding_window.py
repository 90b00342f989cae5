"""Inference: a jitted sliding window along z (the stage predictors build on it).

All windows of a column are cut with `lax.dynamic_slice` inside one jitted function, run through
the network in groups of `batch_size` windows (a loop over groups) and merged in place.
Column lengths are bucketed (`window_bucket_length`) so that a new length rarely recompiles; the
true length is a traced argument and windows are clamped to end at it, so the result equals the
unbucketed one exactly.
"""

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax

logger = logging.getLogger(__name__)

MERGE_MODES = ("max", "mean")


def _check_window_args(window_z: int, overlap_z: int, batch_size: int, merge: str) -> None:
    if int(window_z) != window_z or window_z < 1:
        raise ValueError(f"window_z must be a positive integer, got {window_z!r}")
    if int(overlap_z) != overlap_z or not 0 <= overlap_z < window_z:
        raise ValueError(
            f"overlap_z must be an integer in [0, window_z={window_z}), got {overlap_z!r}"
        )
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")


def num_windows(size_z: int, *, window_z: int = 128, overlap_z: int = 96) -> int:
    """Number of z windows covering `size_z` slices (1 for a column not longer than a window).

    Offsets are 0, stride, 2 * stride, ... and the last window ends flush at `size_z`.
    """
    stride = window_z - overlap_z
    return 1 + max(0, math.ceil((size_z - window_z) / stride))


def window_bucket_length(size_z: int, *, window_z: int = 128, overlap_z: int = 96) -> int:
    """Padded column length (slices) that `sliding_window` compiles for.

    Buckets are `window_z + stride * m` with m = 0 or a power of two, so a data set with columns
    of 1 to 33 windows needs at most 7 compilations. Only the windows the true length needs are
    run (the loop count is traced), so a bucket costs padding memory, not network evaluations.
    """
    _check_window_args(window_z, overlap_z, 1, "max")
    if size_z < 1:
        raise ValueError(f"column length must be >= 1 slice, got {size_z}")
    steps = num_windows(size_z, window_z=window_z, overlap_z=overlap_z) - 1
    steps = 0 if steps == 0 else 1 << (steps - 1).bit_length()  # next power of two
    return window_z + (window_z - overlap_z) * steps


def sliding_window(
    apply_fn,
    column,
    *,
    window_z: int = 128,
    overlap_z: int = 96,
    batch_size: int = 1,
    merge: str = "max",
    pad_value: float = -1.0,
) -> jnp.ndarray:
    """Predicts a whole column with overlapping z windows and merges them.

    Windows of `window_z` slices start at 0, s, 2s, ... (s = window_z - overlap_z); the last one is
    flush with the end (offset Z - window_z). With `merge="max"` the result starts from zeros and
    takes the elementwise maximum of all windows (as the reference: negative responses become 0);
    with `merge="mean"` each voxel is the average of the windows covering it. A column shorter than
    a window is padded with `pad_value`, centred (extra slice after), and cropped back.

    Compilation is cached per (apply_fn, bucket length, x, y, channels, dtype, window arguments).
    A plain function is part of the cache key by identity, so build it once and reuse it; to reuse
    one compilation across parameter values pass a `jax.tree_util.Partial(fn, params)` (its
    arguments are traced): `Partial(lambda p, w: model.apply(p, w, train=False).heatmaps, params)`.

    Args:
        apply_fn: jax-traceable map from windows `(b, x, y, window_z, c)` to
            `(b, x, y, window_z, k)`, b = `batch_size`.
        column: `(x, y, Z, c)` array (x, y, z index order, channels last).
        window_z: window length in slices.
        overlap_z: overlap of consecutive windows in slices, `0 <= overlap_z < window_z`.
        batch_size: windows per network call (stacked on the batch axis).
        merge: "max" or "mean".
        pad_value: value of the padding of columns shorter than a window (normalised intensity).

    Returns:
        `(x, y, Z, k)` merged prediction; dtype of `apply_fn`'s output for "max", at least
        float32 for "mean".

    Raises:
        ValueError: bad window arguments, a column that is not 4-D or is empty, or an `apply_fn`
            whose output shape does not match its input windows.
    """
    _check_window_args(window_z, overlap_z, batch_size, merge)
    column = jnp.asarray(column)
    if column.ndim != 4 or 0 in column.shape:
        raise ValueError(
            f"column must be a non-empty (x, y, z, channels) array, got {column.shape}"
        )
    fn = (
        apply_fn if isinstance(apply_fn, jax.tree_util.Partial) else jax.tree_util.Partial(apply_fn)
    )
    size_z = column.shape[2]
    before = max(0, (window_z - size_z) // 2)
    bucket_z = window_bucket_length(size_z, window_z=window_z, overlap_z=overlap_z)
    true_z = max(size_z, window_z)
    after = bucket_z - size_z - before
    logger.debug(
        "sliding window: %d slices, bucket %d, %d windows",
        size_z,
        bucket_z,
        num_windows(size_z, window_z=window_z, overlap_z=overlap_z),
    )
    if before or after:
        padding = ((0, 0), (0, 0), (before, after), (0, 0))
        column = jnp.pad(column, padding, constant_values=jnp.asarray(pad_value, column.dtype))
    merged = _run_windows(
        fn,
        column,
        jnp.int32(true_z),
        window_z=window_z,
        stride=window_z - overlap_z,
        batch_size=batch_size,
        merge=merge,
    )
    return merged[:, :, before : before + size_z]


def sliding_window_cache_size() -> int:
    """Number of compiled variants of the jitted window runner (for tests and logging)."""
    return _run_windows._cache_size()


def _output_struct(fn, window_shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(window_shape, dtype))
    if (
        not isinstance(out, jax.ShapeDtypeStruct)
        or out.ndim != 5
        or out.shape[:4] != window_shape[:4]
    ):
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"apply_fn must map windows {window_shape} to (b, x, y, z, k) = "
            f"{window_shape[:4]} + (k,), got {got}"
        )
    return out


def _merge_window(acc, counts, pred, offset, used, merge: str):
    """Merges one window prediction `(x, y, w, k)` into `acc (x, y, Zb, k)` at z `offset`."""
    window_z = pred.shape[2]
    current = lax.dynamic_slice_in_dim(acc, offset, window_z, axis=2)
    if merge == "max":
        return lax.dynamic_update_slice_in_dim(acc, jnp.maximum(current, pred), offset, 2), counts
    # Duplicated windows (bucket padding) get weight 0; `where` keeps the sum order exact.
    acc = lax.dynamic_update_slice_in_dim(acc, jnp.where(used, current + pred, current), offset, 2)
    count = lax.dynamic_slice_in_dim(counts, offset, window_z)
    counts = lax.dynamic_update_slice_in_dim(counts, jnp.where(used, count + 1, count), offset, 0)
    return acc, counts


@functools.partial(jax.jit, static_argnames=("window_z", "stride", "batch_size", "merge"))
def _run_windows(fn, column, true_z, *, window_z: int, stride: int, batch_size: int, merge: str):
    """Merged prediction `(x, y, Zb, k)` of the windows of `column[:, :, :true_z]` (Zb = bucket).

    Runs `ceil(n / batch_size)` groups (a traced loop count), n = windows `true_z` needs; slots of
    the last group beyond n repeat the last window (weight 0 for the mean).
    """
    size_x, size_y, bucket_z, channels = column.shape
    out = _output_struct(fn, (batch_size, size_x, size_y, window_z, channels), column.dtype)
    acc_dtype = out.dtype if merge == "max" else jnp.promote_types(out.dtype, jnp.float32)
    last_offset = true_z - window_z
    num_used = (last_offset + stride - 1) // stride + 1  # windows the unbucketed column needs

    def group_step(group, carry):
        acc, counts = carry
        index = group * batch_size + jnp.arange(batch_size)
        offsets = jnp.minimum(index * stride, last_offset)
        windows = jax.vmap(lambda o: lax.dynamic_slice_in_dim(column, o, window_z, axis=2))(offsets)
        preds = fn(windows).astype(acc_dtype)
        for i in range(batch_size):
            acc, counts = _merge_window(
                acc, counts, preds[i], offsets[i], index[i] < num_used, merge
            )
        return acc, counts

    init = (
        jnp.zeros((size_x, size_y, bucket_z, out.shape[4]), acc_dtype),
        jnp.zeros((bucket_z,), acc_dtype),
    )
    num_groups = (num_used + batch_size - 1) // batch_size
    acc, counts = lax.fori_loop(0, num_groups, group_step, init)
    if merge == "mean":
        counts = counts[None, None, :, None]
        acc = jnp.where(counts > 0, acc / jnp.maximum(counts, 1), 0)
    return acc
