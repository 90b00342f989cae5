"""Stage 3 training: the vertebra segmentation U-Net (one binary mask per vertebra crop).

    python experiments/train_seg.py                        # demo on the built-in phantoms
    python experiments/train_seg.py --config=experiments/configs/seg.py:paper \\
        --config.data.root=/data/verse --workdir=runs/seg-paper

Validation: Dice of the thresholded prediction (probability > 0.5) with the vertebra's mask, on
the crops around every ground-truth centroid of the held-out cases; mean over vertebrae.
`<workdir>/export` holds the step with the highest mean Dice, `<workdir>/export-last` the last.
"""

import jax
import numpy as np

from experiments import common, trainer
from verse_jax import metrics, stages
from verse_jax.train import stage_losses
from verse_jax.train import state as train_state


def make_evaluate(ctx: common.Context):
    batches = common.eval_batches(ctx, batch_size=2)

    @jax.jit
    def predict(params, batch):
        logits = ctx.model.apply({"params": params}, batch["image"], train=False)
        return logits[..., 0] > 0, batch["label"][..., 0] > 0.5, batch["example_mask"]

    def evaluate(state):
        dice = []
        for batch in batches:
            pred, label, ok = jax.device_get(predict(state.params, batch))
            dice += [
                float(metrics.dice_score(p, g))
                for p, g, k in zip(pred, label, ok, strict=True)
                if k
            ]
        return {"dice": common.summary(dice), "dice_min": float(np.min(dice)) if dice else np.nan}

    return evaluate


def make_stage(config) -> trainer.Stage:
    """The stage of `config` (experiments/configs/seg.py): network, loss, validation."""
    return trainer.Stage(
        factory=stages.FACTORIES["seg"],
        factory_kwargs={"preset": config.model.preset, "conv_impl": config.model.conv_impl},
        make_loss=lambda apply, _: stage_losses.make_seg_loss(
            apply, weight_decay=config.optim.weight_decay, dice_weight=config.optim.dice_weight
        ),
        make_evaluate=make_evaluate,
        select=("dice", "max"),
    )


def train_and_evaluate(config, workdir) -> train_state.TrainState:
    """Trains stage 3 with `config` (experiments/configs/seg.py) into `workdir`."""
    return common.run(config, workdir, make_stage(config))


if __name__ == "__main__":
    common.main("seg", train_and_evaluate)
