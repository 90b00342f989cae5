"""Per-stage samples: host side (context box + random numbers) and device side (jit-able transform).

Host, per sample: the crop centre of the stage (``stages.crop_center_vox``), augmentation
parameters from a numpy generator, and a fixed-size context box of the cached stage volume around
the centre (padded with the outside value where it leaves the volume). Raw sample (numpy; batched by
the pipeline with a leading batch axis B)::

    image          (bx, by, bz) float16  context box of the normalised CT
    center_vox     (3,) float32          crop centre C + f in box voxels (translation not included)
    landmarks_vox  (K, 3) float32        landmarks in box voxels ("spine", "scn")
    valid          (K,) bool
    mask           (bx, by, bz) uint8    landmark-mask box ("scn")
    label          (bx, by, bz) uint8    box of the VerSe label mask ("seg")
    label_id       () int32              VerSe id of the sample's vertebra ("seg")
    heatmap_vox    (1, 3) float32        jittered centroid in box voxels ("seg"); heatmap_valid (1,)
    params         dict of AugmentParams fields (see ``augmentation``)
    case_index     () int32; example_mask () bool (False for padding in evaluation batches)

Device: ``make_device_transform(spec)`` returns ``fn(raw_batch) -> batch`` in the formats of
INTERFACES.md (channels last, float32 unless noted), plus ``example_mask (B,) bool``.

Prediction cuts its network inputs with ``prediction_input``: the same host box and the same
device sampling (``network_input``) with identity parameters, so that a prediction input equals
the training sample of the same crop centre without augmentation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from verse_jax import heatmaps, stages
from verse_jax.data import augmentation as aug
from verse_jax.data.cache import StageCase
from verse_jax.labels import VALID_LABELS, index_to_label
from verse_jax.stages import StageSpec


def box_size(spec: StageSpec, volume_sizes, *, train: bool) -> tuple[int, int, int]:
    """Static context box size of a stage: worst case of the ranges, capped per axis at the largest
    stage volume (a box at least as large as the volume holds all of it).

    Args:
        spec: stage settings.
        volume_sizes: (N, 3) sizes of the data set's stage volumes (voxels).
        train: with augmentation ranges (True) or identity only (False).
    """
    ranges = spec.augment if train else aug.AugmentRanges.none(spec.augment.control_points)
    worst = np.asarray(aug.context_box_size(spec.crop_size, spec.spacing_mm, ranges))
    largest = np.max(np.asarray(volume_sizes, np.int64).reshape(-1, 3), axis=0)
    return tuple(int(v) for v in np.minimum(worst, largest))


def cut_box(volume: np.ndarray, start, size, pad_value) -> np.ndarray:
    """(size) copy of ``volume[start : start + size]``, ``pad_value`` outside the volume."""
    start, size = np.asarray(start, np.int64), np.asarray(size, np.int64)
    out = np.full(tuple(size), pad_value, dtype=volume.dtype)
    low = np.maximum(start, 0)
    high = np.minimum(start + size, volume.shape)
    if np.all(high > low):
        src = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
        dst = tuple(slice(a, b) for a, b in zip(low - start, high - start, strict=True))
        out[dst] = volume[src]
    return out


def _box_start(center_vox, size, volume_shape) -> np.ndarray:
    """Box start (stage voxels): around the centre, or holding the whole volume on axes where the
    box is at least the volume's size."""
    size, shape = np.asarray(size), np.asarray(volume_shape)
    around = aug.context_box_start(center_vox, size)
    whole = -((size - shape) // 2)
    return np.where(size >= shape, whole, around)


def _identity_box_size(crop_size, spacing_mm: float, volume_shape) -> tuple[int, int, int]:
    worst = np.asarray(aug.context_box_size(crop_size, spacing_mm, aug.AugmentRanges.none()))
    return tuple(int(v) for v in np.minimum(worst, np.asarray(volume_shape, np.int64)))


def _host_input(volume, spec: StageSpec, center, params, size, point_vox=None):
    """``(raw, start)``: the context box around ``center`` (stage voxels) and what the device
    needs to sample it; ``start`` is the box's first voxel in the volume."""
    start = _box_start(center + params.translation_mm / spec.spacing_mm, size, volume.shape)
    raw = {
        "image": np.asarray(cut_box(volume, start, size, aug.OUTSIDE_VALUE), np.float16),
        "center_vox": (center - start).astype(np.float32),
        "params": params._asdict(),
    }
    if point_vox is not None:
        raw["heatmap_vox"] = (np.asarray(point_vox) - start)[None, :].astype(np.float32)
        raw["heatmap_valid"] = np.ones((1,), bool)
    return raw, start


def host_sample(
    case: StageCase,
    spec: StageSpec,
    size,
    rng: np.random.Generator | None,
    *,
    vertebra: int = -1,
    case_index: int = 0,
) -> dict:
    """One raw sample (see the module docstring); ``rng`` None gives the identity (evaluation)."""
    if spec.name == "seg" and not (0 <= vertebra < len(case.valid) and case.valid[vertebra]):
        raise ValueError(f"case {case.case_id}: landmark {vertebra} is not a valid vertebra")
    column_xy = None
    if spec.name == "scn" and case.valid.any():
        column_xy = case.landmarks_vox[case.valid, :2].mean(axis=0)
    centroid = case.landmarks_vox[vertebra] if spec.name == "seg" else None
    center = stages.crop_center_vox(
        spec, case.image.shape, column_xy_vox=column_xy, centroid_vox=centroid, rng=rng
    )
    if rng is None:
        params = aug.identity_params(spec.augment.control_points)
    else:
        params = aug.sample_params(rng, spec.augment)
    point = None
    if spec.name == "seg":
        jitter = 0.0 if rng is None else rng.uniform(-1, 1, 3) * spec.landmark_jitter_mm
        point = case.landmarks_vox[vertebra] + jitter / spec.spacing_mm
    sample, start = _host_input(case.image, spec, center, params, size, point)
    sample |= {"case_index": np.int32(case_index), "example_mask": np.bool_(True)}
    if spec.name in ("spine", "scn"):
        sample["landmarks_vox"] = (case.landmarks_vox - start[None, :]).astype(np.float32)
        sample["valid"] = np.asarray(case.valid, bool)
    if spec.name == "scn":
        sample["mask"] = cut_box(case.landmark_mask, start, size, np.uint8(0))
    if spec.name == "seg":
        sample["label"] = cut_box(case.labels, start, size, np.uint8(0))
        sample["label_id"] = np.int32(index_to_label(vertebra))
    return sample


def network_input(spec: StageSpec, raw: dict, crop_size=None):
    """Device: the network input of one raw sample and its sampling grid.

    Returns ``(image (x, y, z, C) float32, grid (x, y, z, 3))``: the CT channel sampled linearly
    at the augmented positions with the intensity augmentation, and for "seg" the peak-1 centroid
    Gaussian (``spec.heatmap_sigma_vox``, the reference's truncated window) at the centroid
    carried into the crop.
    """
    crop_size = spec.crop_size if crop_size is None else tuple(crop_size)
    params = aug.AugmentParams(**raw["params"])
    s = spec.spacing_mm
    grid = aug.sampling_grid_vox(params, raw["center_vox"], crop_size, s)
    image = aug.apply_intensity(aug.apply_cubic(raw["image"], grid), params)[..., None]
    if spec.name == "seg":
        point, valid = aug.apply_landmarks(
            params, raw["center_vox"], grid, raw["heatmap_vox"], raw["heatmap_valid"], s
        )
        heat = heatmaps.gaussian_heatmaps(
            point,
            valid,
            spec.heatmap_sigma_vox,
            crop_size,
            scale=1.0,
            normalize=False,
            window=heatmaps.NUMPY_WINDOW_SIGMAS,
        )
        image = jnp.concatenate([image, heat.astype(jnp.float32)], axis=-1)
    return image, grid


def _transform_one(spec: StageSpec, raw: dict, train: bool = True) -> dict:
    params = aug.AugmentParams(**raw["params"])
    s = spec.spacing_mm
    image, grid = network_input(spec, raw)
    out = {"image": image, "example_mask": raw["example_mask"]}
    if spec.name in ("spine", "scn"):
        points, valid = aug.apply_landmarks(
            params, raw["center_vox"], grid, raw["landmarks_vox"], raw["valid"], s
        )
        out |= {"landmarks_vox": points, "valid": valid}
    if spec.name == "scn":
        out["mask"] = aug.apply_nearest(raw["mask"], grid)[..., None]
    if spec.name == "seg":
        labels = aug.apply_nearest(raw["label"], grid).astype(jnp.int32)
        # Evaluation scores against the ground-truth label; the smoothing is training-only.
        sigma = spec.target_smoothing_vox if train else 0.0
        target = segmentation_target(labels, raw["label_id"], sigma)
        out["label"] = target.astype(jnp.float32)[..., None]
    return out


# Channels of the smoothed one-hot target: background and every VerSe id.
_TARGET_IDS = (0, *sorted(VALID_LABELS))


def segmentation_target(labels, label_id, sigma_vox: float):
    """(x, y, z) bool target of one vertebra from its crop's label map (device, jit-able).

    ``sigma_vox`` 0: ``labels == label_id``. Otherwise (docs/reference.md §6.2): one channel per
    id of ``_TARGET_IDS`` (background and every VerSe id), each smoothed with a Gaussian of
    ``sigma_vox`` voxels, argmax over the channels, then the vertebra's channel: the boundary of
    every vertebra is smoothed against its neighbours and the background, and the target stays
    binary.
    """
    if sigma_vox == 0:
        return labels == label_id
    ids = jnp.asarray(_TARGET_IDS, jnp.int32)
    one_hot = (labels[..., None] == ids[None, None, None, :]).astype(jnp.float32)
    mx, my, mz = (jnp.asarray(heatmaps.blur_matrix(n, float(sigma_vox))) for n in labels.shape)
    one_hot = jnp.einsum("ai,bj,ck,ijkl->abcl", mx, my, mz, one_hot, precision="highest")
    winner = ids[jnp.argmax(one_hot, axis=-1)]
    return winner == label_id


@functools.lru_cache(maxsize=32)
def _jitted_network_input(spec: StageSpec, crop_size: tuple[int, int, int]):
    return jax.jit(lambda raw: network_input(spec, raw, crop_size)[0])


def prediction_input(
    volume, spec: StageSpec, center_vox, *, crop_size=None, centroid_vox=None
) -> tuple[np.ndarray, np.ndarray]:
    """The network input of a prediction: ``network_input`` with identity parameters.

    Args:
        volume: (x, y, z) normalised stage volume (stored as float16, as the training cache).
        spec: the stage.
        center_vox: (3,) crop centre in stage voxels (``stages.crop_center_vox``).
        crop_size: None (the stage's crop) or another size (the SCN's whole column).
        centroid_vox: "seg": (3,) the vertebra centroid in stage voxels.

    Returns:
        ``(x (x, y, z, C) float32, origin_vox (3,))``: crop voxel ``j`` samples stage voxel
        ``origin_vox + j``.
    """
    crop_size = spec.crop_size if crop_size is None else tuple(int(v) for v in crop_size)
    center = np.asarray(center_vox, np.float64)
    size = _identity_box_size(crop_size, spec.spacing_mm, np.shape(volume))
    params = aug.identity_params(spec.augment.control_points)
    raw, _ = _host_input(np.asarray(volume), spec, center, params, size, centroid_vox)
    x = np.asarray(_jitted_network_input(spec, crop_size)(raw))
    return x, center - (np.asarray(crop_size, np.float64) - 1) / 2


def make_device_transform(spec: StageSpec, *, train: bool = True):
    """Returns the jit-able ``fn(raw_batch) -> batch`` of a stage (vmapped over the batch).

    The same function serves training (random parameters in the raw batch) and evaluation
    (identity parameters); shapes are static given the raw batch's shapes. With ``train=False``
    (validation) the "seg" label is the ground-truth crop, not the smoothed training target
    (``StageSpec.target_smoothing_vox``): validation scores what prediction is judged on.
    Output (B leading):
    "spine": image (B, x, y, z, 1), landmarks_vox (B, K, 3), valid (B, K) bool;
    "scn": the same plus mask (B, x, y, z, 1); "seg": image (B, x, y, z, 2) (CT, centroid
    Gaussian with peak 1), label (B, x, y, z, 1) in {0, 1}; all with example_mask (B,) bool.
    """

    def transform(raw_batch: dict) -> dict:
        return jax.vmap(lambda raw: _transform_one(spec, raw, train))(raw_batch)

    return transform
