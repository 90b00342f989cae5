"""The three stage predictors and ``predict_case``: CT volume -> vertebra centroids and label mask.

1. Spine localisation on the whole scan at the spine stage's grid (8 mm): the centre of mass of the
   predicted spine heatmap gives the spine's world x, y (docs/reference.md §4.5).
2. Vertebra localisation on an x-y column around that point covering the whole scan in z (2 mm):
   sliding window along z, candidate peaks, the best anatomical label sequence (§5.6-5.8).
3. Segmentation of every found vertebra (1 mm crops centred posterior of the centroid, with a
   centroid Gaussian as second channel), largest component, and fusion of the probabilities on the
   input's own grid with a running best (probability, label) pair (§6.4), never a (volume x K)
   array.

Every stage follows its definition (``stages.StageSpec``, stored whole in the bundle's
``stage.json``): grids are identity-direction grids in the LPS world, crop centres come from
``stages.crop_center_vox`` and the network inputs are cut by ``samples.prediction_input``, the
training sampler with identity parameters. The outputs are in the input's exact geometry.
"""

import logging
import time
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from verse_jax import stages
from verse_jax.data import samples
from verse_jax.geometry import Geometry, Volume
from verse_jax.infer import sequence as sequence_lib
from verse_jax.infer import sliding_window
from verse_jax.infer.candidates import LandmarkCandidates, column_z_range_mm, landmark_candidates
from verse_jax.infer.confidence import DEFAULT_MARGIN_THRESHOLD, LabelConfidence, label_confidence
from verse_jax.infer.fusion import LabelFusion, fuse_crop, largest_component
from verse_jax.infer.inputs import prepare_case
from verse_jax.io.centroids import Centroids, landmarks_to_centroids
from verse_jax.labels import index_to_label
from verse_jax.models.registry import StageNetwork

logger = logging.getLogger(__name__)


class NoSpineFoundError(ValueError):
    """The networks found no spine or no vertebra in the image."""


@dataclass(frozen=True, eq=False)
class Networks:
    """The three stage networks `predict_case` runs (a loaded ``infer.bundle.Bundle`` is one)."""

    spine: StageNetwork
    scn: StageNetwork
    seg: StageNetwork


def _crop_geometry(volume: Volume, origin_vox, size) -> Geometry:
    """The grid of a crop whose voxel 0 sits at stage voxel ``origin_vox`` (identity sampling)."""
    origin = volume.geometry.index_to_physical(np.asarray(origin_vox, np.float64))
    return Geometry(tuple(int(v) for v in size), volume.geometry.spacing_mm, tuple(origin))


def predict_spine(volume: Volume, stage: StageNetwork) -> np.ndarray:
    """Stage 1: the spine's world position from the whole scan.

    Args:
        volume: normalised scan on the stage's bounding grid (``stage_volumes``).
        stage: the spine stage.

    Returns:
        (3,) LPS mm centre of mass of the signed predicted heatmap (as the reference, which takes
        the centre of mass of the unthresholded heatmap resampled onto the input, §4.5) over the
        crop voxels whose nearest stage voxel lies in the scan; only x and y are used downstream.

    Raises:
        NoSpineFoundError: the heatmap's values there do not sum to a positive value.
    """
    spec = stage.spec
    size = np.asarray(volume.geometry.size)
    center = stages.crop_center_vox(spec, size)
    x, origin_vox = samples.prediction_input(volume.array, spec, center)
    out = stage.apply_fn()(jnp.asarray(x)[None])
    heatmap = np.asarray(out[0, ..., 0], np.float64)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in heatmap.shape], indexing="ij")
    position = [np.rint(g + o) for g, o in zip(grids, origin_vox, strict=True)]
    inside = np.all([(p >= 0) & (p < n) for p, n in zip(position, size, strict=True)], axis=0)
    weights = np.where(inside, heatmap, 0.0)
    total = weights.sum()
    if not total > 0:
        raise NoSpineFoundError("no spine found: the spine heatmap does not sum to > 0 in the scan")
    com_vox = np.array([(g * weights).sum() / total for g in grids])
    return volume.geometry.index_to_physical(com_vox + origin_vox)


