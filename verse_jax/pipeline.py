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

from verse_jax import inference, postprocessing, preprocessing, samples, stages
from verse_jax.bundle import Bundle, StageGrid, StageModel
from verse_jax.geometry import Geometry, Volume, physical_bounding_grid
from verse_jax.io import Centroids, landmarks_to_centroids
from verse_jax.label_confidence import DEFAULT_MARGIN_THRESHOLD, LabelConfidence, label_confidence
from verse_jax.labels import index_to_label

logger = logging.getLogger(__name__)

_MIN_CT_RANGE_HU = 100.0


class NoSpineFoundError(ValueError):
    """The networks found no spine or no vertebra in the image."""


def check_ct(volume: Volume, name: str = "image") -> None:
    """Raise ValueError unless ``volume`` looks like a 3-D CT in HU (numeric, >= 100 HU range)."""
    array = np.asarray(volume.array)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name}: not a CT (voxel type {array.dtype})")
    low, high = float(array.min()), float(array.max())
    if not np.isfinite([low, high]).all() or high - low < _MIN_CT_RANGE_HU:
        raise ValueError(
            f"{name}: does not look like a CT in HU (intensities {low:g}..{high:g}; "
            f"a CT spans air to bone)"
        )


def stage_volumes(image: Volume, grids: dict[str, StageGrid]) -> dict[str, Volume]:
    """Normalised volumes on each stage's bounding grid (``preprocessing.to_stage_grid`` steps).

    The clamp at -1024 HU is done once and each smoothing once for all stages that share it.

    Args:
        image: CT in HU, (x, y, z), any grid.
        grids: stage name -> grid (spacing_mm, smoothing_mm).

    Returns:
        stage name -> float32 Volume in [-1, 1] on ``physical_bounding_grid(image, spacing_mm)``.
    """
    clamped = np.array(image.array, np.float32)  # one float32 copy, clamped in place
    np.maximum(clamped, np.float32(preprocessing.CT_MIN_HU), out=clamped)
    clamped = Volume(clamped, image.geometry)
    out = {}
    for smoothing in sorted({grid.smoothing_mm for grid in grids.values()}):
        smoothed = preprocessing.smooth_mm(clamped, smoothing)
        for name, grid in grids.items():
            if grid.smoothing_mm == smoothing:
                target = physical_bounding_grid(image.geometry, grid.spacing_mm)
                resampled = preprocessing.resample(
                    smoothed, target, default_value=preprocessing.CT_MIN_HU
                )
                out[name] = Volume(preprocessing.normalize_ct(resampled.array), target)
        del smoothed
    return out


def prepare_case(image: Volume, bundle: Bundle) -> dict[str, Volume]:
    """Check ``image`` (`check_ct`) and compute its volume of every stage (`stage_volumes`).

    No JAX: ``verse-jax predict`` runs it for the next case in a thread while the networks run.

    Returns:
        The ``volumes`` argument of `predict_case_details`.
    """
    check_ct(image)
    grids = {"spine": bundle.spine.grid, "scn": bundle.scn.grid, "seg": bundle.seg.grid}
    return stage_volumes(image, grids)


def cut_box(volume: Volume, start, size, pad_value: float = preprocessing.OUTSIDE_NORMALIZED):
    """Integer box of an identity-direction volume, padded where it leaves the volume.

    Args:
        volume: (x, y, z) volume on an identity-direction grid.
        start: (3,) int voxel index (may be negative) of the box's first voxel in ``volume``.
        size: (3,) box size in voxels.
        pad_value: value outside the volume.

    Returns:
        Volume of ``size`` whose geometry is the box's own grid (same spacing, identity).
    """
    start = np.asarray(start, np.int64)
    out = samples.cut_box(np.asarray(volume.array), start, size, pad_value)
    origin = volume.geometry.index_to_physical(start.astype(np.float64))
    return Volume(out, Geometry(tuple(out.shape), volume.geometry.spacing_mm, tuple(origin)))


def _crop_geometry(volume: Volume, origin_vox, size) -> Geometry:
    """The grid of a crop whose voxel 0 sits at stage voxel ``origin_vox`` (identity sampling)."""
    origin = volume.geometry.index_to_physical(np.asarray(origin_vox, np.float64))
    return Geometry(tuple(int(v) for v in size), volume.geometry.spacing_mm, tuple(origin))


