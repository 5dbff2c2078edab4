"""Training: configs, checkpoints, the trainer."""
