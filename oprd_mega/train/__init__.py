"""The training entry point: the on-policy loop, checkpoints, metrics and evaluation."""
