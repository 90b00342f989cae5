"""Stage 2 training: the SpatialConfiguration-Net with learnable sigmas (vertebra landmarks).

    python experiments/train_scn.py                        # demo on the built-in phantoms
    python experiments/train_scn.py --config=experiments/configs/scn.py:paper \\
        --config.data.root=/data/verse --config.data.fold=0 --workdir=runs/scn-paper-f0

Validation runs the inference of stage 2 on every held-out case: the whole column along z (x, y
centred on the mean of the ground-truth centroids, so stage 1 is not needed), sliding windows
merged by max, candidate peaks, the anatomical sequence (exact DP), then the VerSe identification
rate (20 mm rule) and the mean localisation distance (mm) of the identified landmarks.
`<workdir>/export` holds the step with the highest identification rate (ties: the smaller
distance, then the earlier step); `<workdir>/export-last` the last step.
"""

import numpy as np

from experiments import common, trainer
from verse_jax import metrics, stages
from verse_jax.data import pipeline as data_pipeline
from verse_jax.infer import predict
from verse_jax.models import initial_sigmas
from verse_jax.train import stage_losses
from verse_jax.train import state as train_state


def make_evaluate(ctx: common.Context):
    cases = common.val_cases(ctx)
    volumes = [common.stage_volume(case) for case in cases]
    overlap = ctx.config.eval.overlap_z

    def evaluate(state):
        model = common.stage_network(ctx, state)
        results = []
        for case, volume in zip(cases, volumes, strict=True):
            gt_mm = case.geometry.index_to_physical(case.landmarks_vox.astype(np.float64))
            center_mm = gt_mm[case.valid].mean(axis=0)
            points_mm, valid = predict.predict_landmarks(
                volume, center_mm, model, overlap_z=overlap
            )
            results.append(
                metrics.landmark_localization_metrics(points_mm, valid, gt_mm, case.valid)
            )
        return {
            "id_rate": common.summary([r.id_rate for r in results]),
            "mean_distance_mm": common.summary([r.mean_distance_mm for r in results]),
            "num_predicted": float(np.mean([r.num_pred for r in results])),
            "num_gt": float(np.mean([r.num_gt for r in results])),
        }

    return evaluate


def make_stage(config) -> trainer.Stage:
    """The stage of `config` (experiments/configs/scn.py): network, loss, validation."""
    o = config.optim
    network = {
        "num_landmarks": config.data.num_landmarks,
        "preset": config.model.preset,
        "conv_impl": config.model.conv_impl,
        "head_init_std": config.model.head_init_std,
    }
    if config.model.spatial_downsample:  # 0: the preset's
        network["spatial_downsample"] = config.model.spatial_downsample
    return trainer.Stage(
        factory=stages.FACTORIES["scn"],
        factory_kwargs=network,
        make_loss=lambda apply, landmarks: stage_losses.make_scn_loss(
            apply,
            weight_decay=o.weight_decay,
            sigma_weight=o.sigma_weight,
            scale=o.heatmap_scale,
            landmark_weights=None
            if landmarks is None
            else data_pipeline.landmark_loss_weights(landmarks, o.rare_landmark_weight),
        ),
        make_evaluate=make_evaluate,
        select=("id_rate", "max"),
        tie_break=("mean_distance_mm", "min"),
        sigmas=np.asarray(initial_sigmas(config.data.num_landmarks, o.sigma_init)),
        uses_training_landmarks=o.rare_landmark_weight > 0,
    )


def train_and_evaluate(config, workdir) -> train_state.TrainState:
    """Trains stage 2 with `config` (experiments/configs/scn.py) into `workdir`."""
    return common.run(config, workdir, make_stage(config))


if __name__ == "__main__":
    common.main("scn", train_and_evaluate)
