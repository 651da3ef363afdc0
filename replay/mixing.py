"""Experience replay: a buffer filled at task ends and mixed into each batch at a fraction of the batch.

``ExperienceReplay`` is a stream component (``on_task_end`` fills the buffer) and the loader factory's
source of replayed rows (``MixedBatchSampler``). The batch size stays the same: with fraction ``a``, a
batch of ``B`` holds ``round(a * B)`` replayed rows and the rest from the current task (equivalently a
replay rate ``a / (1 - a)`` per new example). Replayed rows go through the objective's collate function
like new ones: SFT trains on their reference answers, GRPO rolls them out and rewards them on-policy
with their own task's verifier (rows keep their ``task`` column).

With fraction 0, or before any task has ended, the loader is exactly the loader without replay (same
sampler, same generator), so a run with ``replay.er.fraction=0`` is bit-identical to one without it.
"""

from __future__ import annotations

import random
from collections import Counter

import torch
from torch.utils.data import Sampler

from replay.buffers import BUFFERS, make_buffer
from replay.schedules import RATE_SCHEDULES, TASK_SCHEDULES, item_weights, replay_fraction
from cl.core.components import Component


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of indices into ``new + replay`` items: ``n_new`` indices first, replay items after.

    Args:
        n_new: number of current-task items (indices ``0 .. n_new-1``).
        weights: sampling weights of the replay items (indices ``n_new ..``).
        steps, batch_size: batches to yield and their size.
        fraction_at: ``step -> replay fraction`` of that batch.
        seed: seeds two generators, one for new-task draws and one for replay draws.
    """

    def __init__(self, n_new: int, weights: list[float], steps: int, batch_size: int, fraction_at, seed: int):
        self.n_new, self.weights = n_new, torch.tensor(weights, dtype=torch.double)
        self.steps, self.batch_size, self.fraction_at, self.seed = steps, batch_size, fraction_at, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        g_new = torch.Generator().manual_seed(self.seed)
        g_rep = torch.Generator().manual_seed(self.seed + 7919)
        for step in range(self.steps):
            r = int(round(self.fraction_at(step) * self.batch_size))
            r = min(r, self.batch_size) if len(self.weights) else 0
            new = torch.randint(self.n_new, (self.batch_size - r,), generator=g_new).tolist()
            rep = (torch.multinomial(self.weights, r, replacement=True, generator=g_rep) + self.n_new).tolist() if r else []
            yield new + rep


class ExperienceReplay(Component):
    """Experience replay (ER) over the stream's tasks.

    Args:
        fraction: fraction of each batch taken from the buffer (0 <= fraction < 1).
        buffer: ``reservoir`` or ``balanced``.
        capacity: buffer size in rows.
        schedule, exponent, rate: past-task weights (``replay/schedules.py``).
        rate_schedule, rate_steps: the fraction over a task's steps.
        fill_per_task: rows of each finished task offered to the buffer (its training rows in a seeded
            random order; all of them when larger than the split).
        seed: seeds the buffer and the offer order.
    """
    key = "replay"
    ckpt_attrs = ("buffer", "task_order", "replayed")

    @classmethod
    def check_config(cls, c, at: str) -> None:
        frac, cap = c.get(f"{at}.fraction"), c.get(f"{at}.capacity")
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
            c.add(f"{at}.fraction", f"must be a number in [0, 1) (the replayed share of each batch), got {frac!r}")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            c.add(f"{at}.capacity", f"must be an integer >= 1, got {cap!r}")
        c.choice(f"{at}.buffer", tuple(BUFFERS))
        c.choice(f"{at}.schedule", TASK_SCHEDULES)
        c.choice(f"{at}.rate_schedule", RATE_SCHEDULES)
        c.number(f"{at}.exponent", lo=0.0)
        c.number(f"{at}.rate", lo=0.0)
        c.integer(f"{at}.rate_steps", minimum=0)
        c.integer(f"{at}.fill_per_task", minimum=1)

    def __init__(self, fraction: float = 0.25, buffer: str = "reservoir", capacity: int = 1000,
                 schedule: str = "uniform", exponent: float = 0.5, rate: float = 1.0,
                 rate_schedule: str = "constant", rate_steps: int = 0, fill_per_task: int = 5000, seed: int = 0):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction: must be in [0, 1), got {fraction}")
        self.fraction, self.schedule, self.exponent, self.rate = fraction, schedule, exponent, rate
        self.rate_schedule, self.rate_steps, self.fill_per_task, self.seed = rate_schedule, rate_steps, fill_per_task, seed
        self.buffer = make_buffer(buffer, capacity, seed)
        self.task_order: dict[str, int] = {}
        self.replayed = 0

    # -- stream hooks ---------------------------------------------------------------------------------
    def on_task_end(self, ctx) -> None:
        task = ctx.task
        rows = task.train.to_list()
        random.Random(f"{self.seed}/{task.name}/{ctx.task_idx}/fill").shuffle(rows)
        for r in rows[: self.fill_per_task]:
            r.setdefault("task", task.name)
            self.task_order.setdefault(r["task"], ctx.task_idx)
        self.buffer.extend(rows[: self.fill_per_task])

    # -- loader side ----------------------------------------------------------------------------------
    def batch_mixer(self) -> "ExperienceReplay":
        return self

    def active(self) -> bool:
        return self.fraction > 0 and len(self.buffer) > 0

    def sampler(self, n_new: int, steps: int, batch_size: int, task_idx: int, seed: int) -> MixedBatchSampler:
        weights = item_weights(self.buffer.tasks(), self.task_order, task_idx, self.schedule, self.exponent, self.rate)

        def fraction_at(step: int) -> float:
            return replay_fraction(step, steps, self.fraction, self.rate_schedule, self.rate_steps)

        self.replayed += sum(int(round(fraction_at(s) * batch_size)) for s in range(steps))
        return MixedBatchSampler(n_new, weights, steps, batch_size, fraction_at, seed)

    def rows(self) -> list[dict]:
        return self.buffer.items

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "task_order": dict(self.task_order), "replayed": self.replayed}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.task_order, self.replayed = dict(state["task_order"]), state["replayed"]

    def record(self) -> dict:
        counts = Counter(self.buffer.tasks())
        return {"buffer_size": len(self.buffer), "replayed_rows": self.replayed,
                "buffer_tasks": {n: counts[n] for n in self.task_order}}
