"""Tests of verse_jax.io: volumes, masks, centroid JSON (both flavours), data set layouts."""

import numpy as np

from verse_jax import io


def test_sample_centroids_lie_on_their_labels(verse_sample):
    mask = io.read_mask(verse_sample / "sub-verse004_seg-vert_msk.nii.gz")
    assert mask.array.dtype == np.uint16
    centroids = io.read_centroids(verse_sample / "sub-verse004_seg-subreg_ctd.json", mask.geometry)
    assert centroids.labels.tolist() == list(range(16, 25))
    index = np.rint(mask.geometry.physical_to_index(centroids.points_mm)).astype(np.int64)
    np.testing.assert_array_equal(mask.array[tuple(index.T)], centroids.labels)
