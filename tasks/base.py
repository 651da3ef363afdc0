"""The task value object: data plus a verifier.

A task's ``train`` and ``eval`` splits are ``datasets.Dataset`` objects with at least the columns
``prompt`` and ``answer``. Its verifier has the calling shape of a TRL reward function:
``score(completions, **columns) -> list[float]``, one score in [0, 1] per completion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from datasets import Dataset

Verifier = Callable[..., list[float]]


class VerifierError(ValueError):
    """A verifier (or reward function) broke its contract; the message is one line naming the task."""


def _fn_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def checked_scores(task: str, fn: Verifier, completions: list[str], columns: dict, what: str = "verifier",
                   unit_interval: bool = True) -> list[float]:
    """``fn(completions, **columns)`` held to the contract: one finite number per completion (in [0, 1] for
    a verifier, whose scores are accuracies); an exception inside ``fn`` or a broken contract raises
    :class:`VerifierError` with one line naming the task, the function and the problem."""
    where = f"task '{task}': {what} {_fn_name(fn)}"
    try:
        out = fn(completions, **columns)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise VerifierError(f"{where} raised {type(e).__name__}: {first}") from e
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise VerifierError(f"{where} returned {type(out).__name__} {str(out)[:60]!r}; expected one number per "
                            "completion") from None
    if len(values) != len(completions):
        raise VerifierError(f"{where} returned {len(values)} scores for {len(completions)} completions")
    for i, v in enumerate(values):
        if not math.isfinite(v) or (unit_interval and not 0.0 <= v <= 1.0):
            bound = "a finite number in [0, 1]" if unit_interval else "a finite number"
            raise VerifierError(f"{where} returned {v!r} for completion {i}; every score must be {bound}")
    return values


@dataclass(frozen=True)
class Task:
    """One learnable task.

    Attributes:
        name: unique name, used in results files and logs.
        train: training split (columns ``prompt``, ``answer`` and any extras the verifier reads).
        eval: held-out split, disjoint from ``train`` by prompt.
        verifier: scores completions against the row's columns.
        exact_match: True when the verifier is strict string equality with ``answer``; then greedy
            accuracy can be computed in one teacher-forced forward pass.
        family: the generator family (``"user"`` for loaded data).
        reward: the RL reward when it differs from the verifier (e.g. a format term for worked-steps
            prompts); ``None`` means the verifier is the reward.
        source: where user data came from (its train file or hub name), for messages about its rows.
    """

    name: str
    train: Dataset
    eval: Dataset
    verifier: Verifier
    exact_match: bool = True
    family: str = "user"
    reward: Verifier | None = None
    source: str | None = None

    @classmethod
    def from_rows(cls, name: str, train_rows: list[dict], eval_rows: list[dict], verifier: Verifier,
                  exact_match: bool, family: str, reward: Verifier | None = None, source: str | None = None) -> "Task":
        """Build a task from row dicts, tagging every row with ``task = name``."""
        for r in train_rows + eval_rows:
            r["task"] = name
        return cls(name=name, train=Dataset.from_list(train_rows), eval=Dataset.from_list(eval_rows),
                   verifier=verifier, exact_match=exact_match, family=family, reward=reward, source=source)

    def score(self, completions: list[str], **columns) -> list[float]:
        """Score completions (one number in [0, 1] each, checked); ``columns`` are the dataset columns of the
        same rows."""
        return checked_scores(self.name, self.verifier, completions, columns)

    def reward_scores(self, completions: list[str], **columns) -> list[float]:
        """RL rewards: the ``reward`` function when set (one finite number per completion, checked), else
        the verifier's scores."""
        if self.reward is None:
            return self.score(completions, **columns)
        return checked_scores(self.name, self.reward, completions, columns, what="reward", unit_interval=False)
