"""Per-task learning-rate schedules: linear warm-up, then constant, linear or cosine decay; or the
"infinite" schedule (Ibrahim et al. 2024) across the stream.

Re-warming and re-decaying (the per-task restart; docs/methods.md section 3, Replay) is the default
shape: every task warms up again over ``warmup_steps`` and decays to ``min_lr_ratio``. ``infinite``
does not depend on the total budget: warm-up and a cosine cooldown to ``const_ratio`` happen once, in
the first task; every later step stays at the constant, except the final ``decay_fraction`` of each task,
which anneals linearly to ``min_lr_ratio`` so that the model evaluated at each task end is annealed
(the next task resumes at the constant; the paper branches its annealed checkpoints off the constant
trajectory instead, which a single stream cannot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

DECAYS = ("constant", "linear", "cosine", "infinite")


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the optimizer's base LR as a function of the step within one task.

    Attributes:
        warmup_steps: linear warm-up from ~0 to 1 over this many steps.
        decay: ``constant`` (stay at 1), ``linear`` or ``cosine`` (to ``min_lr_ratio`` at the task end).
        min_lr_ratio: final multiplier of the decays.
        decay_fraction: the decay occupies this final fraction of the task's steps (1.0 = all steps
            after warm-up); the rest stays at 1. For ``infinite``: the anneal at each task's end.
        const_ratio, cooldown_steps: ``infinite`` only: the constant level and the first task's cosine
            cooldown from 1 to it.
    """

    warmup_steps: int = 0
    decay: str = "constant"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 1.0
    const_ratio: float = 0.5
    cooldown_steps: int = 0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"schedule.decay: '{self.decay}' is not one of {', '.join(DECAYS)}")

    def lr_lambda(self, total_steps: int, task_idx: int = 0) -> Callable[[int], float]:
        if self.decay == "infinite":
            return self._infinite(total_steps, task_idx)
        decay_start = max(self.warmup_steps, int(total_steps * (1.0 - self.decay_fraction)))
        decay_len = max(1, total_steps - decay_start)

        def fn(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            if self.decay == "constant" or step < decay_start:
                return 1.0
            frac = min(1.0, (step - decay_start) / decay_len)
            if self.decay == "linear":
                shape = 1.0 - frac
            else:
                shape = 0.5 * (1.0 + math.cos(math.pi * frac))
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

        return fn

    def _infinite(self, total_steps: int, task_idx: int) -> Callable[[int], float]:
        anneal_start = int(round(total_steps * (1.0 - self.decay_fraction))) if self.decay_fraction > 0 else total_steps
        anneal_len = max(1, total_steps - anneal_start)
        c = self.const_ratio

        def fn(step: int) -> float:
            if step >= anneal_start:
                return c + (self.min_lr_ratio - c) * min(1.0, (step - anneal_start + 1) / anneal_len)
            if task_idx == 0 and step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            if task_idx == 0 and step < self.warmup_steps + self.cooldown_steps:
                frac = (step - self.warmup_steps) / max(1, self.cooldown_steps)
                return c + (1.0 - c) * 0.5 * (1.0 + math.cos(math.pi * frac))
            return c

        return fn


@dataclass(frozen=True)
class TrainSettings(LRSchedule):
    """``train.*``: the per-task learning-rate schedule (the fields of :class:`LRSchedule`) and how each task
    trains. The one place these defaults are written (the config's ``train`` node takes them from here).

    Attributes:
        reset_optimizer_per_task: a fresh optimizer state at every task start (false: carried over).
        nonfinite: what a NaN/inf loss or reward does: ``stop`` (failed results, last checkpoint kept) or
            ``skip`` (the batch is counted and skipped, no update).
        compile: training forwards through ``torch.compile`` (dynamic shapes); evaluation and generation
            stay eager.
    """

    reset_optimizer_per_task: bool = True
    nonfinite: str = "stop"
    compile: bool = False

    def schedule(self) -> LRSchedule:
        return LRSchedule(**{f.name: getattr(self, f.name) for f in fields(LRSchedule)})
