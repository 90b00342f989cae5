"""Tests for the VerSe metrics on hand-made cases with hand-computed answers."""

import json
import math
import types

import numpy as np
import pytest
from scipy import ndimage

from verse_jax import io
from verse_jax.metrics import (
    CaseMetrics,
    aggregate_metrics,
    dice_score,
    hausdorff_distance_mm,
    landmark_localization_metrics,
    localization_metrics,
    segmentation_metrics,
)

GT_LABELS = np.array([20, 21, 22])  # L1, L2, L3, 30 mm apart along z
GT_POINTS = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0], [0.0, 0.0, -60.0]])


def test_perfect_prediction():
    m = localization_metrics((GT_LABELS, GT_POINTS), (GT_LABELS, GT_POINTS))
    assert (m.hits, m.num_gt, m.num_pred, m.id_rate, m.mean_distance_mm) == (3, 3, 3, 1.0, 0.0)
    assert m.hit_labels == (20, 21, 22) and m.missing_labels == m.extra_labels == ()


def test_all_shifted_by_25_mm_identify_nothing():
    m = localization_metrics((GT_LABELS, GT_POINTS + [25.0, 0.0, 0.0]), (GT_LABELS, GT_POINTS))
    assert (m.hits, m.id_rate) == (0, 0.0)
    assert m.mean_distance_mm == pytest.approx(25.0)
    shifted = localization_metrics(
        (GT_LABELS, GT_POINTS + [0.0, 20.0, 0.0]), (GT_LABELS, GT_POINTS)
    )
    assert shifted.id_rate == 1.0  # 20 mm is still a hit (inclusive)


def test_two_labels_swapped():
    pred = (np.array([21, 20, 22]), GT_POINTS)  # L1 and L2 exchanged
    m = localization_metrics(pred, (GT_LABELS, GT_POINTS))
    assert m.hit_labels == (22,)
    assert m.id_rate == pytest.approx(1 / 3)
    assert m.distances_mm == {20: 30.0, 21: 30.0, 22: 0.0}
    assert m.mean_distance_mm == pytest.approx(20.0)


def test_missing_and_extra_vertebrae_are_counted():
    pred = types.SimpleNamespace(  # an io.Centroids-like record, labels in any order
        labels=np.array([23, 22, 21]),
        points_mm=np.array([[0, 0, -90.0], GT_POINTS[2], GT_POINTS[1]]),
    )
    m = localization_metrics(pred, (GT_LABELS, GT_POINTS))
    assert (m.hits, m.num_gt, m.num_pred) == (2, 3, 3)
    assert m.id_rate == pytest.approx(2 / 3)  # the denominator is the ground truth
    assert m.missing_labels == (20,) and m.extra_labels == (23,)
    assert m.distances_mm == {21: 0.0, 22: 0.0}
    empty = localization_metrics((np.zeros(0, int), np.zeros((0, 3))), (GT_LABELS, GT_POINTS))
    assert empty.id_rate == 0.0 and math.isnan(empty.mean_distance_mm)
    assert empty.missing_labels == (20, 21, 22)


def test_equidistant_ground_truth_goes_to_the_lower_label():
    # Predicted L2 halfway between L1 and L2: numpy's argmin picks L1, so it is not a hit.
    pred = (np.array([20, 21]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -15.0]]))
    m = localization_metrics(pred, (GT_LABELS[:2], GT_POINTS[:2]))
    assert m.hit_labels == (20,)


def test_landmark_arrays_use_label_ids():
    points = np.zeros((25, 3))
    valid = np.zeros(25, bool)
    points[19:22], valid[19:22] = GT_POINTS, True  # indices 19..21 are L1..L3 (ids 20..22)
    pred_valid = valid.copy()
    pred_valid[19] = False
    m = landmark_localization_metrics(points, pred_valid, points, valid)
    assert m.hit_labels == (21, 22) and m.missing_labels == (20,) and m.id_rate == 2 / 3
    with pytest.raises(ValueError, match="landmarks"):
        landmark_localization_metrics(points[:, :2], valid, points, valid)


def test_bad_centroids_raise():
    with pytest.raises(ValueError, match="duplicate"):
        localization_metrics((np.array([1, 1]), np.zeros((2, 3))), (GT_LABELS, GT_POINTS))
    with pytest.raises(ValueError, match="points_mm"):
        localization_metrics((np.array([1]), np.zeros((2, 3))), (GT_LABELS, GT_POINTS))


SPACING = (1.0, 2.0, 3.0)


def hand_masks():
    gt = np.zeros((5, 5, 4), np.uint16)
    pred = np.zeros_like(gt)
    gt[0, 0, 0] = gt[1, 0, 0] = 1
    pred[0, 0, 0] = pred[0, 1, 0] = 1  # Dice 1/2; HD: (0,1,0) is 2 mm from (0,0,0) -> 2 mm
    gt[3, 3, 0] = 2
    pred[3, 3, 1] = pred[3, 3, 2] = 2  # Dice 0; HD: (3,3,2) is 2 slices * 3 mm away -> 6 mm
    gt[4, 0, 3] = 3  # missing
    pred[0, 4, 3] = 4  # extra
    return pred, gt


