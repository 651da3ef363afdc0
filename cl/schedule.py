"""Per-task learning-rate schedules: linear warm-up, then constant, linear or cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

DECAYS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the optimizer's base LR as a function of the step within one task.

    Attributes:
        warmup_steps: linear warm-up from ~0 to 1 over this many steps.
        decay: ``constant`` (stay at 1), ``linear`` or ``cosine`` (to ``min_lr_ratio`` at the task end).
        min_lr_ratio: final multiplier of the decays.
        decay_fraction: the decay occupies this final fraction of the task's steps (1.0 = all steps
            after warm-up); the rest stays at 1.
    """

    warmup_steps: int = 0
    decay: str = "constant"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 1.0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"schedule.decay: '{self.decay}' is not one of {', '.join(DECAYS)}")

    def lr_lambda(self, total_steps: int) -> Callable[[int], float]:
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
