"""Builds the demo model shipped in the package (`verse_jax/demo_bundle`) from the demo trainings.

    python experiments/build_demo_bundle.py                 # train (or reuse) runs/<stage>-demo
    python experiments/build_demo_bundle.py --placeholder   # random weights, "trained": false

For each stage the demo preset (experiments/configs/<stage>.py:demo) is trained into
`<runs>/<stage>-demo` unless that workdir already finished it (a stopped run resumes; a workdir of
another config is an error). The bundle takes each stage's best export (`<workdir>/export`),
stores its parameters as float16 (the demo SCN is 2.2 MiB as float32, over the 2 MiB file limit
of the repository) and records in `bundle.json` "extra": `"trained": true`, per stage the step
held, its validation figures, the selection rule, seeds and training seconds, and the date, git
commit and total training time.
"""

import argparse
import dataclasses
import datetime
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments import common, train_scn, train_seg, train_spine, trainer
from experiments.configs import scn, seg, spine
from verse_jax import (
    demo,
    phantoms,
    testing,
)
from verse_jax.infer import bundle

REPO = Path(__file__).resolve().parents[1]
STAGES = {"spine": (train_spine, spine), "scn": (train_scn, scn), "seg": (train_seg, seg)}
log = logging.getLogger("experiments")
DESCRIPTION = (
    "verse-jax demo model: the three demo presets trained on the built-in synthetic phantoms "
    "only; not for real scans"
)


def _git() -> dict:
    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status)}


def _stage_json(export_dir: Path) -> dict:
    return json.loads((export_dir / "stage.json").read_text())


# Config fields read at prediction only: a finished training is reused when only these differ,
# and the shipped stage definition takes them from the current config (`write_shipped`).
PREDICTION_ONLY = ("heatmap_value_scale",)


def _training_part(config: dict) -> dict:
    data = {k: v for k, v in config.get("data", {}).items() if k not in PREDICTION_ONLY}
    return config | {"data": data}


def train_stage(name: str, runs: Path, preset: str = "demo") -> Path:
    """The workdir of the finished training of `name` (trained or resumed here if needed)."""
    module, configs = STAGES[name]
    config = configs.get_config(preset)
    workdir = runs / f"{name}-{preset}"
    saved = workdir / "config.json"
    if saved.is_file() and _training_part(json.loads(saved.read_text())) != _training_part(
        json.loads(config.to_json_best_effort(sort_keys=True))
    ):
        raise SystemExit(
            f"{workdir} holds a training of another config than {name}.py:{preset}; "
            "remove it or pass --runs with another folder"
        )
    last = workdir / "export-last"
    if (last / "stage.json").is_file() and _stage_json(last)["extra"]["step"] >= (
        config.train.num_steps
    ):
        log.info("%s: reusing the finished training in %s", name, workdir)
    else:
        log.info("%s: training the demo preset into %s", name, workdir)
        module.train_and_evaluate(config, workdir)
    return workdir


def stage_record(name: str, workdir: Path, preset: str = "demo") -> dict:
    """The bundle metadata of one stage: what its best export holds and how it was trained."""
    config = STAGES[name][1].get_config(preset)
    best, last = _stage_json(workdir / "export")["extra"], _stage_json(workdir / "export-last")
    keys = ("step", "selected", "metric", "mode", "tie_break", "val")
    return {
        "preset": preset,
        **{k: best[k] for k in keys if k in best},
        "num_steps": int(config.train.num_steps),
        "last_step_val": last["extra"].get("val"),
        "train_seconds": last["extra"].get("train_seconds"),
        "seed": int(config.seed),
        "phantom_dataset": {
            "seed": 0,
            "num_cases": int(config.data.phantom_cases or phantoms.DEFAULT_NUM_CASES),
        },
        "config": json.loads((workdir / "config.json").read_text()),
    }


