"""Which past task to replay (task weights by age) and how much (the replay fraction over a task's steps).

Task weights at current task ``k`` for a buffered item of past task ``j`` (``k - j >= 1``):

- ``uniform``: every past task equally likely (items weighted ``1 / items of their task``);
- ``power_law``: ``(k - j + 1) ** -exponent`` (Gandhi et al. 2024's form, exponent 0.5 by default);
- ``exponential``: ``exp(-rate * (k - j))``, the control with the same monotone decay but a thin tail.

Rate schedule of the replay fraction over the steps of one task: ``constant``; ``warmup`` (linear from 0
to the fraction over ``rate_steps``); ``decay`` (linear from the fraction to 0 over the task).
"""

from __future__ import annotations

import math
from collections import Counter

TASK_SCHEDULES = ("uniform", "power_law", "exponential")
RATE_SCHEDULES = ("constant", "warmup", "decay")


def task_weight(age: int, schedule: str, exponent: float = 0.5, rate: float = 1.0) -> float:
    """Un-normalised weight of a task learned ``age >= 1`` tasks ago."""
    if schedule == "uniform":
        return 1.0
    if schedule == "power_law":
        return float(age + 1) ** -exponent
    if schedule == "exponential":
        return math.exp(-rate * age)
    raise ValueError(f"schedule: '{schedule}' is not one of {', '.join(TASK_SCHEDULES)}")


def item_weights(item_tasks: list[str], task_order: dict[str, int], current: int, schedule: str,
                 exponent: float = 0.5, rate: float = 1.0) -> list[float]:
    """Per-item sampling weights (sum 1): each task's weight split evenly over its buffered items, so the
    schedule sets the mixture over tasks whatever the buffer's composition."""
    counts = Counter(item_tasks)
    w_task = {n: task_weight(max(1, current - task_order.get(n, current - 1)), schedule, exponent, rate)
              for n in counts}
    total = sum(w_task.values())
    return [w_task[n] / total / counts[n] for n in item_tasks]


def replay_fraction(step: int, steps: int, fraction: float, schedule: str = "constant", rate_steps: int = 0) -> float:
    """The replay fraction of the batch at ``step`` (0-based) of a task of ``steps`` steps."""
    if schedule == "constant":
        return fraction
    if schedule == "warmup":
        return fraction * min(1.0, (step + 1) / max(1, rate_steps))
    if schedule == "decay":
        return fraction * (1.0 - step / max(1, steps))
    raise ValueError(f"rate_schedule: '{schedule}' is not one of {', '.join(RATE_SCHEDULES)}")
