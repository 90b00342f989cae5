"""Stage 2, vertebrae localisation (SpatialConfiguration-Net with learnable sigmas).

Commands (from the repository root):
    python experiments/train_scn.py                                   # demo on the phantoms
    python experiments/train_scn.py --config=experiments/configs/scn.py:paper \\
        --config.data.root=/data/verse --config.data.fold=0 --workdir=runs/scn-paper-f0

demo: built-in phantoms, demo SCN at 4 mm, 32 x 32 x 64 crops, Adam. Expected on a 2-core CPU:
    ~15 minutes; validation identification rate on the held-out phantoms rising to >= 80 %
    (VerSe 20 mm rule), mean localisation distance a few mm (see the final report's curve).
paper: REFERENCE §5 (submitted model): 2 mm, 96 x 96 x 128 windows, SGD Nesterov 0.99, lr 5e-8
    (x0.5 after 50k, x0.1 after 75k), 100k steps, weight decay 5e-4, sigma regulariser 100,
    batch 1. About a week on one GPU in the original; the paper reports ~95 % identification rate.
smoke: a tiny network for tests, two steps in seconds.
"""

from experiments.configs import base_config, check_preset


def get_config(arg=None):
    preset = check_preset(arg)
    c = base_config("scn", preset)
    c.optim.weight_decay = 5e-4
    c.optim.sigma_weight = 100.0  # weight * 0.5 * sum((sigma * valid)^2)
    c.optim.sigma_init = 4.0  # voxels of the stage grid
    c.optim.heatmap_scale = 1000.0  # gamma of the target Gaussians
    c.eval.overlap_z = 96  # sliding windows (crop_size z long) along the whole column
    # Both heads start near 0 (paper: truncated normal 0.001), so their product starts at a
    # saddle that SGD leaves only after thousands of steps; the demo starts further out.
    c.model.head_init_std = 0.001
    if preset == "paper":
        c.data.spacing_mm, c.data.crop_size, c.data.smoothing_mm = 2.0, (96, 96, 128), 0.75
        c.model.preset = "paper"
        c.optim.name, c.optim.lr, c.optim.momentum = "sgd_nesterov", 5e-8, 0.99
        c.optim.boundaries, c.optim.scales = (50_000, 75_000), (0.5, 0.1)
        c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 100_000, 5_000, 5_000
    elif preset == "demo":
        c.data.spacing_mm, c.data.crop_size, c.data.smoothing_mm = 4.0, (32, 32, 64), 1.5
        c.model.preset, c.model.head_init_std = "demo", 0.01
        # The heatmap loss is a sum over ~65k voxels x 25 channels: Adam is scale-free.
        c.optim.name, c.optim.lr = "adam", 1e-3
        c.optim.boundaries, c.optim.scales = (1_000, 1_300), (0.5, 0.1)
        c.train.num_steps, c.train.log_every = 1_500, 10
        c.train.eval_every, c.train.checkpoint_every = 100, 100
        c.eval.overlap_z = 32
    else:  # smoke
        c.data.phantom_cases = 4
        c.data.spacing_mm, c.data.crop_size, c.data.smoothing_mm = 8.0, (16, 16, 16), 3.0
        c.model.preset, c.model.conv_impl = "tiny", "lax"
        c.optim.name, c.optim.lr = "adam", 1e-3
        c.optim.boundaries, c.optim.scales = (1,), (0.5,)
        c.train.num_steps, c.train.log_every = 2, 1
        c.train.eval_every, c.train.checkpoint_every = 2, 2
        c.eval.overlap_z, c.eval.max_cases = 8, 1
    c.lock()
    return c
