"""The shipped demo model, `verse-jax demo` and `verse-jax predict` without --model."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import trainer
from experiments.configs import scn, seg, spine
from verse_jax import demo, io, metrics, phantoms, stages, testing
from verse_jax.cli import main
from verse_jax.infer import bundle, predict

REPO = Path(__file__).resolve().parents[1]

GRIDS = {  # as tests/test_cli.py: the compiled tiny networks are shared within a session
    "spine": {"spacing_mm": 16.0, "crop_size": (16, 16, 32), "smoothing_mm": 3.0},
    "scn": {"spacing_mm": 8.0, "crop_size": (12, 12, 16), "smoothing_mm": 0.75},
    "seg": {"spacing_mm": 4.0, "crop_size": (16, 16, 12), "smoothing_mm": 0.75},
}
TRAINED = "trained on synthetic phantoms only; not for real scans"
UNTRAINED = "UNTRAINED placeholder"


def _tiny(path, trained):
    return testing.random_bundle(
        path, grids=GRIDS, seed=2, network_kwargs={"conv_impl": "lax"}, extra={"trained": trained}
    )


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("model") / "untrained", False)


def test_demo_command_writes_everything(untrained, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", str(out), "--model", str(untrained), "--seed", "5", "--fov", "lumbar"]
    assert main([*args, "--max-voxels", "40000", "--overlap", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count(UNTRAINED) == 1 and f"model: {untrained} ({UNTRAINED})" in (
        captured.out
    )
    case = "demo-seed5"
    names = [f"{case}_ct.nii.gz", f"{case}_seg.nii.gz", f"{case}_ctd.json", f"{case}_preview.png"]
    names += ["scores.json", f"ground_truth/{case}_seg.nii.gz", f"ground_truth/{case}_ctd.json"]
    for name in names:
        assert (out / name).is_file() and str(out / name) in captured.out, name
    truth = phantoms.generate_phantom(5, fov="lumbar", max_voxels=40_000)
    ct = io.read_volume(out / f"{case}_ct.nii.gz")
    np.testing.assert_array_equal(ct.array, truth.image.array)
    np.testing.assert_array_equal(
        io.read_mask(out / f"ground_truth/{case}_seg.nii.gz").array, truth.mask.array
    )
    scores = json.loads((out / "scores.json").read_text())
    assert (scores["case_id"], scores["seed"], scores["trained"]) == (case, 5, False)
    loc = scores["localization"]
    assert loc["num_gt"] == len(truth.centroids.labels)
    predicted = io.read_centroids(out / f"{case}_ctd.json", ct.geometry)
    assert loc["num_pred"] == len(predicted.labels)
    labels = np.unique(io.read_mask(out / f"{case}_seg.nii.gz").array)
    assert set(labels.tolist()) <= {0, *predicted.labels.tolist()}
    assert case in captured.out.splitlines()[1]  # the score table's row
    # The same scores as `verse-jax evaluate` on the written files.
    assert (
        main(
            ["evaluate", "--pred", str(out), "--gt", str(out / "ground_truth"), "-o", str(tmp_path)]
        )
        == 0
    )
    (evaluated,) = json.loads((tmp_path / "evaluation.json").read_text())["cases"]
    assert evaluated["localization"] == loc
    assert evaluated["segmentation"] == scores["segmentation"]


def test_predict_without_model_uses_the_shipped_bundle(monkeypatch, tmp_path, capsys):
    shipped = _tiny(tmp_path / "shipped", True)
    monkeypatch.setattr(demo, "SHIPPED_BUNDLE", shipped)
    data = tmp_path / "data"
    assert (
        main(["phantoms", str(data), "--cases", "2", "--seed", "3", "--max-voxels", "40000"]) == 0
    )
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(data), "-o", str(out), "--overlap", "8", "-q"]) == 0
    err = capsys.readouterr().err
    assert err.count("verse-jax:") == 1 and err.count(TRAINED) == 1, err
    assert "--model" in err and UNTRAINED not in err
    for case in io.find_cases(data):
        assert (out / f"{case.case_id}_seg.nii.gz").is_file()
    model, notice = demo.load_model(None)
    assert model.path == shipped and TRAINED in notice
    assert demo.load_model(shipped)[1] is None  # the same bundle given explicitly: no notice
    assert demo.notice(bundle.load_bundle(shipped), shipped=False) is None


def test_shipped_bundle_matches_the_demo_presets():
    """The shipped bundle loads, is small, says whether it is trained and has the demo presets'
    stage definitions (grids and the rest)."""
    model, notice = demo.load_model()
    assert model.path == demo.SHIPPED_BUNDLE
    trained = model.extra["trained"]
    assert trained in (True, False)
    assert (UNTRAINED if not trained else TRAINED) in notice
    sizes = [p.stat().st_size for p in demo.SHIPPED_BUNDLE.rglob("*") if p.is_file()]
    assert max(sizes) < 2 * 2**20 and sum(sizes) < 5_000_000
    for name, module in {"spine": spine, "scn": scn, "seg": seg}.items():
        config = module.get_config("demo")
        stage = getattr(model, name)
        grid = trainer.stage_grid(config)
        assert stage.grid == stages.StageGrid(
            grid["spacing_mm"], tuple(grid["crop_size"]), grid["smoothing_mm"]
        )
        # the shipped bundle may predate a training-only change of the presets (README, Demo)
        predicted = stages.prediction_definition(stage.spec)
        assert predicted == stages.prediction_definition(trainer.stage_spec(config))
        assert stage.factory_kwargs["preset"] == config.model.preset
        assert stage.num_landmarks == config.data.num_landmarks
        assert (
            json.loads((demo.SHIPPED_BUNDLE / name / "stage.json").read_text())["params_dtype"]
            == "float16"
        )
        if trained:
            record = model.extra["stages"][name]
            assert record["step"] == stage.extra["step"] and record["val"]
    if trained:
        assert model.extra["git_commit"] and model.extra["total_train_seconds"] > 0


def test_float16_params_round_trip(untrained, tmp_path):
    stage = bundle.load_stage(untrained / "seg")
    out = bundle.export_stage(
        tmp_path / "seg16",
        spec=stage.spec,
        factory_kwargs=stage.factory_kwargs,
        params=stage.params,
        params_dtype="float16",
    )
    half = bundle.load_stage(out)
    assert (out / "params.msgpack").stat().st_size < 0.55 * (
        untrained / "seg" / "params.msgpack"
    ).stat().st_size
    for a, b in zip(
        bundle.jax.tree.leaves(stage.params), bundle.jax.tree.leaves(half.params), strict=True
    ):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(
            np.asarray(b), np.asarray(a).astype(np.float16).astype(np.float32)
        )
    with pytest.raises(bundle.BundleError, match="params_dtype"):
        bundle.export_stage(
            tmp_path / "bad",
            spec=stage.spec,
            factory_kwargs=stage.factory_kwargs,
            params=stage.params,
            params_dtype="int8",
        )


def _fresh_seeds():
    return [demo.DEMO_SEED + i for i in range(3)]


def test_demo_seeds_are_not_training_seeds():
    """The default data set (seed 0) and its larger variants draw case seeds with case_seed."""
    used = {phantoms.case_seed(0, i) for i in range(4096)}
    assert not used & set(_fresh_seeds())


@pytest.mark.slow
def test_shipped_bundle_identifies_vertebrae_of_fresh_phantoms():
    """>= 90 % of the vertebrae of 3 fresh phantoms identified (VerSe 20 mm rule, pooled)."""
    model, _ = demo.load_model()
    if not model.extra.get("trained"):
        pytest.skip(
            f"{demo.SHIPPED_BUNDLE} is the untrained placeholder (bundle.json extra.trained is "
            "false); build the trained one with `python experiments/build_demo_bundle.py`"
        )
    hits = total = 0
    for seed in _fresh_seeds():
        phantom = phantoms.generate_phantom(seed)
        image = type(phantom.image)(phantom.image.array.astype(np.float32), phantom.image.geometry)
        centroids, _ = predict.predict_case(image, model)
        result = metrics.localization_metrics(centroids, phantom.centroids)
        hits, total = hits + result.hits, total + result.num_gt
    assert hits / total >= 0.9, f"{hits} of {total} vertebrae identified"
