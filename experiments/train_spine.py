"""Stage 1 training: the spine localisation U-Net (heatmap of the spinal centreline).

    python experiments/train_spine.py                      # demo on the built-in phantoms
    python experiments/train_spine.py --config=experiments/configs/spine.py:paper \\
        --config.data.root=/data/verse --workdir=runs/spine-paper

Validation runs stage 1 of the inference pipeline (`pipeline.predict_spine`: whole-scan centred
crop, centre of mass of the signed heatmap) on every held-out case and reports the x-y distance
(mm) to the mean x, y of the ground-truth centroids. `<workdir>/export` holds the step with the
smallest mean distance (`<workdir>/export-last` the last step).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `experiments` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from verse_jax import pipeline, stages, training  # noqa: E402


def make_evaluate(ctx: common.Context):
    cases = common.val_cases(ctx)
    volumes = [common.stage_volume(case) for case in cases]

    def evaluate(state):
        model = common.stage_model(ctx, state)
        distances, failures = [], 0
        for case, volume in zip(cases, volumes, strict=True):
            gt_mm = case.geometry.index_to_physical(case.landmarks_vox.astype(np.float64))
            try:
                spine_mm = pipeline.predict_spine(volume, model)
            except pipeline.NoSpineFoundError:
                failures += 1
                continue
            xy = spine_mm[:2] - gt_mm[case.valid, :2].mean(axis=0)
            distances.append(float(np.linalg.norm(xy)))
        return {
            "spine_xy_mm": common.summary(distances),
            "spine_xy_mm_max": max(distances, default=float("nan")),
            "no_spine_found": float(failures),
        }

    return evaluate


def make_stage(config) -> common.Stage:
    """The stage of `config` (experiments/configs/spine.py): network, loss, validation."""
    o = config.optim
    return common.Stage(
        factory=stages.FACTORIES["spine"],
        factory_kwargs={"preset": config.model.preset, "conv_impl": config.model.conv_impl},
        make_loss=lambda apply: training.make_spine_loss(
            apply, weight_decay=o.weight_decay, sigma_vox=o.heatmap_sigma
        ),
        make_evaluate=make_evaluate,
        select=("spine_xy_mm", "min"),
    )


def train_and_evaluate(config, workdir) -> training.TrainState:
    """Trains stage 1 with `config` (experiments/configs/spine.py) into `workdir`."""
    return common.run(config, workdir, make_stage(config))


if __name__ == "__main__":
    common.main("spine", train_and_evaluate)
