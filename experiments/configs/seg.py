"""Stage 3, vertebrae segmentation (U-Net, one binary mask per vertebra crop).

Commands (from the repository root):
    python experiments/train_seg.py                                   # demo on the phantoms
    python experiments/train_seg.py --config=experiments/configs/seg.py:paper \\
        --config.data.root=/data/verse --config.data.fold=all --workdir=runs/seg-paper

demo: built-in phantoms, demo U-Net (4 levels, 16 filters) at 2.5 mm on 40 x 40 x 40 crops
    around the vertebrae, moderate augmentation, unsmoothed target, cross-entropy + soft Dice,
    Adam 1e-3 (x0.5 after 800, x0.1 after 1000), 1200 steps; the best validation step is
    exported. Curves and times over seeds: README, "Training".
paper: reference §6 (submitted model): 1 mm, 128 x 128 x 96, Adam 1e-4 with clip_by_global_norm
    1.0 (x0.5 after 20k, x0.1 after 40k), 50k steps, weight decay 1e-6, batch 1.
smoke: a tiny network for tests, two steps in seconds.
"""

from experiments.configs import DEMO_AUGMENTATION, apply_smoke, base_config, check_preset
from verse_jax import stages


def get_config(arg=None):
    preset = check_preset(arg)
    c = base_config("seg", preset)
    c.optim.weight_decay = 1e-6
    c.optim.clip_norm = 1.0
    c.optim.dice_weight = 0.0  # soft Dice term added to the cross-entropy (paper: none)
    # Crop centre behind the centroid and the centroid channel's sigma (verse_jax.stages).
    c.data.posterior_offset_mm = stages.SEG_PAPER.posterior_offset_mm
    c.data.heatmap_sigma_vox = stages.SEG_PAPER.heatmap_sigma_vox
    # Gaussian (voxels) smoothing the one-hot label crop before the argmax (training target only).
    c.data.target_smoothing_vox = stages.SEG_PAPER.target_smoothing_vox
    if preset == "paper":
        c.model.preset = "paper"
        c.optim.name, c.optim.lr = "adam", 1e-4
        c.optim.boundaries, c.optim.scales = (20_000, 40_000), (0.5, 0.1)
        c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 50_000, 5_000, 5_000
    elif preset == "demo":
        # 100 mm crops at 2.5 mm (a 1 mm-grid mask downsampled to 2.5 mm and back keeps Dice 0.95;
        # at 3 mm 0.92), moderate augmentation, cross-entropy + soft Dice, 64 phantoms.
        c.data.phantom_cases = 64
        c.data.spacing_mm, c.data.crop_size, c.data.smoothing_mm = 2.5, (40, 40, 40), 0.75
        c.data.aug.update(DEMO_AUGMENTATION | {"translation_mm": 3.0, "rotation_rad": 0.1})
        # No target smoothing. The paper's 1 voxel is 1 mm; 1 voxel of 2.5 mm eroded the target
        # (predicted masks 15-20 % too small: Dice 0.81 / Hausdorff 16 mm in the pipeline on
        # fresh phantoms, 0.87 / 8.7 mm without), and 1 mm (0.4 voxels) cannot change any voxel
        # of the argmax (sigmas up to 0.5 voxels leave it unchanged). README, Training.
        c.data.target_smoothing_vox = 0.0
        c.model.preset = "demo"
        c.optim.name, c.optim.lr, c.optim.dice_weight = "adam", 1e-3, 1.0
        c.optim.boundaries, c.optim.scales = (800, 1_000), (0.5, 0.1)
        c.train.num_steps, c.train.log_every = 1_200, 10
        c.train.eval_every, c.train.checkpoint_every = 100, 100
    else:  # smoke
        apply_smoke(c)
        c.data.spacing_mm, c.data.crop_size, c.data.smoothing_mm = 6.0, (16, 16, 16), 2.0
    c.lock()
    return c
