"""Training scripts and configs: smoke runs of each stage, resume, presets, command line."""

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax._src import compilation_cache as jax_compilation_cache  # reset_cache only

from experiments import build_demo_bundle, common, train_scn, train_seg, train_spine, trainer
from experiments.configs import scn, seg, spine
from experiments.selection import Best, Selection, rank, rank_fn
from verse_jax import (
    phantoms,
    testing,
)
from verse_jax.infer import bundle
from verse_jax.train import (
    checkpoint,
    stage_losses,
)

SCRIPTS = {"spine": (train_spine, spine), "scn": (train_scn, scn), "seg": (train_seg, seg)}


_CACHE_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module: the resumed and the straight run of the resume
    test compile the same programs as the two-step run, so they load them instead."""
    old = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    new = (str(tmp_path_factory.mktemp("xla_cache")), 0.0, 0)
    for name, value in zip(_CACHE_OPTIONS, new, strict=True):
        jax.config.update(name, value)
    jax_compilation_cache.reset_cache()  # the cache is set up once per process otherwise
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    jax_compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A small phantom data set (train and val splits, coarse voxels), generated once."""
    root = tmp_path_factory.mktemp("phantoms")
    phantoms.write_phantom_dataset(root, num_cases=4, seed=0, max_voxels=1_000_000)
    return root


def _smoke_config(stage, root, **train):
    config = SCRIPTS[stage][1].get_config("smoke")
    config.data.root = str(root)
    config.data.cache_dir = str(root / "stage_cache")
    for key, value in train.items():
        config.train[key] = value
    return config


