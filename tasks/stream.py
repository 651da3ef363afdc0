"""Streams: ordered lists of tasks (``conf/stream/*.yaml``), and the joint multi-task mixture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from datasets import concatenate_datasets

from tasks.base import Task
from tasks.registry import build_task
from tasks.user_data import load_user_task


def build_tasks(specs: Sequence[str | Mapping], n_train: int, n_eval: int, seed: int) -> list[Task]:
    """Build each entry: a registered synthetic task name, or a mapping describing user data."""
    tasks = []
    for spec in specs:
        if isinstance(spec, str):
            tasks.append(build_task(spec, n_train=n_train, n_eval=n_eval, seed=seed))
        else:
            tasks.append(load_user_task(**dict(spec), seed=seed))
    return tasks


def joint_task(tasks: Sequence[Task]) -> Task:
    """All tasks' training rows in one task (the multi-task upper bound); rows keep their ``task`` column.

    Only the columns every task has are kept, so verifiers that need extra columns should be scored
    per task (evaluation always is).
    """
    common = set.intersection(*(set(t.train.column_names) for t in tasks))
    parts = [t.train.select_columns(sorted(common)) for t in tasks]
    return Task(
        name="joint",
        train=concatenate_datasets(parts),
        eval=concatenate_datasets([t.eval.select_columns(sorted(common)) for t in tasks]),
        verifier=tasks[0].verifier,
        exact_match=all(t.exact_match for t in tasks),
        family="joint",
        reward=tasks[0].reward,
    )
