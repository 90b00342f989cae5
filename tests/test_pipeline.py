"""predict_case end to end with tiny random bundles, and the exact pieces it is built from."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from verse_jax import metrics, models, phantoms, preprocessing, stages, testing
from verse_jax.data import samples
from verse_jax.geometry import Geometry, Volume
from verse_jax.infer import bundle, candidates, fusion, inputs, predict
from verse_jax.infer import sliding_window as windows
from verse_jax.models import registry
from verse_jax.models.registry import StageNetwork
from verse_jax.stages import StageGrid

GRIDS = {
    "spine": {"spacing_mm": 16.0, "crop_size": (16, 16, 32), "smoothing_mm": 3.0},
    "scn": {"spacing_mm": 8.0, "crop_size": (12, 12, 16), "smoothing_mm": 0.75},
    "seg": {"spacing_mm": 4.0, "crop_size": (16, 16, 12), "smoothing_mm": 0.75},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    testing.random_bundle(path, grids=GRIDS, seed=1, network_kwargs={"conv_impl": "lax"})
    return bundle.load_bundle(path)


def _phantom(orientation, seed=0):
    return phantoms.generate_phantom(
        seed, fov="lumbar", spacing_mm=(4.0, 4.0, 4.0), orientation=orientation, max_voxels=40**3
    )


@pytest.mark.parametrize("orientation", ["RAS", "PIR", "oblique"])
def test_predict_case_keeps_input_geometry(tiny, orientation):
    image = _phantom(orientation).image
    centroids, mask = predict.predict_case(image, tiny, overlap_z=8, seg_batch_size=4)
    assert mask.geometry == image.geometry  # size, spacing, origin, direction: exactly
    assert mask.array.shape == image.array.shape and mask.array.dtype == np.uint16
    assert len(centroids.labels) > 0
    assert set(np.unique(mask.array).tolist()) <= {0, *centroids.labels.tolist()}
    assert set(centroids.labels.tolist()) <= set(range(1, 26))


def test_predict_case_details_adds_values_confidence_and_probabilities(tiny):
    image = _phantom("PIR").image
    centroids, mask = predict.predict_case(image, tiny, overlap_z=8, seg_batch_size=4)
    result = predict.predict_case_details(
        image, tiny, overlap_z=8, seg_batch_size=4, keep_probabilities=True
    )
    np.testing.assert_array_equal(result.mask.array, mask.array)  # low probabilities kept: same
    np.testing.assert_array_equal(result.centroids.points_mm, centroids.points_mm)
    sequence = result.sequence
    np.testing.assert_array_equal(result.landmark_values, sequence.values[sequence.valid])
    assert np.all(result.landmark_values > 0)
    rows = np.arange(sequence.choice.size)[sequence.valid]
    chosen = result.candidates.values[rows, sequence.choice[sequence.valid]]
    np.testing.assert_array_equal(result.landmark_values, chosen)
    assert result.confidence.labels == tuple(centroids.labels.tolist())
    prob = result.probabilities
    assert prob.geometry == image.geometry and prob.array.dtype == np.float16
    labelled = mask.array > 0
    assert np.all(prob.array[labelled] >= 0.5) and np.all(prob.array[~labelled] <= 0.5)
    assert np.all(prob.array >= 0) and np.any((prob.array > 0) & (prob.array < 0.5))


def test_stage_volumes_equal_to_stage_grid():
    image = _phantom("oblique").image
    grids = {"a": StageGrid(8.0, (8, 8, 8), 0.75), "b": StageGrid(5.0, (8, 8, 8), 0.75)}
    volumes = inputs.stage_volumes(image, grids)
    for name, grid in grids.items():
        expected = preprocessing.to_stage_grid(
            image, spacing_mm=grid.spacing_mm, smoothing_mm=grid.smoothing_mm
        )
        assert volumes[name].geometry == expected.geometry
        np.testing.assert_array_equal(volumes[name].array, expected.array)


def test_cut_box_pads_and_keeps_physical_positions():
    grid = Geometry((4, 3, 2), (2.0, 2.0, 2.0), (10.0, 20.0, 30.0))
    volume = Volume(np.arange(24, dtype=np.float32).reshape(4, 3, 2), grid)
    box = fusion.cut_box(volume, (-1, 1, 0), (3, 3, 2), pad_value=-7.0)
    assert box.geometry == Geometry((3, 3, 2), (2.0, 2.0, 2.0), (8.0, 22.0, 30.0))
    np.testing.assert_array_equal(box.array[0], -7.0)
    np.testing.assert_array_equal(box.array[1:, :2], volume.array[:2, 1:])
    np.testing.assert_array_equal(box.array[:, 2], -7.0)


def test_fuse_equals_resampling_the_whole_crop():
    rng = np.random.default_rng(0)
    prob = np.zeros((12, 10, 8), np.float32)
    prob[3:8, 2:7, 2:6] = rng.uniform(0.3, 1.0, (5, 5, 4))
    crop = Volume(prob, Geometry.axis_aligned((1.0, 2.0, 3.0), (12, 10, 8), 1.0))
    angle = 0.3
    direction = (np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1)
    target = Geometry((15, 14, 9), (0.7, 0.8, 1.1), (-5.0, -3.0, -1.0), direction)
    fast = fusion.LabelFusion(target.size)
    fusion.fuse_crop(fast, crop, 5, target)
    dense = fusion.LabelFusion(target.size)
    dense.add(5, preprocessing.resample(crop, target, default_value=0.0).array)
    np.testing.assert_array_equal(fast.best_label, dense.best_label)
    np.testing.assert_array_equal(fast.best_prob, dense.best_prob)
    assert 0 < np.sum(fast.best_label == 5) < fast.best_label.size


def _with_output(stage, bias):
    params = jax.tree.map(lambda x: x, stage.params)
    params["output"] = {"kernel": jnp.zeros_like(params["output"]["kernel"]), "bias": bias}
    return dataclasses.replace(stage, params=params)


def test_predict_spine_centre_of_mass_and_no_spine(tiny):
    image = _phantom("RAS").image
    volume = inputs.stage_volumes(image, {"spine": tiny.spine.grid})["spine"]
    flat = _with_output(tiny.spine, jnp.ones((1,)))  # constant heatmap: centre of the data
    spine_mm = predict.predict_spine(volume, flat)
    center = volume.geometry.index_to_physical((np.asarray(volume.geometry.size) - 1) / 2)
    np.testing.assert_allclose(spine_mm, center, atol=volume.geometry.spacing_mm[0] / 2 + 1e-6)
    with pytest.raises(predict.NoSpineFoundError, match="no spine found"):
        predict.predict_spine(volume, _with_output(tiny.spine, -jnp.ones((1,))))


class _Shifted(nn.Module):
    """Outputs the CT channel + 0.45: air slightly negative, tissue positive (a signed map)."""

    @nn.compact
    def __call__(self, x, *, train):
        return x + 0.45


def test_predict_spine_uses_the_signed_heatmap(tiny):
    image = _phantom("oblique").image
    volume = inputs.stage_volumes(image, {"spine": tiny.spine.grid})["spine"]
    stage = dataclasses.replace(tiny.spine, model=_Shifted(), params={})
    spine_mm = predict.predict_spine(volume, stage)
    spec = tiny.spine.spec
    center = stages.crop_center_vox(spec, volume.geometry.size)
    x, origin = samples.prediction_input(volume.array, spec, center)
    heat = x[..., 0].astype(np.float64) + 0.45
    index = np.stack(np.meshgrid(*[np.arange(n) for n in heat.shape], indexing="ij"), -1)
    stage_index = index + origin
    inside = np.all((np.rint(stage_index) >= 0) & (np.rint(stage_index) < volume.geometry.size), -1)
    assert heat[inside].min() < 0 < heat[inside].max()
    for weights, close in ((heat, True), (np.maximum(heat, 0), False)):
        w = np.where(inside, weights, 0.0)
        com = volume.geometry.index_to_physical(
            (stage_index * w[..., None]).sum((0, 1, 2)) / w.sum()
        )
        assert np.allclose(spine_mm, com, atol=1e-6) == close


def test_check_ct_rejects_masks():
    mask = _phantom("RAS").mask
    with pytest.raises(ValueError, match="mask.nii.gz: does not look like a CT"):
        inputs.check_ct(mask, "mask.nii.gz")


def test_repeated_cases_do_not_recompile(tiny):
    image = _phantom("RAS").image  # shapes compiled by the RAS case above, if it ran

    def cache_sizes():
        return (
            registry._jitted_apply(tiny.spine.model, None)._cache_size(),
            registry._jitted_apply(tiny.seg.model, "sigmoid")._cache_size(),
            samples._jitted_network_input.cache_info().currsize,
            windows.sliding_window_cache_size(),
            candidates._find_per_channel._cache_size(),
        )

    first = predict.predict_case(image, tiny, overlap_z=8, seg_batch_size=4)
    sizes = cache_sizes()
    second = predict.predict_case(image, tiny, overlap_z=8, seg_batch_size=4)
    assert cache_sizes() == sizes
    np.testing.assert_array_equal(first[1].array, second[1].array)
    np.testing.assert_array_equal(first[0].points_mm, second[0].points_mm)


class _Oracle(nn.Module):
    """A parameter-free stand-in network that reads the answer off the synthetic CT below.

    Sphere k (VerSe id 18 + k) has intensity LEVELS_HU[k]; the spine net marks bright voxels, the
    SCN's channel (id - 1) marks that sphere's intensity band, the segmentation net marks bright
    voxels near the centroid channel; heatmaps are blurred so they peak at sphere centres.
    """

    kind: str

    @nn.compact
    def __call__(self, x, *, train):
        image = x[..., 0]
        if self.kind == "seg":
            inside = (image > -0.15) & (x[..., 1] > 0.01)  # about halfway from air to bone
            return jnp.where(inside, 10.0, -10.0)[..., None]
        if self.kind == "spine":
            # Not air: at 8 mm the crop samples the spheres between voxels (half-voxel centre).
            return _blur((image > -0.35).astype(jnp.float32)[..., None])
        levels = np.zeros(25, np.float32) - 9.0
        levels[17 : 17 + len(LEVELS_HU)] = np.asarray(LEVELS_HU) / 2048.0
        # +-70 HU (levels 150 HU apart): the column is sampled at the spine point's sub-voxel x-y
        # offset, which moves the small spheres' values at 4 mm by tens of HU
        band = jnp.abs(image[..., None] - jnp.asarray(levels)[None, None, None, None]) < 70 / 2048
        heat = 3.0 * _blur(band.astype(jnp.float32))  # peaks above the 0.25 threshold
        return models.SCNOutput(heat, heat, heat)


def _blur(x):
    """(b, x, y, z, c) -> the same, separable [1, 2, 3, 2, 1] / 9 filter, edge padded."""
    weights = (1.0, 2.0, 3.0, 2.0, 1.0)
    for axis in (1, 2, 3):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (2, 2)
        padded = jnp.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(w * lax.slice_in_dim(padded, i, i + n, axis=axis) for i, w in enumerate(weights))
        x = x / 9.0
    return x


LEVELS_HU = (300.0, 450.0, 600.0, 750.0, 900.0)


def _oracle_stage(kind, grid, channels):
    spec = stages.with_grid(kind, dataclasses.asdict(grid))
    assert spec.input_channels == channels
    return StageNetwork(spec=spec, model=_Oracle(kind), params={})


def test_predict_case_with_oracle_networks_finds_the_truth():
    angle = 0.2
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, 0.0, s, 0.0, 1.0, 0.0, -s, 0.0, c)  # oblique: rotated about y
    grid = Geometry((44, 40, 90), (2.0, 2.0, 2.5), (-40.0, -40.0, -110.0), direction)
    center = grid.index_to_physical((np.asarray(grid.size) - 1) / 2)
    truth = center + np.array([[0.0, 0.0, 60.0 - 30.0 * k] for k in range(5)])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij"), -1)
    points = grid.index_to_physical(index)
    image = np.full(grid.size, -1000.0, np.float32)
    labels = np.zeros(grid.size, np.uint16)
    for k, point in enumerate(truth):
        inside = np.sum((points - point) ** 2, axis=-1) <= 9.0**2
        image[inside], labels[inside] = LEVELS_HU[k], 18 + k
    oracle = predict.Networks(
        spine=_oracle_stage("spine", StageGrid(8.0, (16, 16, 32), 3.0), 1),
        scn=_oracle_stage("scn", StageGrid(4.0, (16, 16, 32), 0.75), 1),
        seg=_oracle_stage("seg", StageGrid(2.0, (32, 32, 24), 0.75), 2),
    )
    centroids, mask = predict.predict_case(Volume(image.astype(np.int16), grid), oracle)
    assert centroids.labels.tolist() == [18, 19, 20, 21, 22]
    np.testing.assert_allclose(centroids.points_mm, truth, atol=2.0)
    assert mask.geometry == grid
    scores = metrics.segmentation_metrics(mask.array, labels, grid.spacing_mm)
    assert min(scores.dice.values()) > 0.9 and not scores.extra_labels
