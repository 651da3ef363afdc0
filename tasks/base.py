"""The task value object: data plus a verifier.

A task's ``train`` and ``eval`` splits are ``datasets.Dataset`` objects with at least the columns
``prompt`` and ``answer``. Its verifier has the calling shape of a TRL reward function:
``score(completions, **columns) -> list[float]``, one score in [0, 1] per completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from datasets import Dataset

Verifier = Callable[..., list[float]]


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
    """

    name: str
    train: Dataset
    eval: Dataset
    verifier: Verifier
    exact_match: bool = True
    family: str = "user"
    reward: Verifier | None = None

    @classmethod
    def from_rows(cls, name: str, train_rows: list[dict], eval_rows: list[dict], verifier: Verifier,
                  exact_match: bool, family: str, reward: Verifier | None = None) -> "Task":
        """Build a task from row dicts, tagging every row with ``task = name``."""
        for r in train_rows + eval_rows:
            r["task"] = name
        return cls(name=name, train=Dataset.from_list(train_rows), eval=Dataset.from_list(eval_rows),
                   verifier=verifier, exact_match=exact_match, family=family, reward=reward)

    def score(self, completions: list[str], **columns) -> list[float]:
        """Score completions; ``columns`` are the dataset columns of the same rows."""
        return self.verifier(completions, **columns)

    def reward_scores(self, completions: list[str], **columns) -> list[float]:
        """RL rewards: the ``reward`` function when set, else the verifier's scores."""
        return (self.reward or self.verifier)(completions, **columns)
