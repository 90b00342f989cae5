"""Stage 1, spine localisation (U-Net regressing the spinal centreline heatmap).

Commands (from the repository root):
    python experiments/train_spine.py                                 # demo on the phantoms
    python experiments/train_spine.py --config=experiments/configs/spine.py:paper \\
        --config.data.root=/data/verse --config.data.fold=0 --workdir=runs/spine-paper-f0

demo: built-in phantoms, demo U-Net (4 levels, 16 filters) at 8 mm on 32 x 32 x 64 crops, the
    paper's augmentation, Adam 1e-3 (x0.5 after 400, x0.1 after 500), 600 steps; the best
    validation step is exported. Curves and times over seeds: README, "Training".
paper: reference §4: 8 mm, 64 x 64 x 128, Adam 1e-4 (x0.5 after 10k, x0.1 after 15k), 20k
    steps, weight decay 5e-4, batch 1.
smoke: a tiny network for tests, two steps in seconds.
"""

from experiments.configs import apply_smoke, base_config, check_preset


def get_config(arg=None):
    preset = check_preset(arg)
    c = base_config("spine", preset)
    c.optim.weight_decay = 5e-4
    c.optim.heatmap_sigma = 3.0  # voxels: spine target Gaussians and their blur
    if preset == "paper":
        c.model.preset = "paper"
        c.optim.name, c.optim.lr = "adam", 1e-4
        c.optim.boundaries, c.optim.scales = (10_000, 15_000), (0.5, 0.1)
        c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 20_000, 5_000, 5_000
    elif preset == "demo":
        c.data.phantom_cases = 64  # the data set of the other two demo stages
        c.data.crop_size = (32, 32, 64)
        c.model.preset = "demo"
        c.optim.name, c.optim.lr = "adam", 1e-3
        c.optim.boundaries, c.optim.scales = (400, 500), (0.5, 0.1)
        c.train.num_steps, c.train.log_every = 600, 10
        c.train.eval_every, c.train.checkpoint_every = 100, 100
    else:  # smoke
        apply_smoke(c)
        c.data.spacing_mm, c.data.crop_size = 16.0, (16, 16, 16)
    c.lock()
    return c