def write_shipped(exports: dict[str, Path], out: Path, extra: dict, specs=None) -> Path:
    """The bundle at `out` from three stage exports, parameters as float16, with `extra`.

    `specs`: stage name -> definition whose prediction-only part (the SCN candidate rule) replaces
    the export's (the rest must be equal).
    """
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in exports.items():
            stage = bundle.load_stage(src)
            spec = stage.spec
            if specs is not None:
                spec = dataclasses.replace(spec, candidates=specs[name].candidates)
                if spec != specs[name]:
                    raise SystemExit(f"{src}: stage definition differs from the {name} config")
            bundle.export_stage(
                Path(tmp) / name,
                spec=spec,
                factory_kwargs=stage.factory_kwargs,
                params=stage.params,
                sigmas=stage.sigmas,
                extra=stage.extra,
                params_dtype="float16",
            )
        return bundle.make_bundle(out, **{s: Path(tmp) / s for s in exports}, extra=extra)


def build_placeholder(out: Path) -> Path:
    """Random networks of the demo presets (stage definitions, presets), marked untrained."""
    configs = {name: STAGES[name][1].get_config("demo") for name in STAGES}
    presets = {c.model.preset for c in configs.values()}
    if len(presets) != 1:
        raise SystemExit(f"the demo presets use several network presets {presets}")
    extra = {
        "trained": False,
        "description": "UNTRAINED placeholder of the verse-jax demo model (random weights)",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **_git(),
        "params_dtype": "float16",
        "stages": {name: {"preset": "demo", "random_seed": 0} for name in STAGES},
        "command": "python experiments/build_demo_bundle.py --placeholder",
    }
    with tempfile.TemporaryDirectory() as tmp:
        random = testing.random_bundle(
            Path(tmp) / "random",
            preset=presets.pop(),
            seed=0,
            grids={name: trainer.stage_spec(c) for name, c in configs.items()},
            num_landmarks=configs["scn"].data.num_landmarks,
            network_kwargs={"conv_impl": configs["spine"].model.conv_impl},
        )
        return write_shipped({s: random / s for s in STAGES}, out, extra)


def build_trained(out: Path, runs: Path, preset: str = "demo") -> Path:
    """Trains (or reuses) `<runs>/<stage>-<preset>` and writes their best exports to `out`."""
    workdirs = {name: train_stage(name, runs, preset) for name in STAGES}
    records = {name: stage_record(name, w, preset) for name, w in workdirs.items()}
    extra = {
        "trained": True,
        "description": DESCRIPTION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **_git(),
        "params_dtype": "float16",
        "total_train_seconds": round(sum(r["train_seconds"] or 0.0 for r in records.values()), 1),
        "stages": records,
        "command": "python experiments/build_demo_bundle.py",
    }
    specs = {name: trainer.stage_spec(STAGES[name][1].get_config(preset)) for name in STAGES}
    return write_shipped({s: w / "export" for s, w in workdirs.items()}, out, extra, specs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder of the workdirs (default runs)")
    parser.add_argument("--out", default=str(demo.SHIPPED_BUNDLE), help="bundle folder to write")
    parser.add_argument("--placeholder", action="store_true", help="random weights, untrained")
    parser.add_argument(
        "--preset", default="demo", help="config preset (default demo; tests: smoke)"
    )
    args = parser.parse_args(argv)
    common.setup_logging()
    out = Path(args.out)
    if args.placeholder:
        build_placeholder(out)
    else:
        build_trained(out, Path(args.runs), args.preset)
    sizes = {p.relative_to(out): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    for path, size in sizes.items():
        log.info("%8.1f KiB  %s", size / 1024, path)
    log.info("wrote %s: %.2f MB in all", out, sum(sizes.values()) / 1e6)
    if max(sizes.values()) >= 2 * 2**20 or sum(sizes.values()) >= 5e6:
        log.error("too large for the repository (each file < 2 MiB, the bundle < 5 MB)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
