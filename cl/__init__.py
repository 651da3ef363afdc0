"""The engine of the continual post-training suite: entry point, task loop, the LightningModule."""