def predict_landmarks(
    volume: Volume,
    spine_mm,
    stage: StageNetwork,
    *,
    overlap_z: int | None = None,
    batch_size: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: vertebra centroids from the column around the spine.

    `predict_landmark_sequence` with the same arguments, reduced to its selected points.

    Returns:
        points_mm (K, 3) LPS mm (zeros where invalid), valid (K,) bool.
    """
    _, sequence = predict_landmark_sequence(
        volume,
        spine_mm,
        stage,
        overlap_z=overlap_z,
        batch_size=batch_size,
    )
    return sequence.points_mm, sequence.valid


def predict_landmark_sequence(
    volume: Volume,
    spine_mm,
    stage: StageNetwork,
    *,
    overlap_z: int | None = None,
    batch_size: int = 1,
) -> tuple[LandmarkCandidates, sequence_lib.LandmarkSequence]:
    """Stage 2: candidate peaks and the selected landmark sequence from the column around the spine.

    Args:
        volume: normalised scan on the stage's bounding grid (``stage_volumes``).
        spine_mm: (3,) LPS mm spine point; its x, y centre the column.
        stage: the SCN stage; its crop size gives the column's x, y size and the window length.
        overlap_z: window overlap in slices; None: 3/4 of the window (96 of 128 slices as the
            reference's validation; its docker used 64).
        batch_size: windows per network call.

    Returns:
        The candidates (`candidates.landmark_candidates`) and the sequence selected from them
        (its `points_mm`, `valid` and heatmap `values`).
    """
    spec = stage.spec
    window_z = spec.crop_size[2]
    column, geometry = scn_column(volume, spine_mm, spec)
    merged = sliding_window.sliding_window(
        stage.apply_partial("heatmaps"),
        jnp.asarray(column),
        window_z=window_z,
        overlap_z=window_z * 3 // 4 if overlap_z is None else int(overlap_z),
        batch_size=batch_size,
        pad_value=spec.window_pad_value,
    )
    return landmarks_from_heatmaps(merged, geometry, spec)


def scn_column(volume: Volume, spine_mm, spec: stages.StageSpec) -> tuple[np.ndarray, Geometry]:
    """The SCN's input column: the stage's crop in x, y around the spine, the whole scan in z.

    Args:
        volume: normalised scan on the stage's bounding grid (``stage_volumes``).
        spine_mm: (3,) LPS mm spine point; its x, y centre the column.
        spec: the SCN stage definition.

    Returns:
        ``(x, y, Z, 1)`` float32 column (``samples.prediction_input``) and its grid.
    """
    crop_x, crop_y, _ = spec.crop_size
    size = (crop_x, crop_y, volume.geometry.size[2])
    spine_vox = volume.geometry.physical_to_index(np.asarray(spine_mm, np.float64))
    center = stages.crop_center_vox(spec, volume.geometry.size, column_xy_vox=spine_vox[:2])
    column, origin_vox = samples.prediction_input(volume.array, spec, center, crop_size=size)
    return column, _crop_geometry(volume, origin_vox, size)


def landmarks_from_heatmaps(
    merged, geometry: Geometry, spec: stages.StageSpec
) -> tuple[LandmarkCandidates, sequence_lib.LandmarkSequence]:
    """Candidates and the selected sequence from the merged ``(x, y, Z, K)`` column heatmaps.

    The stage's candidate rule (``spec.candidates``: value scale, peak distance and thresholds)
    finds the peaks on ``geometry`` (the column's grid, ``scn_column``); the sequence is selected
    over the column's z range.
    """
    rule = spec.candidates
    if rule.value_scale != 1.0:
        merged = merged * rule.value_scale
    candidates = landmark_candidates(
        merged,
        geometry,
        max_candidates=rule.max_candidates,
        min_distance_vox=rule.min_distance_mm / spec.spacing_mm,
        min_max_value=rule.min_max_value,
        relative_threshold=rule.relative_threshold,
    )
    sequence = sequence_lib.select_landmark_sequence(*candidates, column_z_range_mm(geometry))
    logger.debug("landmark sequence mode %s, %d valid", sequence.mode, sequence.valid.sum())
    return candidates, sequence


def predict_segmentation(
    volume: Volume,
    points_mm,
    valid,
    stage: StageNetwork,
    target: Geometry,
    *,
    batch_size: int = 1,
) -> np.ndarray:
    """Stage 3: fused vertebra labels on ``target`` from one crop per valid landmark.

    Args:
        volume: normalised scan on the stage's bounding grid (``stage_volumes``).
        points_mm: (K, 3) LPS mm landmarks; valid: (K,) bool.
        stage: the segmentation stage.
        target: the output grid (the input CT's geometry).
        batch_size: crops per network call (the last batch is padded to this size).

    Returns:
        (x, y, z) uint16 VerSe ids on ``target`` (0 background).
    """
    fusion = fuse_segmentation(volume, points_mm, valid, stage, target, batch_size=batch_size)
    return fusion.labels


def fuse_segmentation(
    volume: Volume,
    points_mm,
    valid,
    stage: StageNetwork,
    target: Geometry,
    *,
    batch_size: int = 1,
    keep_low_probabilities: bool = False,
) -> LabelFusion:
    """`predict_segmentation`'s fusion itself: labels and the per-voxel winning probability.

    Args:
        keep_low_probabilities: also keep probabilities <= 0.5 (`LabelFusion`); each crop is then
            resampled whole instead of only where it can win. Other arguments as
            `predict_segmentation`.
    """
    spec = stage.spec
    crop = spec.crop_size
    segment = stage.apply_fn("sigmoid")
    fusion = LabelFusion(target.size, keep_low_probabilities=keep_low_probabilities)
    threshold = 0.0 if keep_low_probabilities else 0.5
    indices = np.flatnonzero(np.asarray(valid))
    for first in range(0, len(indices), batch_size):
        chunk = indices[first : first + batch_size]
        x = np.zeros((batch_size, *crop, spec.input_channels), np.float32)
        grids = []
        for row, k in enumerate(chunk):
            point = volume.geometry.physical_to_index(np.asarray(points_mm[k], np.float64))
            center = stages.crop_center_vox(spec, volume.geometry.size, centroid_vox=point)
            x[row], origin_vox = samples.prediction_input(
                volume.array, spec, center, centroid_vox=point
            )
            grids.append(_crop_geometry(volume, origin_vox, crop))
        x[len(chunk) :] = x[0]  # padding of the last batch
        probs = np.asarray(segment(jnp.asarray(x)))[..., 0]
        for row, k in enumerate(chunk):
            prob = largest_component(probs[row])
            fuse_crop(fusion, Volume(prob, grids[row]), index_to_label(k), target, threshold)
    return fusion


@dataclass(frozen=True)
class CasePrediction:
    """Everything `predict_case_details` found in one CT.

    Attributes:
        centroids: VerSe ids and LPS mm points of the found vertebrae.
        mask: uint16 label Volume with exactly the input's geometry.
        landmark_values: (N,) float64 heatmap peak value of each centroid, in `centroids` order.
        candidates: the landmark candidates of stage 2 (`LandmarkCandidates`).
        sequence: the landmark sequence selected from them.
        confidence: the labelling against its one-level alternatives (`label_confidence`).
        probabilities: float16 Volume on the input grid, the highest vertebra probability per
            voxel (the winning label's where the mask is not 0), or None if not asked for.
    """

    centroids: Centroids
    mask: Volume
    landmark_values: np.ndarray
    candidates: LandmarkCandidates
    sequence: sequence_lib.LandmarkSequence
    confidence: LabelConfidence
    probabilities: Volume | None = None


def predict_case(
    image: Volume,
    networks: Networks,
    *,
    overlap_z: int | None = None,
    window_batch_size: int = 1,
    seg_batch_size: int = 1,
) -> tuple[Centroids, Volume]:
    """The whole pipeline on one CT.

    Args:
        image: CT in HU, (x, y, z), any geometry (oblique too).
        networks: the three stage networks (a loaded bundle, ``infer.bundle.load_bundle``).
        overlap_z: SCN window overlap in slices; None: 3/4 of the window (96 for the paper's
            128-slice windows; the reference docker used 64).
        window_batch_size: SCN windows per network call.
        seg_batch_size: vertebra crops per segmentation call (paper network on the CPU: about
            2.7 GiB of XLA temporaries per crop, hence 1 by default).

    Returns:
        Centroids (VerSe ids, LPS mm) and a uint16 label Volume with exactly ``image.geometry``.

    Raises:
        ValueError: not a CT; NoSpineFoundError: no spine or no vertebra found.
    """
    result = predict_case_details(
        image,
        networks,
        overlap_z=overlap_z,
        window_batch_size=window_batch_size,
        seg_batch_size=seg_batch_size,
    )
    return result.centroids, result.mask


def predict_case_details(
    image: Volume,
    networks: Networks,
    *,
    overlap_z: int | None = None,
    window_batch_size: int = 1,
    seg_batch_size: int = 1,
    keep_probabilities: bool = False,
    margin_threshold: float = DEFAULT_MARGIN_THRESHOLD,
    volumes: dict[str, Volume] | None = None,
) -> CasePrediction:
    """`predict_case` with the heatmap values, candidates, labelling confidence, probabilities.

    Args:
        keep_probabilities: also return the fused per-voxel probability (float16); costs one
            resampling of every whole crop and a float32 array of the input's size.
        margin_threshold: `confidence.label_confidence`'s flag threshold (margin per vertebra).
        volumes: `prepare_case(image, networks)` when already computed (then not computed again).
        Other arguments as `predict_case`.

    Raises:
        ValueError: not a CT; NoSpineFoundError: no spine or no vertebra found.
    """
    times = {}
    tic = time.perf_counter()
    if volumes is None:
        volumes = prepare_case(image, networks)
    times["preprocessing"], tic = time.perf_counter() - tic, time.perf_counter()
    spine_mm = predict_spine(volumes["spine"], networks.spine)
    times["spine"], tic = time.perf_counter() - tic, time.perf_counter()
    candidates, sequence = predict_landmark_sequence(
        volumes["scn"], spine_mm, networks.scn, overlap_z=overlap_z, batch_size=window_batch_size
    )
    points_mm, valid = sequence.points_mm, sequence.valid
    times["landmarks"], tic = time.perf_counter() - tic, time.perf_counter()
    if not np.any(valid):
        raise NoSpineFoundError("no vertebra found: no landmark passed the sequence selection")
    fusion = fuse_segmentation(
        volumes["seg"],
        points_mm,
        valid,
        networks.seg,
        image.geometry,
        batch_size=seg_batch_size,
        keep_low_probabilities=keep_probabilities,
    )
    times["segmentation"] = time.perf_counter() - tic
    logger.info(
        "predict_case: %d vertebrae; %s",
        int(np.sum(valid)),
        ", ".join(f"{name} {seconds:.2f} s" for name, seconds in times.items()),
    )
    probabilities = None
    if keep_probabilities:
        probabilities = Volume(fusion.best_prob.astype(np.float16), image.geometry)
    return CasePrediction(
        centroids=landmarks_to_centroids(points_mm, valid),
        mask=Volume(fusion.labels, image.geometry),
        landmark_values=np.asarray(sequence.values, np.float64)[valid],
        candidates=candidates,
        sequence=sequence,
        confidence=label_confidence(candidates, sequence, threshold=margin_threshold),
        probabilities=probabilities,
    )