def _records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def scn_two_steps(phantom_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("scn2")
    state = train_scn.train_and_evaluate(_smoke_config("scn", phantom_root), workdir)
    return workdir, state


def _check_run(workdir, state, stage):
    assert int(state.step) == 2
    assert (workdir / "checkpoints" / "2").is_dir()
    assert json.loads((workdir / "config.json").read_text())["stage"] == stage
    records = _records(workdir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in train)
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 2
    loaded = bundle.load_stage(workdir / "export")
    assert loaded.extra["step"] == 2
    return evals[0]


def test_scn_smoke_run(scn_two_steps):
    workdir, state = scn_two_steps
    val = _check_run(workdir, state, "scn")
    assert 0.0 <= val["val/id_rate"] <= 1.0
    assert bundle.load_stage(workdir / "export").sigmas.shape == (26,)


@pytest.mark.parametrize("stage", ["spine", "seg"])
def test_spine_and_seg_smoke_runs(stage, phantom_root, tmp_path):
    state = SCRIPTS[stage][0].train_and_evaluate(_smoke_config(stage, phantom_root), tmp_path)
    val = _check_run(tmp_path, state, stage)
    key = "val/spine_xy_mm" if stage == "spine" else "val/dice"
    assert val[key] is None or val[key] >= 0


def _export_record(export_dir):
    """An export's metadata without the wall-clock field, and its parameter bytes."""
    meta = json.loads((export_dir / "stage.json").read_text())
    meta["extra"].pop("train_seconds")
    return meta, (export_dir / "params.msgpack").read_bytes()


def test_resume_reaches_the_same_parameters(scn_two_steps, phantom_root, tmp_path):
    """Two steps, stop, restart with the same workdir to four == four steps in one go, with the
    same best and last exports."""
    first_half, _ = scn_two_steps
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(first_half, resumed_dir)
    config = _smoke_config("scn", phantom_root, num_steps=4, eval_every=2)
    resumed = train_scn.train_and_evaluate(config, resumed_dir)
    straight = train_scn.train_and_evaluate(config, tmp_path / "straight")
    assert int(resumed.step) == int(straight.step) == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [r["step"] for r in _records(resumed_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    for name in ("export", "export-last"):
        assert _export_record(resumed_dir / name) == _export_record(tmp_path / "straight" / name)
    best = json.loads((resumed_dir / "export" / "stage.json").read_text())["extra"]
    assert best["selected"] == "best" and best["metric"] == "id_rate" and best["mode"] == "max"
    assert best["tie_break"] == ["mean_distance_mm", "min"] and best["step"] in (2, 4)
    assert bundle.load_stage(resumed_dir / "export-last").extra["step"] == 4


SCORES = {2: 0.5, 4: 0.25, 6: float("nan")}  # scripted validation: step 2 is the best


def _scripted_stage(config):
    """The spine smoke stage with a validation that returns SCORES[step] (no model involved)."""
    return trainer.Stage(
        factory="spine_localization_net",
        factory_kwargs={"preset": config.model.preset, "conv_impl": config.model.conv_impl},
        make_loss=lambda apply, _: stage_losses.make_spine_loss(apply),
        make_evaluate=lambda ctx: lambda state: {"score": SCORES[int(state.step)]},
        select=("score", "max"),
    )


def test_best_export_and_checkpoint_survive_resume(phantom_root, tmp_path, caplog):
    """Best at step 2 of 6: `export` holds step 2 (also after a stop at 4 and a resume), orbax
    keeps checkpoint 2 beside the newest (max_to_keep 1), `export-last` holds step 6."""
    caplog.set_level(logging.INFO, logger="verse_jax.train.loop")  # cli tests quieten verse_jax
    config = _smoke_config("spine", phantom_root, num_steps=6, max_to_keep=1, log_every=2)
    straight = tmp_path / "straight"
    common.run(config, straight, _scripted_stage(config))
    first = _smoke_config("spine", phantom_root, num_steps=4, max_to_keep=1, log_every=2)
    resumed = tmp_path / "resumed"
    common.run(first, resumed, _scripted_stage(first))
    common.run(config, resumed, _scripted_stage(config))
    assert "best score 0.5 at step 2" in caplog.text
    for workdir in (straight, resumed):
        best = bundle.load_stage(workdir / "export").extra
        assert (best["step"], best["selected"], best["metric"], best["mode"]) == (
            2,
            "best",
            "score",
            "max",
        )
        assert best["val"] == {"score": 0.5}
        last = bundle.load_stage(workdir / "export-last").extra
        assert (last["step"], last["selected"], last["val_step"]) == (6, "last", 6)
        kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert kept == [2, 6]
        ckpt = checkpoint.Checkpointer(
            workdir / "checkpoints", rank_fn=rank_fn(Selection("score", "max"))
        )
        assert ckpt.best_step() == 2
        ckpt.close()
    for name in ("export", "export-last"):
        assert _export_record(resumed / name) == _export_record(straight / name)


def test_without_validation_the_export_is_the_last_step(phantom_root, tmp_path):
    root = tmp_path / "no_splits"
    shutil.copytree(phantom_root / "rawdata", root / "rawdata")
    shutil.copytree(phantom_root / "derivatives", root / "derivatives")
    config = _smoke_config("spine", root)
    train_spine.train_and_evaluate(config, tmp_path / "run")
    assert _export_record(tmp_path / "run" / "export") == _export_record(
        tmp_path / "run" / "export-last"
    )
    extra = bundle.load_stage(tmp_path / "run" / "export").extra
    assert (extra["step"], extra["selected"], extra["val"]) == (2, "last", {})


def test_selection_rank():
    sel = Selection("id_rate", "max", ("mean_distance_mm", "min"))
    better = {"id_rate": 0.8, "mean_distance_mm": 9.0}
    assert rank(sel, better, 4) > rank(sel, {"id_rate": 0.8, "mean_distance_mm": 10.0}, 2)
    assert rank(sel, better, 2) > rank(sel, better, 4)  # equal values: the earlier step
    assert rank(sel, {"id_rate": 0.0}, 9) > rank(sel, {"id_rate": float("nan")}, 1)
    low = Selection("spine_xy_mm", "min")
    assert rank(low, {"spine_xy_mm": 3.0}, 5) > rank(low, {"spine_xy_mm": 4.0}, 1)
    assert rank(low, {"spine_xy_mm": 99.0}, 5) > rank(low, {"spine_xy_mm": None}, 1)
    best = Best(low)
    assert best.offer(1, {"spine_xy_mm": 4.0}) and not best.offer(2, {"spine_xy_mm": 4.0})
    assert best.offer(3, {"spine_xy_mm": 3.0}) and best.step == 3
    with pytest.raises(ValueError, match="mode"):
        Selection("dice", "maximum")


@pytest.mark.parametrize("stage", ["spine", "scn", "seg"])
def test_presets(stage):
    module = SCRIPTS[stage][1]
    paper, demo = module.get_config("paper"), module.get_config("demo")
    assert module.get_config(None).to_dict() == demo.to_dict()
    assert paper.train.batch_size == 1 and paper.model.preset == "paper"
    expected = {
        "spine": ("adam", 1e-4, (10_000, 15_000), 20_000, 8.0, (64, 64, 128)),
        "scn": ("sgd_nesterov", 5e-8, (50_000, 75_000), 100_000, 2.0, (96, 96, 128)),
        "seg": ("adam", 1e-4, (20_000, 40_000), 50_000, 1.0, (128, 128, 96)),
    }[stage]
    o, d = paper.optim, paper.data
    got = (o.name, o.lr, tuple(o.boundaries), paper.train.num_steps, d.spacing_mm, d.crop_size)
    assert got == expected and tuple(o.scales) == (0.5, 0.1)
    assert o.clip_norm == (1.0 if stage == "seg" else 0.0)
    # The paper draws every training case once per epoch; the demo SCN balances rare landmarks.
    assert d.balance_landmarks == 0
    assert demo.data.balance_landmarks == (3 if stage == "scn" else 0)
    if stage == "scn":
        assert d.heatmap_value_scale == 1.0 and demo.data.heatmap_value_scale == 0.3
        # Every heatmap channel weighs 1 in the paper's loss; the demo weights rare landmarks.
        assert o.rare_landmark_weight == 0.0 and demo.optim.rare_landmark_weight == 4.0
        assert not train_scn.make_stage(paper).uses_training_landmarks
        assert train_scn.make_stage(demo).uses_training_landmarks
    with pytest.raises(ValueError, match="paper"):
        module.get_config("papr")
    with pytest.raises(AttributeError):
        paper.optim.lr_typo = 1.0  # locked: misspelt overrides fail


def test_scn_spatial_downsample_from_the_config():
    config = scn.get_config("demo")
    default = train_scn.make_stage(config)
    assert "spatial_downsample" not in default.factory_kwargs  # the preset's, as the paper: 4
    assert bundle.build_model(default.factory, default.factory_kwargs).spatial_downsample == 4
    config.unlock()
    config.model.spatial_downsample = 2
    stage = train_scn.make_stage(config)
    assert bundle.build_model(stage.factory, stage.factory_kwargs).spatial_downsample == 2


def test_batch_size_not_divisible_is_a_clear_error(phantom_root, tmp_path):
    config = _smoke_config("spine", phantom_root, batch_size=0)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        train_spine.train_and_evaluate(config, tmp_path)


@pytest.mark.slow
def test_command_line(phantom_root, tmp_path):
    args = [
        sys.executable,
        str(REPO / "experiments" / "train_spine.py"),
        f"--config={REPO / 'experiments' / 'configs' / 'spine.py'}:smoke",
        f"--config.data.root={phantom_root}",
        f"--config.data.cache_dir={phantom_root / 'stage_cache'}",
        "--config.train.num_steps=1",
        f"--workdir={tmp_path}",
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "validation at step 1" in out.stderr
    assert (tmp_path / "export" / "stage.json").is_file()


def test_build_demo_bundle_from_finished_workdirs(tmp_path):
    """Finished workdirs are reused (no training); the bundle holds their best exports as
    float16, with the training figures in bundle.json."""
    random = testing.random_bundle(tmp_path / "random", num_landmarks=26)
    for offset, name in enumerate(bundle.STAGES):
        config = SCRIPTS[name][1].get_config("smoke")
        workdir = tmp_path / "runs" / f"{name}-smoke"
        workdir.mkdir(parents=True)
        common.write_config(config, workdir)
        stage = bundle.load_stage(random / name)
        for folder, extra in {
            "export": {
                "step": 1,
                "selected": "best",
                "metric": "m",
                "mode": "max",
                "val": {"m": 0.5 + offset},
            },
            "export-last": {
                "step": 2,
                "selected": "last",
                "val": {"m": 0.25},
                "train_seconds": 10.0 + offset,
            },
        }.items():
            bundle.export_stage(
                workdir / folder,
                spec=trainer.stage_spec(config),
                factory_kwargs=stage.factory_kwargs,
                params=stage.params,
                sigmas=stage.sigmas,
                extra=extra,
            )
    out = tmp_path / "shipped"
    args = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--preset", "smoke"]
    assert build_demo_bundle.main(args) == 0
    shipped = bundle.load_bundle(out)
    extra = shipped.extra
    assert extra["trained"] is True and extra["total_train_seconds"] == 33.0
    assert extra["git_commit"] and extra["params_dtype"] == "float16" and extra["created"]
    for offset, name in enumerate(bundle.STAGES):
        record = extra["stages"][name]
        assert (record["step"], record["val"], record["last_step_val"]) == (
            1,
            {"m": 0.5 + offset},
            {"m": 0.25},
        )
        assert (
            record["num_steps"] == 2
            and record["seed"] == 0
            and record["config"]["preset"] == "smoke"
        )
        assert json.loads((out / name / "stage.json").read_text())["params_dtype"] == "float16"
        assert getattr(shipped, name).extra["step"] == 1
    # the shipped candidate rule is the config's (prediction only); the rest must match
    assert shipped.scn.spec == trainer.stage_spec(SCRIPTS["scn"][1].get_config("smoke"))
    scn_export = tmp_path / "runs" / "scn-smoke" / "export"
    stage = bundle.load_stage(scn_export)
    shutil.rmtree(scn_export)
    bundle.export_stage(
        scn_export,
        spec=dataclasses.replace(stage.spec, window_pad_value=-1.0),
        factory_kwargs=stage.factory_kwargs,
        params=stage.params,
        sigmas=stage.sigmas,
        extra=stage.extra,
    )
    with pytest.raises(SystemExit, match="stage definition differs from the scn config"):
        build_demo_bundle.main([*args[:-2], "--out", str(tmp_path / "other"), *args[-2:]])
    (tmp_path / "runs" / "scn-smoke" / "config.json").write_text('{"other": 1}')
    with pytest.raises(SystemExit, match="another config"):
        build_demo_bundle.main(args)
