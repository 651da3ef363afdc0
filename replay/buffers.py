"""Replay buffers: reservoir sampling over everything seen, or per-task quotas (task-balanced).

Items are row dicts (``prompt``, ``answer``, ``task`` and any verifier columns), so a replayed SFT
example carries its reference answer and a replayed RL prompt carries what its verifier needs. Both
buffers are seeded and have ``state_dict`` / ``load_state_dict`` (items, counters and RNG state), so a
resumed run continues with the same buffer and the same future draws.
"""

from __future__ import annotations

import random
from collections.abc import Iterable


class ReservoirBuffer:
    """Algorithm R: after ``n`` offers, every offered item is in the buffer with probability ``capacity / n``.

    Args:
        capacity: maximum number of items (>= 1).
        seed: seeds the replacement decisions.
    """

    kind = "reservoir"

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.capacity, self.items, self.seen = capacity, [], 0
        self.rng = random.Random(seed)

    def add(self, item: dict) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return
        j = self.rng.randrange(self.seen)
        if j < self.capacity:
            self.items[j] = item

    def extend(self, items: Iterable[dict]) -> None:
        for it in items:
            self.add(it)

    def __len__(self) -> int:
        return len(self.items)

    def tasks(self) -> list[str]:
        return [it["task"] for it in self.items]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "capacity": self.capacity, "items": list(self.items), "seen": self.seen,
                "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind or state["capacity"] != self.capacity:
            raise ValueError(f"replay buffer state is a {state['kind']} of capacity {state['capacity']}; "
                             f"this run has a {self.kind} of capacity {self.capacity}")
        self.items, self.seen = list(state["items"]), state["seen"]
        self.rng.setstate(_tuplify(state["rng"]))


class TaskBalancedBuffer:
    """Equal quotas per task: with ``m`` tasks seen each keeps ``capacity // m`` items (the first
    ``capacity % m`` tasks one more), each a reservoir over its own task's items; when a new task arrives
    the older tasks shrink to the new quota by dropping uniformly chosen items.
    """

    kind = "balanced"

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.capacity = capacity
        self.per_task: dict[str, list[dict]] = {}
        self.seen: dict[str, int] = {}
        self.rng = random.Random(seed)

    def quotas(self) -> dict[str, int]:
        names = list(self.per_task)
        q, r = divmod(self.capacity, max(1, len(names)))
        return {n: q + (1 if i < r else 0) for i, n in enumerate(names)}

    def add(self, item: dict) -> None:
        name = item["task"]
        if name not in self.per_task:
            self.per_task[name], self.seen[name] = [], 0
            for n, quota in self.quotas().items():  # shrink the older tasks to the new quota
                slot = self.per_task[n]
                while len(slot) > quota:
                    slot.pop(self.rng.randrange(len(slot)))
        quota = self.quotas()[name]
        slot = self.per_task[name]
        self.seen[name] += 1
        if len(slot) < quota:
            slot.append(item)
            return
        j = self.rng.randrange(self.seen[name])
        if j < quota:
            slot[j] = item

    def extend(self, items: Iterable[dict]) -> None:
        for it in items:
            self.add(it)

    @property
    def items(self) -> list[dict]:
        return [it for slot in self.per_task.values() for it in slot]

    def __len__(self) -> int:
        return sum(len(s) for s in self.per_task.values())

    def tasks(self) -> list[str]:
        return [it["task"] for it in self.items]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "capacity": self.capacity, "per_task": {k: list(v) for k, v in self.per_task.items()},
                "seen": dict(self.seen), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind or state["capacity"] != self.capacity:
            raise ValueError(f"replay buffer state is a {state['kind']} of capacity {state['capacity']}; "
                             f"this run has a {self.kind} of capacity {self.capacity}")
        self.per_task = {k: list(v) for k, v in state["per_task"].items()}
        self.seen = dict(state["seen"])
        self.rng.setstate(_tuplify(state["rng"]))


def _tuplify(x):
    """``random.getstate()`` after a JSON round trip comes back as lists; ``setstate`` wants tuples."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


BUFFERS = {"reservoir": ReservoirBuffer, "balanced": TaskBalancedBuffer}


def make_buffer(kind: str, capacity: int, seed: int = 0):
    if kind not in BUFFERS:
        raise ValueError(f"buffer: '{kind}' is not one of {', '.join(BUFFERS)}")
    return BUFFERS[kind](capacity, seed)
