"""Training: the Ray Train driver, the DeepSpeed worker loop, models, checkpoints and exports."""
