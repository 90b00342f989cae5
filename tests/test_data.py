"""Tests for the stage cache, per-stage samples and Grain pipelines (tiny synthetic data set)."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from verse_jax import io, preprocessing, stages
from verse_jax.data import cache as stage_cache
from verse_jax.data import pipeline as data_pipeline
from verse_jax.data import samples
from verse_jax.data.augmentation import AugmentRanges
from verse_jax.geometry import Geometry, Volume
from verse_jax.io import datasets

LABELS = (20, 21, 22, 23)  # L1-L4
RANGES = AugmentRanges(translation_mm=4.0, displacement_mm=3.0)
SPECS = {
    "spine": stages.StageSpec("spine", 4.0, (8, 8, 16), 1.0, augment=RANGES),
    "scn": stages.StageSpec("scn", 2.0, (12, 12, 16), 0.75, augment=RANGES),
    "seg": stages.StageSpec(
        "seg", 1.5, (16, 16, 12), 0.75, augment=RANGES, posterior_offset_mm=4.0
    ),
}


def _case_volumes(index: int):
    """A (20, 18, 48) scan at (1.5, 1.5, 2) mm: four labelled blocks along z, HU = 100 * id."""
    shape = (20, 18, 48)
    geometry = Geometry(shape, (1.5, 1.5, 2.0), (-10.0 + index, 5.0, 30.0))
    mask = np.zeros(shape, np.uint16)
    points_vox = []
    for k, label in enumerate(LABELS):
        z0 = 4 + 10 * k
        mask[5 : 15 - index % 2, 4:14, z0 : z0 + 8] = label
        points_vox.append([(5 + 14 - index % 2) / 2, 8.5, z0 + 3.5])
    image = np.where(mask > 0, 100 * mask.astype(np.int16), -1000).astype(np.int16)
    centroids = io.Centroids(np.array(LABELS), geometry.index_to_physical(np.array(points_vox)))
    return Volume(image, geometry), Volume(mask, geometry), centroids


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    ids = [f"case{i}" for i in range(4)]
    for index, case_id in enumerate(ids):
        image, mask, centroids = _case_volumes(index)
        raw, der = root / "rawdata" / f"sub-{case_id}", root / "derivatives" / f"sub-{case_id}"
        raw.mkdir(parents=True)
        der.mkdir(parents=True)
        io.write_volume(raw / f"sub-{case_id}_ct.nii.gz", image)
        io.write_mask(der / f"sub-{case_id}_seg-vert_msk.nii.gz", mask)
        io.write_centroids(der / f"sub-{case_id}_seg-subreg_ctd.json", centroids, image.geometry)
    splits = {"train": ids[:3], "val": ids[3:], "test": []}
    (root / "splits.json").write_text(json.dumps(splits))
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train(root, cache, name, *, seed=0, workers=0, batch=2):
    return data_pipeline.make_train_dataset(
        root,
        ["case0", "case1", "case2"],
        SPECS[name],
        cache_dir=cache,
        batch_size=batch,
        seed=seed,
        num_workers=workers,
    )


def _take(dataset, n):
    iterator = iter(dataset)
    out = [next(iterator) for _ in range(n)]
    iterator.close() if hasattr(iterator, "close") else None
    return out


@functools.cache
def _device_transform(name):
    return jax.jit(samples.make_device_transform(SPECS[name]))


def _assert_batches_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_stage_cache_contents(dataset_root, cache_dir):
    case = io.find_cases(dataset_root)[1]
    path = stage_cache.build_stage_case(case, SPECS["scn"], cache_dir)
    stamp = (path / "image.npy").stat().st_mtime_ns
    assert stage_cache.build_stage_case(case, SPECS["scn"], cache_dir) == path
    assert (path / "image.npy").stat().st_mtime_ns == stamp
    cached = stage_cache.load_stage_case(path)
    image = io.read_volume(case.image_path)
    expected = preprocessing.to_stage_grid(image, spacing_mm=2.0, smoothing_mm=0.75)
    assert cached.geometry == expected.geometry and cached.image.dtype == np.float16
    np.testing.assert_allclose(cached.image, expected.array, atol=1e-3)
    centroids = io.read_centroids(case.centroids_path, image.geometry)
    np.testing.assert_allclose(
        cached.landmarks_vox[np.array(LABELS) - 1],
        expected.geometry.physical_to_index(centroids.points_mm),
        atol=1e-4,
    )
    assert cached.valid.sum() == 4 and cached.labels is None
    mask = cached.landmark_mask  # 25 mm (13 slices at 2 mm) cut at both z ends
    assert mask[:, :, :12].max() == 0 and mask[:, :, -12:].max() == 0
    assert mask[1:-1, 1:-1, 14:-14].min() == 1
    seg = stage_cache.load_stage_case(stage_cache.build_stage_case(case, SPECS["seg"], cache_dir))
    assert seg.labels.dtype == np.uint8 and set(np.unique(seg.labels)) == {0, *LABELS}


def test_select_case_ids(dataset_root):
    assert datasets.select_case_ids(dataset_root) == [f"case{i}" for i in range(4)]
    assert datasets.select_case_ids(dataset_root, split="val") == ["case3"]
    train = datasets.select_case_ids(dataset_root, split="train")
    held_out = [
        datasets.select_case_ids(dataset_root, split="train", fold=f, part="val") for f in range(3)
    ]
    assert sorted(sum(held_out, [])) == train
    for fold in range(3):
        fold_train = datasets.select_case_ids(dataset_root, split="train", fold=fold)
        assert sorted(fold_train + held_out[fold]) == train
    assert datasets.select_case_ids(dataset_root, split="train", fold="all", part="val") == []
    with pytest.raises(ValueError, match="fold"):
        datasets.select_case_ids(dataset_root, fold=3)


def test_fixed_fold_file(dataset_root, tmp_path):
    folds = {
        "0": {"train": ["case2", "case0"], "val": ["case1"]},
        "1": {"train": ["case1"], "val": ["case0", "case2"]},
    }
    path = tmp_path / "folds.json"
    path.write_text(json.dumps(folds))
    select = lambda fold, part: datasets.select_case_ids(
        dataset_root, split="train", fold=fold, part=part, fold_file=path
    )
    assert select(0, "train") == ["case0", "case2"] and select(0, "val") == ["case1"]
    assert select(1, "val") == ["case0", "case2"]
    with pytest.raises(ValueError, match=r"folds.json: no fold 2 \(has \[0, 1\]\)"):
        select(2, "train")
    folds["0"]["val"] = ["case3"]  # in the data set, but not in its "train" split
    path.write_text(json.dumps(folds))
    with pytest.raises(ValueError, match=r"fold 0 val names cases not in the data \['case3'\]"):
        select(0, "val")
    folds["0"]["val"] = ["case0"]
    path.write_text(json.dumps(folds))
    with pytest.raises(ValueError, match=r"both train and val: \['case0'\]"):
        select(0, "val")


@pytest.mark.parametrize("name", ["spine", "scn", "seg"])
def test_static_shapes_and_formats(dataset_root, cache_dir, name):
    spec = SPECS[name]
    raws = _take(_train(dataset_root, cache_dir, name), 3)
    shapes = [jax.tree.map(np.shape, raw) for raw in raws]
    assert shapes[0] == shapes[1] == shapes[2]
    batch = jax.tree.map(np.asarray, _device_transform(name)(raws[0]))
    crop = spec.crop_size
    channels = 2 if name == "seg" else 1
    assert batch["image"].shape == (2, *crop, channels) and batch["image"].dtype == np.float32
    assert np.all(np.abs(batch["image"]) <= 1)
    if name in ("spine", "scn"):
        assert batch["landmarks_vox"].shape == (2, 25, 3) and batch["valid"].dtype == bool
        assert batch["valid"][:, np.array(LABELS) - 1].any()
    if name == "scn":
        assert batch["mask"].shape == (2, *crop, 1) and set(np.unique(batch["mask"])) <= {0, 1}
    if name == "seg":
        assert batch["label"].shape == (2, *crop, 1) and batch["label"].max() == 1
        assert 0.5 < batch["image"][..., 1].max() <= 1.0


def test_seg_heatmap_sits_on_its_vertebra(dataset_root, cache_dir):
    for raw in _take(_train(dataset_root, cache_dir, "seg", seed=3), 4):
        batch = jax.tree.map(np.asarray, _device_transform("seg")(raw))
        for b in range(2):
            peak = np.unravel_index(np.argmax(batch["image"][b, ..., 1]), SPECS["seg"].crop_size)
            # The peak is the jittered centroid (<= 3 mm = 2 voxels off): inside the vertebra.
            assert batch["label"][b][peak][0] == 1


def test_same_seed_same_batches_and_different_seed_differs(dataset_root, cache_dir):
    a = _take(_train(dataset_root, cache_dir, "scn", seed=1), 3)
    b = _take(_train(dataset_root, cache_dir, "scn", seed=1), 3)
    c = _take(_train(dataset_root, cache_dir, "scn", seed=2), 3)
    _assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["params"]["displacement_mm"], c[0]["params"]["displacement_mm"])


def test_worker_count_does_not_change_batches(dataset_root, cache_dir):
    iterator = iter(_train(dataset_root, cache_dir, "spine", seed=4, workers=1))
    one = [next(iterator) for _ in range(4)]
    json.dumps(iterator.get_state())  # checkpointable with workers too
    iterator.close()
    two = _take(_train(dataset_root, cache_dir, "spine", seed=4, workers=2), 4)
    none = _take(_train(dataset_root, cache_dir, "spine", seed=4, workers=0), 4)
    _assert_batches_equal(one, two)
    _assert_batches_equal(one, none)


def test_process_shards_interleave_to_the_single_process_sequence(dataset_root, cache_dir):
    single = _take(_train(dataset_root, cache_dir, "spine", seed=6, batch=1), 6)
    shards = []
    for index in range(2):
        dataset = data_pipeline.make_train_dataset(
            dataset_root,
            ["case0", "case1", "case2"],
            SPECS["spine"],
            cache_dir=cache_dir,
            batch_size=1,
            seed=6,
            shard_index=index,
            shard_count=2,
        )
        shards.append(_take(dataset, 3))
    # Process p holds items p, p + 2, ... of the global sequence, with the same augmentation draws.
    _assert_batches_equal([shards[i % 2][i // 2] for i in range(6)], single)


def test_restored_state_continues_the_sequence(dataset_root, cache_dir):
    dataset = _train(dataset_root, cache_dir, "spine", seed=5)
    iterator = iter(dataset)
    for _ in range(2):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(3)]
    restored = iter(_train(dataset_root, cache_dir, "spine", seed=5))
    restored.set_state(state)
    _assert_batches_equal([next(restored) for _ in range(3)], expected)


def test_eval_dataset_is_identity_and_padded(dataset_root, cache_dir):
    case = io.find_cases(dataset_root)[3]
    path = stage_cache.build_stage_case(case, SPECS["spine"], cache_dir)
    cached = stage_cache.load_stage_case(path)
    shape = np.array(cached.image.shape)
    spec = dataclasses.replace(SPECS["spine"], crop_size=tuple(shape - 2))  # centred, 1 voxel off
    batches = list(
        data_pipeline.make_eval_dataset(
            dataset_root, ["case3"], spec, cache_dir=cache_dir, batch_size=2
        )
    )
    assert len(batches) == 1 and batches[0]["example_mask"].tolist() == [True, False]
    batch = jax.tree.map(np.asarray, jax.jit(samples.make_device_transform(spec))(batches[0]))
    window = tuple(slice(1, n - 1) for n in shape)
    expected = np.asarray(cached.image[window], np.float32)
    np.testing.assert_array_equal(batch["image"][0, ..., 0], expected)
    assert np.array_equal(batch["valid"][0], cached.valid)
    np.testing.assert_allclose(
        batch["landmarks_vox"][0][cached.valid], cached.landmarks_vox[cached.valid] - 1, atol=1e-4
    )


def test_seg_validation_label_is_the_ground_truth_not_the_smoothed_target(dataset_root, cache_dir):
    spec = SPECS["seg"]  # target_smoothing_vox 1 (the training target rounds the blocks' corners)
    assert spec.target_smoothing_vox == 1.0
    batches = list(
        data_pipeline.make_eval_dataset(
            dataset_root, ["case3"], spec, cache_dir=cache_dir, batch_size=2
        )
    )

    def label(transform_spec, train):
        transform = jax.jit(samples.make_device_transform(transform_spec, train=train))
        return np.concatenate([np.asarray(transform(b)["label"]) for b in batches])

    validation = label(spec, train=False)
    unsmoothed = label(dataclasses.replace(spec, target_smoothing_vox=0.0), train=True)
    smoothed = label(spec, train=True)
    np.testing.assert_array_equal(validation, unsmoothed)
    assert validation.sum() > 0 and not np.array_equal(validation, smoothed)


def test_landmark_balance_repeats_exact():
    # Landmark counts over 6 cases: a in 6, b in 4, c in 2, d in 1 -> median 3 over held ones.
    valid = np.array(
        [
            [1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 0, 0, 0, 0],
            [1, 0, 0, 0, 0],
        ],
        bool,
    )
    # rarity: a 3/6, b 3/4, c 3/2, d 3/1 (column e held by none: ignored)
    repeats = data_pipeline.landmark_balance_repeats(valid, max_repeats=5)
    np.testing.assert_array_equal(repeats, [3, 2, 1, 1, 1, 1])  # round(3), round(1.5), ...
    np.testing.assert_array_equal(
        data_pipeline.landmark_balance_repeats(valid, max_repeats=2), [2, 2, 1, 1, 1, 1]
    )
    same = np.ones((3, 4), bool)
    np.testing.assert_array_equal(data_pipeline.landmark_balance_repeats(same), [1, 1, 1])
    with pytest.raises(ValueError, match="max_repeats"):
        data_pipeline.landmark_balance_repeats(valid, max_repeats=0)


def test_landmark_loss_weights_exact():
    # 26 landmarks over 8 cases: C1 (index 0) in 2, C2 in 8 (the commonest), L5 (23) in 4,
    # L6 (24) in 1 and T13 (25) in 1 (transitional: 1), T1 (7) in none (1).
    valid = np.zeros((8, 26), bool)
    valid[:2, 0] = valid[:, 1] = valid[:4, 23] = valid[:1, 24] = valid[:1, 25] = True
    valid[:, 8:23] = True
    weights = data_pipeline.landmark_loss_weights(valid, max_weight=3.0)
    expected = np.ones(26)
    expected[0], expected[23] = 3.0, 2.0  # 8 / 2 = 4 clipped to 3; 8 / 4
    np.testing.assert_array_equal(weights, expected)
    np.testing.assert_array_equal(data_pipeline.landmark_loss_weights(valid, 1.0), np.ones(26))
    np.testing.assert_array_equal(  # 25 landmarks (VerSe'19): L6 is index 24
        data_pipeline.landmark_loss_weights(valid[:, :25], 5.0), np.r_[4.0, expected[1:25]]
    )
    with pytest.raises(ValueError, match="max_weight"):
        data_pipeline.landmark_loss_weights(valid, 0.5)
    with pytest.raises(ValueError, match="num_cases"):
        data_pipeline.landmark_loss_weights(valid[:, :10], 2.0)


def test_training_landmarks_are_the_cases_landmarks(dataset_root, cache_dir):
    ids = ["case0", "case1", "case2"]
    got = data_pipeline.training_landmarks(dataset_root, ids, SPECS["scn"], cache_dir)
    assert got.shape == (3, SPECS["scn"].num_landmarks) and got.dtype == bool
    by_id = {case.case_id: case for case in io.find_cases(dataset_root)}
    for row, case_id in zip(got, ids, strict=True):
        case = by_id[case_id]
        centroids = io.read_centroids(case.centroids_path, io.read_geometry(case.image_path))
        _, expected = io.centroids_to_landmarks(centroids, SPECS["scn"].num_landmarks)
        np.testing.assert_array_equal(row, expected)


def test_balanced_epoch_repeats_cases(dataset_root, cache_dir, monkeypatch):
    seen = []

    def repeats(valid, max_repeats):
        seen.append((valid.shape, max_repeats))
        return np.array([1, 3, 2])

    monkeypatch.setattr(data_pipeline, "landmark_balance_repeats", repeats)
    dataset = data_pipeline.make_train_dataset(
        dataset_root,
        ["case0", "case1", "case2"],
        SPECS["scn"],
        cache_dir=cache_dir,
        batch_size=1,
        seed=3,
        balance_landmarks=3,
    )
    first_epoch = [int(b["case_index"][0]) for b in _take(dataset, 6)]
    assert sorted(first_epoch) == [0, 1, 1, 1, 2, 2]
    assert seen == [((3, SPECS["scn"].num_landmarks), 3)]
    with pytest.raises(ValueError, match="stage 'seg'"):
        seg = SPECS["seg"]
        data_pipeline.make_train_dataset(
            dataset_root,
            ["case0"],
            seg,
            cache_dir=cache_dir,
            batch_size=1,
            seed=0,
            balance_landmarks=2,
        )


def test_parallel_cache_equals_sequential_and_names_a_bad_file(dataset_root, tmp_path):
    cases = io.find_cases(dataset_root)
    one = stage_cache.prepare_stage_cases(cases, SPECS["scn"], tmp_path / "one", workers=1)
    two = stage_cache.prepare_stage_cases(cases, SPECS["scn"], tmp_path / "two", workers=2)
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two, strict=True):
        assert (a / "meta.json").read_text() == (b / "meta.json").read_text()
        for array in sorted(a.glob("*.npy")):
            assert array.read_bytes() == (b / array.name).read_bytes()
    # A broken file in a worker process: the error names it, nothing half-written is kept.
    broken = tmp_path / "broken"
    for case in cases:
        for part in ("rawdata", "derivatives"):
            src = dataset_root / part / f"sub-{case.case_id}"
            (broken / part / src.name).mkdir(parents=True)
            for f in src.iterdir():
                (broken / part / src.name / f.name).write_bytes(f.read_bytes())
    bad = broken / "rawdata" / "sub-case2" / "sub-case2_ct.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(io.VerseFormatError, match="sub-case2_ct.nii.gz"):
        stage_cache.prepare_stage_cases(
            io.find_cases(broken), SPECS["scn"], tmp_path / "three", workers=2
        )
    assert not any(p.name.startswith("case2") for p in (tmp_path / "three").iterdir())