def test_dice_and_hausdorff_with_anisotropic_spacing():
    pred, gt = hand_masks()
    m = segmentation_metrics(pred, gt, SPACING)
    assert m.dice == {1: 0.5, 2: 0.0, 3: 0.0, 4: 0.0}
    assert m.hausdorff_mm == {1: 2.0, 2: 6.0}
    assert m.mean_dice == pytest.approx(0.5 / 3)  # over ground truth, the missing one counts 0
    assert m.mean_hausdorff_mm == 4.0
    assert (m.num_gt, m.num_pred, m.missing_labels, m.extra_labels) == (3, 3, (3,), (4,))
    perfect = segmentation_metrics(gt, gt, SPACING)
    assert perfect.mean_dice == 1.0 and perfect.mean_hausdorff_mm == 0.0


def test_hausdorff_equals_pairwise_distances_on_random_masks():
    rng = np.random.default_rng(0)
    spacing = np.array([0.7, 1.3, 2.1])
    for _ in range(20):
        a = rng.random((6, 5, 4)) < 0.15
        b = rng.random((6, 5, 4)) < 0.15
        a[0, 0, 0] = b[5, 4, 3] = True
        pa, pb = np.argwhere(a) * spacing, np.argwhere(b) * spacing
        d = np.sqrt(np.sum((pa[:, None] - pb[None]) ** 2, axis=-1))
        expected = max(d.min(axis=1).max(), d.min(axis=0).max())
        assert hausdorff_distance_mm(a, b, spacing) == pytest.approx(expected, rel=1e-12)
        assert dice_score(a, b) == pytest.approx(2 * np.sum(a & b) / (a.sum() + b.sum()))


def test_bad_masks_raise():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((2, 2, 2), int), np.zeros((2, 2, 3), int), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="integer"):
        segmentation_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), SPACING)
    with pytest.raises(ValueError, match="non-empty"):
        hausdorff_distance_mm(np.zeros((2, 2, 2)), np.ones((2, 2, 2)), SPACING)


def test_aggregate_over_cases():
    pred, gt = hand_masks()
    swapped = localization_metrics((np.array([21, 20, 22]), GT_POINTS), (GT_LABELS, GT_POINTS))
    perfect = localization_metrics((GT_LABELS, GT_POINTS), (GT_LABELS, GT_POINTS))
    nothing = localization_metrics((np.zeros(0, int), np.zeros((0, 3))), (GT_LABELS, GT_POINTS))
    cases = [
        CaseMetrics("a", swapped, segmentation_metrics(pred, gt, SPACING)),
        CaseMetrics("b", perfect, segmentation_metrics(gt, gt, SPACING)),
        CaseMetrics("c", nothing),
    ]
    agg = aggregate_metrics(cases)
    assert agg.num_cases == 3
    assert agg.id_rate == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert agg.pooled_id_rate == pytest.approx(4 / 9)
    assert agg.mean_distance_mm == pytest.approx(10.0)  # case c has no distance: left out
    assert agg.dice == pytest.approx((1 / 6 + 1) / 2)
    assert agg.hausdorff_mm == pytest.approx(2.0)
    assert (agg.hits, agg.num_gt_vertebrae, agg.num_pred_vertebrae) == (4, 9, 6)
    assert (agg.missing_vertebrae, agg.extra_vertebrae) == (3, 0)
    assert (agg.missing_masks, agg.extra_masks) == (1, 1)
    assert agg.num_undefined == {"id_rate": 0, "mean_distance_mm": 1, "dice": 0, "hausdorff_mm": 0}
    text = json.dumps([agg.to_dict()] + [c.to_dict() for c in cases])
    assert '"case_id": "a"' in text and '"hit_labels": [22]' in text


def test_real_sample_mask_and_centroids(verse_sample):
    mask = io.read_mask(verse_sample / "sub-verse004_seg-vert_msk.nii.gz")
    centroids = io.read_centroids(verse_sample / "sub-verse004_seg-subreg_ctd.json", mask.geometry)
    # Centres of mass of the whole vertebrae (body + arch) identify every annotated body centroid.
    labels = np.unique(mask.array)[1:]
    com_vox = np.array(ndimage.center_of_mass(np.ones(mask.array.shape), mask.array, labels))
    m = localization_metrics((labels, mask.geometry.index_to_physical(com_vox)), centroids)
    assert (m.hits, m.num_gt, m.id_rate) == (9, 9, 1.0)
    assert 5.0 < m.mean_distance_mm < 20.0
    pred = mask.array.copy()
    pred[pred == 20] = 0  # L1 missing
    s = segmentation_metrics(pred, mask.array, mask.geometry.spacing_mm)
    assert s.missing_labels == (20,) and s.dice[20] == 0.0
    assert s.mean_dice == pytest.approx(8 / 9) and s.mean_hausdorff_mm == 0.0
