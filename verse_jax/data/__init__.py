"""Training data: augmentation, cached stage volumes, per-stage samples and the Grain pipelines.

``augmentation`` (random parameters on the host, applied on the device), ``cache`` (each case
resampled once onto its stage grid, cached on disk), ``samples`` (host samples and the device
transform; prediction cuts its inputs with the same sampler at identity), ``pipeline`` (Grain
datasets for training and evaluation).
"""
