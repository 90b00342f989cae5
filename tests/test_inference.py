"""Tests for the jitted z sliding window (exact answers: integer-valued data, exact float ops)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.inference_speed import whole_column
from verse_jax.infer.sliding_window import (
    num_windows,
    sliding_window,
    sliding_window_cache_size,
    window_bucket_length,
)

WINDOW, OVERLAP = 8, 5  # stride 3


def plus_one(windows):
    return windows + 1


def position_dependent(windows):
    """(b, x, y, w, 1) -> (b, x, y, w, 2): depends on position in the window and its content."""
    ramp = jnp.arange(windows.shape[3], dtype=windows.dtype)[None, None, None, :, None] - 3
    peak = jnp.max(windows, axis=(1, 2, 3), keepdims=True)
    return jnp.concatenate([windows * ramp, windows - peak], axis=-1)


def naive_sliding_window(apply_fn, column, window_z, overlap_z, merge, pad_value=-1.0):
    """Python loop over windows, one at a time, as the reference tiler does."""
    column = np.asarray(column)
    size_z = column.shape[2]
    before = max(0, (window_z - size_z) // 2)
    if size_z < window_z:
        pad = ((0, 0), (0, 0), (before, window_z - size_z - before), (0, 0))
        column = np.pad(column, pad, constant_values=pad_value)
    total_z = column.shape[2]
    stride = window_z - overlap_z
    offsets = list(range(0, total_z - window_z, stride)) + [total_z - window_z]
    preds = [np.asarray(apply_fn(column[None, :, :, o : o + window_z]))[0] for o in offsets]
    shape = column.shape[:3] + preds[0].shape[-1:]
    acc = np.zeros(shape, np.float32)
    counts = np.zeros(total_z, np.float32)
    for o, pred in zip(offsets, preds, strict=True):
        if merge == "max":
            acc[:, :, o : o + window_z] = np.maximum(acc[:, :, o : o + window_z], pred)
        else:
            acc[:, :, o : o + window_z] += pred
            counts[o : o + window_z] += 1
    if merge == "mean":
        acc = acc / counts[None, None, :, None]
    return acc[:, :, before : before + size_z]


def assert_merge_equal(out, expected, merge):
    """Max merging is exact; the mean's division may differ by an ulp (XLA may use a reciprocal)."""
    if merge == "max":
        np.testing.assert_array_equal(np.asarray(out), expected)
    else:
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=0)


def integer_column(size_z, channels=1, low=0, seed=0):
    rng = np.random.default_rng(seed + size_z)
    return rng.integers(low, 6, (3, 2, size_z, channels)).astype(np.float32)


@pytest.mark.parametrize(
    ("size_z", "batch_size"), [(5, 1), (5, 2), (8, 1), (8, 3), (9, 2), (20, 1), (20, 2), (20, 3)]
)
def test_plus_one_returns_column_plus_one(size_z, batch_size):
    column = integer_column(size_z, channels=2)
    out = sliding_window(
        plus_one, column, window_z=WINDOW, overlap_z=OVERLAP, batch_size=batch_size
    )
    assert out.shape == column.shape
    np.testing.assert_array_equal(np.asarray(out), column + 1)


@pytest.mark.parametrize("merge", ["max", "mean"])
@pytest.mark.parametrize(("size_z", "batch_size"), [(6, 1), (8, 2), (14, 2), (17, 1), (17, 3)])
def test_position_dependent_equals_naive_loop(merge, size_z, batch_size):
    column = integer_column(size_z, low=-4)
    out = sliding_window(
        position_dependent,
        column,
        window_z=WINDOW,
        overlap_z=OVERLAP,
        batch_size=batch_size,
        merge=merge,
    )
    expected = naive_sliding_window(position_dependent, column, WINDOW, OVERLAP, merge)
    assert out.shape == expected.shape == column.shape[:3] + (2,)
    assert_merge_equal(out, expected, merge)


def test_max_merge_clips_negative_responses_to_zero():
    column = integer_column(12)
    out = sliding_window(lambda w: -1.0 - w, column, window_z=WINDOW, overlap_z=OVERLAP)
    np.testing.assert_array_equal(np.asarray(out), np.zeros_like(column))


def test_short_column_is_centred_in_padding():
    column = np.zeros((1, 1, 3, 1), np.float32)

    def position(windows):
        return jnp.zeros_like(windows) + jnp.arange(8.0)[None, None, None, :, None]

    def window_min(windows):
        return jnp.zeros_like(windows) + jnp.min(windows)

    # 5 padding slices: 2 before, 3 after, so the column sits at window positions 2, 3, 4.
    out = sliding_window(position, column, window_z=8, overlap_z=4)
    np.testing.assert_array_equal(np.asarray(out)[0, 0, :, 0], [2.0, 3.0, 4.0])
    out = sliding_window(window_min, column, window_z=8, overlap_z=4, pad_value=-7.0, merge="mean")
    np.testing.assert_array_equal(np.asarray(out), np.full_like(column, -7.0))


