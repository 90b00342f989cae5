"""Training scripts of the three stages and their configs (`python experiments/train_scn.py`)."""
