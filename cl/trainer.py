"""Building the Lightning Trainer of one training phase (a task, or the base stage)."""

from __future__ import annotations

import pytorch_lightning as pl

from typing import Callable

from cl.dist import world_size
from cl.fsdp import STRATEGY as FSDP, make_strategy
from cl.progress import PlainProgress, StatusRichBar, is_tty


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


def make_trainer(max_steps: int, trainer_kwargs: dict, label: str, callbacks=(), logger=None,
                 progress_every: int = 50, status=None) -> pl.Trainer:
    """A Trainer for ``max_steps`` optimizer steps; ``trainer_kwargs`` come from ``conf/trainer``."""
    callbacks = list(callbacks)
    if trainer_kwargs.get("strategy") == FSDP:  # a fresh Lightning FSDP2 strategy per fit (cl.fsdp)
        trainer_kwargs = {**trainer_kwargs, "strategy": make_strategy(world_size(trainer_kwargs))}
    tty = is_tty()
    if tty:
        callbacks.append(StatusRichBar(status))
    else:
        callbacks.append(PlainProgress(label, every=progress_every, status=status))
    return pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=tty,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # batches are sharded by cl.dist.ShardBatches
        **trainer_kwargs,
    )
