"""Shared by the benchmark scripts: steady-state steps/s of one suite training run."""

from __future__ import annotations

import time

import pytorch_lightning as pl

from cl.trainer import make_trainer


class StepClock(pl.Callback):
    """Wall time from the end of optimizer step ``warmup`` to the end of the last step; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before those two readings so queued GPU work is counted (not after
    every step, which would stop the host from queuing the next step while the GPU works)."""

    def __init__(self, warmup: int, sync=None):
        self.warmup, self.sync, self.t0, self.t1 = warmup, sync, 0.0, 0.0

    def on_train_batch_end(self, trainer, *_):
        step = trainer.global_step
        if self.sync is not None and step in (self.warmup, trainer.max_steps):
            self.sync()
        if step == self.warmup:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()


def suite_steps_per_second(module, loader, steps: int, warmup: int, sync=None, **trainer_kwargs) -> float:
    """Train ``module`` for ``steps`` steps with the suite's Trainer (one CPU unless ``trainer_kwargs`` say
    otherwise); steps/s after ``warmup``."""
    clock = StepClock(warmup, sync)
    kwargs = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "log_every_n_steps": 10, **trainer_kwargs}
    make_trainer(steps, kwargs, "bench", callbacks=[clock], progress_every=10**9).fit(module, loader)
    return (steps - warmup) / (clock.t1 - clock.t0)
