"""The published method: UNet self-training from the nuclei, label-update rules, checkpoints, data-parallel training."""
