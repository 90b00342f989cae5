"""Training: train state and step, losses, the `fit` loop, data parallelism and checkpoints.

``state`` (TrainState, the TF piecewise-constant schedule, the pure train step), ``losses`` (loss
terms), ``stage_losses`` (each stage's loss function), ``loop`` (`fit` and the metric writer),
``sharding`` (the `data` mesh), ``checkpoint`` (orbax checkpoints with Grain's iterator handler).
"""