def predict_spine(volume: Volume, stage: StageModel) -> np.ndarray:
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
    stage: StageModel,
    *,
    overlap_z: int | None = None,
    batch_size: int = 1,
    whole_column: bool = False,
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
        whole_column=whole_column,
    )
    return sequence.points_mm, sequence.valid


def predict_landmark_sequence(
    volume: Volume,
    spine_mm,
    stage: StageModel,
    *,
    overlap_z: int | None = None,
    batch_size: int = 1,
    whole_column: bool = False,
) -> tuple[postprocessing.LandmarkCandidates, postprocessing.LandmarkSequence]:
    """Stage 2: candidate peaks and the selected landmark sequence from the column around the spine.

    Args:
        volume: normalised scan on the stage's bounding grid (``stage_volumes``).
        spine_mm: (3,) LPS mm spine point; its x, y centre the column.
        stage: the SCN stage; its crop size gives the column's x, y size and the window length.
        overlap_z: window overlap in slices; None: 3/4 of the window (96 of 128 slices as the
            reference's validation; its docker used 64).
        batch_size: windows per network call.
        whole_column: run the network once over the whole column instead of windows
            (`inference.whole_column`), for `benchmarks/inference_speed.py` only: with the demo
            SCN the landmarks moved up to 27 mm on held-out phantoms, so `predict_case` and the
            command line do not offer it.

    Returns:
        The candidates (`postprocessing.landmark_candidates`) and the sequence selected from them
        (its `points_mm`, `valid` and heatmap `values`).
    """
    spec = stage.spec
    crop_x, crop_y, window_z = spec.crop_size
    size = (crop_x, crop_y, volume.geometry.size[2])
    spine_vox = volume.geometry.physical_to_index(np.asarray(spine_mm, np.float64))
    center = stages.crop_center_vox(spec, volume.geometry.size, column_xy_vox=spine_vox[:2])
    column, origin_vox = samples.prediction_input(volume.array, spec, center, crop_size=size)
    geometry = _crop_geometry(volume, origin_vox, size)
    if whole_column:
        merged = inference.whole_column(
            stage.apply_fn("heatmaps"),
            jnp.asarray(column),
            multiple=window_z,
            pad_value=spec.window_pad_value,
        )
    else:
        merged = inference.sliding_window(
            stage.apply_partial("heatmaps"),
            jnp.asarray(column),
            window_z=window_z,
            overlap_z=window_z * 3 // 4 if overlap_z is None else int(overlap_z),
            batch_size=batch_size,
            pad_value=spec.window_pad_value,
        )
    rule = spec.candidates
    if rule.value_scale != 1.0:
        merged = merged * rule.value_scale
    candidates = postprocessing.landmark_candidates(
        merged,
        geometry,
        max_candidates=rule.max_candidates,
        min_distance_vox=rule.min_distance_mm / spec.spacing_mm,
        min_max_value=rule.min_max_value,
        relative_threshold=rule.relative_threshold,
    )
    sequence = postprocessing.select_landmark_sequence(
        *candidates, postprocessing.column_z_range_mm(geometry)
    )
    logger.debug("landmark sequence mode %s, %d valid", sequence.mode, sequence.valid.sum())
    return candidates, sequence


def _fuse(fusion, prob: Volume, label: int, target: Geometry, threshold: float = 0.5) -> None:
    """Resample one vertebra's probabilities onto the part of ``target`` they can win and fuse.

    Only voxels with probability > 0.5 can beat the background's 0.5, and a linearly interpolated
    value > 0.5 needs a grid neighbour > 0.5, so the source is cut to the bounding box of those
    voxels plus one voxel; the result equals resampling the whole crop. A fusion that keeps
    probabilities below 0.5 passes ``threshold=0`` (every voxel with a positive probability).
    """
    above = np.argwhere(prob.array > threshold)
    if above.size == 0:
        return
    low, high = above.min(axis=0) - 1, above.max(axis=0) + 2
    source = cut_box(prob, low, high - low, pad_value=0.0)
    index = target.physical_to_index(source.geometry.corners_mm())
    lo = np.maximum(np.floor(index.min(axis=0) - 1e-6).astype(np.int64), 0)
    hi = np.minimum(np.ceil(index.max(axis=0) + 1e-6).astype(np.int64) + 1, target.size)
    if np.any(hi <= lo):
        return
    origin = target.index_to_physical(lo.astype(np.float64))
    sub = Geometry(tuple(hi - lo), target.spacing_mm, tuple(origin), target.direction)
    resampled = preprocessing.resample(source, sub, interpolation="linear", default_value=0.0)
    fusion.add(label, resampled.array, offset=tuple(lo))


