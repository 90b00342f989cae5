"""Stage 1 training: the spine localisation U-Net (heatmap of the spinal centreline).

    python experiments/train_spine.py                      # demo on the built-in phantoms
    python experiments/train_spine.py --config=experiments/configs/spine.py:paper \\
        --config.data.root=/data/verse --workdir=runs/spine-paper

Validation runs stage 1 of the inference pipeline (`predict.predict_spine`: whole-scan centred
crop, centre of mass of the signed heatmap) on every held-out case and reports the x-y distance
(mm) to the mean x, y of the ground-truth centroids. `<workdir>/export` holds the step with the
smallest mean distance (`<workdir>/export-last` the last step).
"""

import numpy as np

from experiments import common, trainer
from verse_jax import stages
from verse_jax.infer import predict
from verse_jax.train import stage_losses
from verse_jax.train import state as train_state


def make_evaluate(ctx: common.Context):
    cases = common.val_cases(ctx)
    volumes = [common.stage_volume(case) for case in cases]

    def evaluate(state):
        model = common.stage_network(ctx, state)
        distances, failures = [], 0
        for case, volume in zip(cases, volumes, strict=True):
            gt_mm = case.geometry.index_to_physical(case.landmarks_vox.astype(np.float64))
            try:
                spine_mm = predict.predict_spine(volume, model)
            except predict.NoSpineFoundError:
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


def make_stage(config) -> trainer.Stage:
    """The stage of `config` (experiments/configs/spine.py): network, loss, validation."""
    o = config.optim
    return trainer.Stage(
        factory=stages.FACTORIES["spine"],
        factory_kwargs={"preset": config.model.preset, "conv_impl": config.model.conv_impl},
        make_loss=lambda apply, _: stage_losses.make_spine_loss(
            apply, weight_decay=o.weight_decay, sigma_vox=o.heatmap_sigma
        ),
        make_evaluate=make_evaluate,
        select=("spine_xy_mm", "min"),
    )


def train_and_evaluate(config, workdir) -> train_state.TrainState:
    """Trains stage 1 with `config` (experiments/configs/spine.py) into `workdir`."""
    return common.run(config, workdir, make_stage(config))


if __name__ == "__main__":
    common.main("spine", train_and_evaluate)
