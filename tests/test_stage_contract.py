"""The stage contract: a training sample without augmentation is the prediction input.

For each stage, on a phantom and on an oblique phantom: the sample that training cuts from the
stage cache with identity parameters equals (1e-4, normalised units) the input that prediction
cuts from the CT, and the training landmark targets are in the frame of the prediction crop. A
stage exported with a non-default definition is applied with that definition.
"""

import dataclasses
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from verse_jax import io, phantoms, stages, testing
from verse_jax.data import cache as stage_cache
from verse_jax.data import samples
from verse_jax.geometry import Geometry, Volume
from verse_jax.infer import bundle, inputs, predict
from verse_jax.models import registry

SPECS = {
    "spine": stages.StageSpec("spine", 8.0, (16, 16, 32), 3.0, num_landmarks=26),
    "scn": stages.StageSpec("scn", 4.0, (16, 16, 24), 1.0, num_landmarks=26),
    "seg": stages.StageSpec(
        "seg", 2.0, (24, 24, 16), 0.75, num_landmarks=26, posterior_offset_mm=12.0
    ),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    out = []
    for seed, orientation in ((0, "RAS"), (1, "oblique")):
        phantom = phantoms.generate_phantom(
            seed, fov="lumbar", spacing_mm=(2.0, 2.0, 3.0), orientation=orientation,
            max_voxels=48**3,
        )  # fmt: skip
        case_id = f"c{seed}"
        image_path, ctd_path = root / f"{case_id}_ct.nii.gz", root / f"{case_id}_ctd.json"
        mask_path = root / f"{case_id}_msk.nii.gz"
        io.write_volume(image_path, phantom.image)
        io.write_mask(mask_path, phantom.mask)
        io.write_centroids(ctd_path, phantom.centroids, phantom.image.geometry)
        out.append(io.Case(case_id, image_path, mask_path, ctd_path))
    return root, out


def _training_sample(case, spec, cache_dir, vertebra=-1):
    cached = stage_cache.load_stage_case(stage_cache.build_stage_case(case, spec, cache_dir))
    size = samples.box_size(spec, [cached.image.shape], train=False)
    raw = samples.host_sample(cached, spec, size, None, vertebra=vertebra)
    batch = jax.jit(samples.make_device_transform(spec))(jax.tree.map(lambda a: a[None], raw))
    return cached, jax.tree.map(lambda a: np.asarray(a[0]), batch)


def _truth_mm(case, spec):
    image = io.read_volume(case.image_path)
    centroids = io.read_centroids(case.centroids_path, image.geometry)
    points_mm, valid = io.centroids_to_landmarks(centroids, spec.num_landmarks)
    return image, points_mm, valid


def _assert_landmarks_in_frame(batch, geometry, points_mm, valid):
    """Training landmark targets (crop voxels) are the true points in the prediction frame."""
    both = batch["valid"] & valid
    assert both.sum() >= 2
    got = geometry.index_to_physical(batch["landmarks_vox"][both].astype(np.float64))
    np.testing.assert_allclose(got, points_mm[both], atol=1e-3)


@pytest.mark.parametrize("index", [0, 1], ids=["RAS", "oblique"])
@pytest.mark.parametrize("name", ["spine", "scn", "seg"])
def test_training_sample_equals_prediction_input(cases, tmp_path, name, index):
    _, all_cases = cases
    case = all_cases[index]
    spec = SPECS[name]
    image, points_mm, valid = _truth_mm(case, spec)
    volume = inputs.stage_volumes(image, {name: spec})[name]
    shape = volume.geometry.size
    if name == "spine":
        cached, batch = _training_sample(case, spec, tmp_path)
        center = stages.crop_center_vox(spec, shape)
        x, origin = samples.prediction_input(volume.array, spec, center)
        geometry = predict._crop_geometry(volume, origin, spec.crop_size)
        _assert_landmarks_in_frame(batch, geometry, points_mm, valid)
    elif name == "scn":
        # The column's windows start at whole slices; the evaluation slab is centred, so its
        # start (Z - crop_z) / 2 is whole when Z - crop_z is even.
        crop_z = spec.crop_size[2] + (shape[2] - spec.crop_size[2]) % 2
        spec = dataclasses.replace(spec, crop_size=(*spec.crop_size[:2], crop_z))
        cached, batch = _training_sample(case, spec, tmp_path)
        spine_mm = points_mm[valid].mean(axis=0)  # the training column centre, as stage 1 output
        xy = volume.geometry.physical_to_index(spine_mm)[:2]
        center = stages.crop_center_vox(spec, shape, column_xy_vox=xy)
        size = (*spec.crop_size[:2], shape[2])
        column, origin = samples.prediction_input(volume.array, spec, center, crop_size=size)
        assert origin[2] == 0.0
        first = (shape[2] - crop_z) // 2
        x = column[:, :, first : first + crop_z]
        geometry = predict._crop_geometry(volume, origin + (0, 0, first), spec.crop_size)
        _assert_landmarks_in_frame(batch, geometry, points_mm, valid)
        assert batch["mask"].shape == (*spec.crop_size, 1)
    else:
        k = int(np.flatnonzero(valid)[len(np.flatnonzero(valid)) // 2])
        cached, batch = _training_sample(case, spec, tmp_path, vertebra=k)
        point = volume.geometry.physical_to_index(points_mm[k])
        center = stages.crop_center_vox(spec, shape, centroid_vox=point)
        x, origin = samples.prediction_input(volume.array, spec, center, centroid_vox=point)
        geometry = predict._crop_geometry(volume, origin, spec.crop_size)
        peak = np.unravel_index(np.argmax(batch["image"][..., 1]), spec.crop_size)
        peak_mm = geometry.index_to_physical(np.asarray(peak, np.float64))
        assert np.linalg.norm(peak_mm - points_mm[k]) < spec.spacing_mm
        assert batch["label"].sum() > 0  # the crop holds its vertebra
    assert cached.geometry == volume.geometry
    assert x.shape == batch["image"].shape == (*spec.crop_size, spec.input_channels)
    np.testing.assert_allclose(x, batch["image"], atol=1e-4, rtol=0)
    assert float(np.std(x[..., 0])) > 0.01  # not a padded box


class _SegOracle(nn.Module):
    """Segments a ball of 5 mm around where a network trained with ``spec`` sees the centroid:
    ``posterior_offset_mm`` before the crop centre, and only where the centroid channel has the
    trained ``heatmap_sigma_vox`` (as a trained network would depend on both)."""

    spec: stages.StageSpec

    @nn.compact
    def __call__(self, x, *, train):
        s = self.spec
        c_out = (np.asarray(s.crop_size, np.float64) - 1) / 2
        expected = c_out - np.array([0.0, s.posterior_offset_mm, 0.0]) / s.spacing_mm
        grids = np.stack(np.meshgrid(*[np.arange(n) for n in s.crop_size], indexing="ij"), -1)
        d2 = np.sum((grids - expected) ** 2, axis=-1)
        ball = jnp.asarray(d2 * s.spacing_mm**2 <= 5.0**2)
        gauss = jnp.asarray(np.exp(-d2 / (2 * s.heatmap_sigma_vox**2)))
        agrees = jnp.abs(x[..., 1] - gauss[None]) < 0.02
        return jnp.where(ball[None] & agrees, 10.0, -10.0)[..., None]


def _seg_export(tmp_path, spec):
    """A seg export of ``spec`` whose network is replaced by the oracle after loading."""
    model = bundle.build_model(spec.factory, {"preset": "tiny", "conv_impl": "lax"})
    params = testing.random_params(registry.abstract_params(model, spec.crop_size, 2), seed=0)
    path = bundle.export_stage(
        tmp_path / "seg", spec=spec, factory_kwargs={"preset": "tiny", "conv_impl": "lax"},
        params=params,
    )  # fmt: skip
    return path


def test_non_default_definition_is_exported_and_applied(tmp_path):
    spec = dataclasses.replace(SPECS["seg"], posterior_offset_mm=9.0, heatmap_sigma_vox=2.0)
    path = _seg_export(tmp_path, spec)
    loaded = bundle.load_stage(path)
    assert loaded.spec == spec  # the whole definition, not only the grid
    grid = Geometry((40, 40, 30), (2.0, 2.0, 2.0), (-40.0, -40.0, -30.0))
    centroid = np.array([[1.0, -3.0, 2.0]])
    volume = Volume(np.zeros(grid.size, np.float32), grid)

    def segment(stage):
        stage = dataclasses.replace(stage, model=_SegOracle(spec), params={})
        labels = predict.predict_segmentation(volume, centroid, [True], stage, grid)
        return np.argwhere(labels == 1)

    found = segment(loaded)
    assert len(found) > 20
    np.testing.assert_allclose(grid.index_to_physical(found.mean(0).astype(float)), centroid[0],
                               atol=0.5)  # fmt: skip
    # The same export read as a version-1 file gets the default definition: the oracle, like a
    # network trained with offset 9 mm and sigma 2, no longer finds its vertebra.
    meta = json.loads((path / "stage.json").read_text())
    meta |= {"version": 1, "grid": spec.grid, "num_landmarks": 26, "input_channels": 2}
    del meta["definition"]
    (path / "stage.json").write_text(json.dumps(meta))
    old = bundle.load_stage(path)
    assert old.spec == stages.with_grid("seg", spec.grid, 26)
    assert len(segment(old)) == 0


def test_definition_round_trip_and_clear_errors(tmp_path):
    spec = dataclasses.replace(
        SPECS["scn"], mask_margin_rule="slices_per_mm",
        candidates=stages.CandidateRule(min_distance_mm=10.0, max_candidates=12),
    )  # fmt: skip
    assert stages.StageSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    bad = spec.to_dict() | {"definition_version": 7}
    with pytest.raises(ValueError, match="x.json: stage definition version 7 is not supported"):
        stages.StageSpec.from_dict(bad, "x.json")
    bad = spec.to_dict() | {"sigma": 3}
    with pytest.raises(ValueError, match=r"unknown fields \['sigma'\]"):
        stages.StageSpec.from_dict(bad, "x.json")
    path = _seg_export(tmp_path, SPECS["seg"])
    meta = json.loads((path / "stage.json").read_text())
    meta["definition"]["name"] = "scn"
    (path / "stage.json").write_text(json.dumps(meta))
    with pytest.raises(bundle.BundleError, match="stage 'seg' but its definition is 'scn'"):
        bundle.load_stage(path)
    meta["version"] = 3
    (path / "stage.json").write_text(json.dumps(meta))
    with pytest.raises(bundle.BundleError, match="version 3 is not supported"):
        bundle.load_stage(path)


def test_landmark_mask_margin_rules():
    # The original zeroes int(25 * h_z) slices at each z end (25 h_z^2 mm); "mm" zeroes 25 mm.
    paper = stages.SCN_PAPER
    assert paper.mask_margin_rule == "slices_per_mm"
    assert (
        stages.mask_margin_slices(paper, 3.0) == 75 and stages.mask_margin_slices(paper, 0.8) == 20
    )
    mm = dataclasses.replace(paper, mask_margin_rule="mm")
    assert stages.mask_margin_slices(mm, 3.0) == 8 and stages.mask_margin_slices(mm, 0.8) == 31
    assert stages.mask_margin_slices(paper, 1.0) == stages.mask_margin_slices(mm, 1.0) == 25
    assert paper.cache_key() != mm.cache_key()  # the two masks are cached apart


def test_window_pad_value_is_part_of_the_definition():
    # demo-style definitions pad short SCN columns as the training crops (-1024 HU); the paper's
    # keeps the reference's -1; definitions of version 1 were predicted with -1
    assert stages.StageSpec("scn", 4.0, (8, 8, 8), 1.0).window_pad_value == -0.5
    assert stages.SCN_PAPER.window_pad_value == -1.0
    old = SPECS["scn"].to_dict() | {"definition_version": 1}
    del old["window_pad_value"]
    assert stages.StageSpec.from_dict(old).window_pad_value == -1.0


@pytest.mark.parametrize("pad", [-0.5, -1.0])
def test_short_scn_column_is_padded_with_the_definition_value(pad, monkeypatch):
    from verse_jax.infer import sliding_window as windows

    seen = {}

    def fake_sliding_window(apply, column, *, window_z, overlap_z, batch_size, pad_value):
        seen["pad"] = pad_value
        return jnp.zeros((*column.shape[:3], SPECS["scn"].num_landmarks))

    monkeypatch.setattr(windows, "sliding_window", fake_sliding_window)
    spec = dataclasses.replace(SPECS["scn"], window_pad_value=pad)
    stage = types.SimpleNamespace(spec=spec, apply_partial=lambda kind: None)
    geometry = Geometry((20, 20, 6), (spec.spacing_mm,) * 3, (0.0, 0.0, 0.0))
    volume = Volume(np.zeros(geometry.size, np.float32), geometry)
    predict.predict_landmark_sequence(volume, np.zeros(3), stage)
    assert seen["pad"] == pad


def test_segmentation_target_smooths_every_label_then_takes_the_argmax():
    # brute force: one channel per id, scipy Gaussian (sigma 1 voxel, mode nearest, truncate 4 as
    # the reference's skimage call), argmax, the vertebra's channel
    from scipy import ndimage

    from verse_jax.data import samples

    rng = np.random.default_rng(0)
    labels = np.zeros((20, 22, 24), np.int32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij"), -1)
    for label in (18, 19, 20, 28):
        centre, radius = rng.uniform(4, 18, 3), rng.uniform(3, 6)
        labels[np.linalg.norm(grid - centre, axis=-1) < radius] = label
    labels[rng.uniform(size=labels.shape) < 0.02] = 19  # speckle: removed by the smoothing
    ids = np.asarray(samples._TARGET_IDS)
    smoothed = np.stack([
        ndimage.gaussian_filter((labels == i).astype(np.float64), 1.0, mode="nearest", truncate=4)
        for i in ids
    ], axis=-1)  # fmt: skip
    top2 = np.sort(smoothed, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-5  # float32 may break exact ties otherwise
    target = jax.jit(samples.segmentation_target, static_argnums=2)
    for label in (18, 19, 20, 28):
        expected = ids[np.argmax(smoothed, axis=-1)] == label
        got = np.asarray(target(jnp.asarray(labels), label, 1.0))
        np.testing.assert_array_equal(got[decided], expected[decided])
        assert 0 < expected.sum() < (labels == label).sum()  # boundaries smoothed away
    raw = np.asarray(target(jnp.asarray(labels), 19, 0.0))
    np.testing.assert_array_equal(raw, labels == 19)


def test_definitions_before_version_3_were_trained_without_target_smoothing():
    assert SPECS["seg"].target_smoothing_vox == stages.SEG_PAPER.target_smoothing_vox == 1.0
    old = SPECS["seg"].to_dict() | {"definition_version": 2}
    del old["target_smoothing_vox"]
    assert stages.StageSpec.from_dict(old).target_smoothing_vox == 0.0
    old = SPECS["scn"].to_dict() | {"definition_version": 1}
    del old["target_smoothing_vox"], old["window_pad_value"]
    converted = stages.StageSpec.from_dict(old)
    assert (converted.window_pad_value, converted.target_smoothing_vox) == (-1.0, 0.0)


def test_prediction_definition_ignores_training_only_fields():
    spec = SPECS["seg"]
    trained_otherwise = dataclasses.replace(
        spec, target_smoothing_vox=0.0, landmark_jitter_mm=1.0, augment=stages.AugmentRanges.none()
    )
    assert stages.prediction_definition(trained_otherwise) == stages.prediction_definition(spec)
    moved = dataclasses.replace(spec, posterior_offset_mm=9.0)
    assert stages.prediction_definition(moved) != stages.prediction_definition(spec)


def test_target_smoothing_below_half_a_voxel_changes_nothing():
    # Why the demo (2.5 mm) trains without smoothing: the paper's 1 mm is 0.4 voxels there, and a
    # 3-D Gaussian of <= 0.5 voxels keeps the centre voxel's own label on top even among random
    # labels; 0.6 voxels already flips some (README, Training).
    labels = np.random.default_rng(0).choice([0, 20, 21, 22], size=(12, 12, 12)).astype(np.int32)
    target = jax.jit(samples.segmentation_target, static_argnums=2)
    plain = labels == 21
    np.testing.assert_array_equal(np.asarray(target(labels, 21, 0.5)), plain)
    assert not np.array_equal(np.asarray(target(labels, 21, 0.6)), plain)