def predict_segmentation(
    volume: Volume,
    points_mm,
    valid,
    stage: StageModel,
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
    stage: StageModel,
    target: Geometry,
    *,
    batch_size: int = 1,
    keep_low_probabilities: bool = False,
) -> postprocessing.LabelFusion:
    """`predict_segmentation`'s fusion itself: labels and the per-voxel winning probability.

    Args:
        keep_low_probabilities: also keep probabilities <= 0.5 (`LabelFusion`); each crop is then
            resampled whole instead of only where it can win. Other arguments as
            `predict_segmentation`.
    """
    spec = stage.spec
    crop = spec.crop_size
    segment = stage.apply_fn("sigmoid")
    fusion = postprocessing.LabelFusion(target.size, keep_low_probabilities=keep_low_probabilities)
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
            prob = postprocessing.largest_component(probs[row])
            _fuse(fusion, Volume(prob, grids[row]), index_to_label(k), target, threshold)
    return fusion


@dataclass(frozen=True)
class CasePrediction:
    """Everything `predict_case_details` found in one CT.

    Attributes:
        centroids: VerSe ids and LPS mm points of the found vertebrae.
        mask: uint16 label Volume with exactly the input's geometry.
        landmark_values: (N,) float64 heatmap peak value of each centroid, in `centroids` order.
        candidates: the landmark candidates of stage 2 (`postprocessing.LandmarkCandidates`).
        sequence: the landmark sequence selected from them.
        confidence: the labelling against its one-level alternatives (`label_confidence`).
        probabilities: float16 Volume on the input grid, the highest vertebra probability per
            voxel (the winning label's where the mask is not 0), or None if not asked for.
    """

    centroids: Centroids
    mask: Volume
    landmark_values: np.ndarray
    candidates: postprocessing.LandmarkCandidates
    sequence: postprocessing.LandmarkSequence
    confidence: LabelConfidence
    probabilities: Volume | None = None


def predict_case(
    image: Volume,
    bundle: Bundle,
    *,
    overlap_z: int | None = None,
    window_batch_size: int = 1,
    seg_batch_size: int = 1,
) -> tuple[Centroids, Volume]:
    """The whole pipeline on one CT.

    Args:
        image: CT in HU, (x, y, z), any geometry (oblique too).
        bundle: the three loaded stages (``bundle.load_bundle``).
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
        bundle,
        overlap_z=overlap_z,
        window_batch_size=window_batch_size,
        seg_batch_size=seg_batch_size,
    )
    return result.centroids, result.mask


def predict_case_details(
    image: Volume,
    bundle: Bundle,
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
        margin_threshold: `label_confidence`'s flag threshold (margin per vertebra).
        volumes: `prepare_case(image, bundle)` when already computed (then not computed again).
        Other arguments as `predict_case`.

    Raises:
        ValueError: not a CT; NoSpineFoundError: no spine or no vertebra found.
    """
    times = {}
    tic = time.perf_counter()
    if volumes is None:
        volumes = prepare_case(image, bundle)
    times["preprocessing"], tic = time.perf_counter() - tic, time.perf_counter()
    spine_mm = predict_spine(volumes["spine"], bundle.spine)
    times["spine"], tic = time.perf_counter() - tic, time.perf_counter()
    candidates, sequence = predict_landmark_sequence(
        volumes["scn"], spine_mm, bundle.scn, overlap_z=overlap_z, batch_size=window_batch_size
    )
    points_mm, valid = sequence.points_mm, sequence.valid
    times["landmarks"], tic = time.perf_counter() - tic, time.perf_counter()
    if not np.any(valid):
        raise NoSpineFoundError("no vertebra found: no landmark passed the sequence selection")
    fusion = fuse_segmentation(
        volumes["seg"],
        points_mm,
        valid,
        bundle.seg,
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
