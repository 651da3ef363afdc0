"""Building the Lightning Trainer of one training phase (a task, or the base stage)."""

from __future__ import annotations

import pytorch_lightning as pl

from cl.dist import world_size
from cl.fsdp import STRATEGY as FSDP, make_strategy
from cl.progress import PlainProgress, StatusRichBar, is_tty


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
