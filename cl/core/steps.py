"""Callbacks that act every n optimizer steps (per-step components, in-task evaluation and checkpoints)."""

from __future__ import annotations

from typing import Callable

import pytorch_lightning as pl


class EveryNSteps(pl.Callback):
    """Calls ``fn(module)`` after every ``n``-th optimizer step of the stream (``module.global_iter``),
    for per-step components (Reptile interpolation, k-FPF, EMA)."""

    def __init__(self, n: int, fn: Callable[[pl.LightningModule], None]):
        self.n, self.fn = n, fn

    def on_train_batch_end(self, trainer, pl_module, *_):
        if pl_module.global_iter % self.n == 0:
            self.fn(pl_module)


class InTaskEveryNSteps(pl.Callback):
    """Calls ``fn(module)`` after every ``n``-th optimizer step of the current task (``module.step_in_task``,
    which counts on across a resume inside the task), except the task's last step: the task boundary
    covers that one (in-task evaluation points, mid-task checkpoints)."""

    def __init__(self, n: int, fn: Callable[[pl.LightningModule], None]):
        self.n, self.fn = n, fn

    def on_train_batch_end(self, trainer, pl_module, *_):
        step = pl_module.step_in_task
        if step % self.n == 0 and step < pl_module.task_steps:
            self.fn(pl_module)