def test_window_count_and_offsets():
    assert num_windows(5, window_z=8, overlap_z=5) == 1
    assert num_windows(8, window_z=8, overlap_z=5) == 1
    assert num_windows(9, window_z=8, overlap_z=5) == 2
    assert num_windows(11, window_z=8, overlap_z=5) == 2
    assert num_windows(12, window_z=8, overlap_z=5) == 3
    assert num_windows(300, window_z=128, overlap_z=96) == 7


def test_bucket_lengths():
    lengths = {z: window_bucket_length(z, window_z=WINDOW, overlap_z=OVERLAP) for z in range(1, 30)}
    assert [lengths[z] for z in (1, 8, 9, 11, 12, 14, 15, 20, 21, 29)] == [
        8,
        8,
        11,
        11,
        14,
        14,
        20,
        20,
        32,
        32,
    ]
    assert all(bucket >= z for z, bucket in lengths.items())
    paper = {window_bucket_length(z) for z in range(64, 600)}  # 2 mm columns up to 1.2 m
    assert len(paper) <= 6


def test_bucketing_compiles_once_and_matches_unbucketed():
    def fn(windows):  # a fresh function: its own cache entries
        return position_dependent(windows)

    for merge in ("max", "mean"):
        kwargs = dict(window_z=WINDOW, overlap_z=OVERLAP, batch_size=2, merge=merge)
        before = sliding_window_cache_size()
        for size_z in (15, 17, 20):  # 20 is the bucket itself: no padding, the unbucketed run
            column = integer_column(size_z, low=-3)
            out = sliding_window(fn, column, **kwargs)
            expected = naive_sliding_window(fn, column, WINDOW, OVERLAP, merge)
            assert_merge_equal(out, expected, merge)
        assert sliding_window_cache_size() == before + 1


def test_only_needed_windows_are_run():
    offsets = []

    def record(windows):
        jax.debug.callback(lambda w: offsets.append(np.asarray(w)[:, 0, 0, 0, 0]), windows)
        return windows

    column = np.broadcast_to(np.arange(15.0)[None, None, :, None], (1, 1, 15, 1))
    sliding_window(record, column, window_z=WINDOW, overlap_z=OVERLAP, batch_size=1)
    jax.effects_barrier()
    # Bucket 20 has room for 5 windows; length 15 needs 4 (offsets 0, 3, 6 and 7, flush at 15).
    np.testing.assert_array_equal(np.concatenate(offsets), [0.0, 3.0, 6.0, 7.0])


def test_partial_apply_fn_reuses_compilation_across_params():
    fn = lambda scale, w: w * scale  # noqa: E731
    column = integer_column(10)
    before = sliding_window_cache_size()
    for scale in (2.0, 3.0):
        partial = jax.tree_util.Partial(fn, jnp.float32(scale))
        out = sliding_window(partial, column, window_z=WINDOW, overlap_z=OVERLAP)
        np.testing.assert_array_equal(np.asarray(out), column * scale)
    assert sliding_window_cache_size() == before + 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(window_z=8, overlap_z=8), "overlap_z"),
        (dict(window_z=8, overlap_z=-1), "overlap_z"),
        (dict(window_z=0, overlap_z=0), "window_z"),
        (dict(batch_size=0), "batch_size"),
        (dict(merge="median"), "merge"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sliding_window(plus_one, integer_column(10), **kwargs)


def test_bad_column_and_bad_apply_fn_raise():
    with pytest.raises(ValueError, match="column"):
        sliding_window(plus_one, np.zeros((2, 2, 10)), window_z=4, overlap_z=2)
    with pytest.raises(ValueError, match="apply_fn"):
        sliding_window(lambda w: w[:, :, :, :2], integer_column(10), window_z=4, overlap_z=2)


def test_whole_column_runs_once_pads_and_crops_back():
    calls = []

    def apply_fn(x):
        calls.append(x.shape)
        return x[..., :1] + 1.0

    column = jnp.arange(2 * 3 * 10, dtype=jnp.float32).reshape(2, 3, 10, 1)
    out = whole_column(apply_fn, column, multiple=8)
    assert calls == [(1, 2, 3, 16, 1)]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(column) + 1.0)
    # Negative responses are clipped at 0, as the max merge of the sliding window does.
    out = whole_column(lambda x: x - 100.0, column, multiple=8)
    np.testing.assert_array_equal(np.asarray(out), np.maximum(np.asarray(column) - 100.0, 0.0))
