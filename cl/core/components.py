"""The stream component protocol: the one way a method plugs into the task loop.

A component is an object the run builds from its config (replay, regularizers, averaging, adapters, probes,
RL's reference snapshot, ...). The loop (``cl.loop.run_stream``) calls every component's hooks in the order
the run built them, and never asks what class a component is:

    setup(model) -> model            once, before the stream (adapters wrap the model here)
    for each task t:
        on_task_start(ctx)           (a run resumed inside task t calls on_resume(ctx) instead)
        prepare_data(ctx, task)      -> the task to train on (filtered or mixed rows), chained
        callbacks()                  Lightning callbacks of the task's fit (per-step work)
        extra_loss(module, batch, loss) -> (term, logs) or None, added to the objective's loss each step
        batch_mixer()                an object mixing stored rows into the task's batches (replay), or None
        on_task_end(ctx)
    record() -> JSON-able or None    stored in results.json under ``key``
    metrics() -> dict                merged into results.json["metrics"]
    eval_seconds                     evaluation work it did (probes), counted in metrics["eval_seconds"]

State: ``state_dict()`` returns what a checkpoint must hold (by default the attributes named in
``ckpt_attrs``) and ``load_state_dict(state)`` puts it back; the checkpoint converts the values to plain
containers and tensors and back (``cl.checkpoint``). A component whose state cannot be captured sets
``ckpt_attrs = None``: a run with it writes no checkpoints. A run resumed on another number of ranks
gives every rank rank 0's state and then calls ``on_rank_count_change()``, where a component drops state
that belongs to one rank's share of the batch.

Every hook has a no-op default, so a method implements only what it needs. Nothing here imports the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TaskContext:
    """What components see at task boundaries: the task's index in the stream, the task being trained (the
    stream task, or the joint mixture in joint mode), the ``ContinualLM`` and the whole stream."""

    task_idx: int
    task: Any
    module: Any
    stream: list


class Component:
    """Base class of stream components: every hook a no-op (see the module docstring for the order).

    Attributes:
        key: the ``results.json`` key that ``record()`` goes under (``None``: not recorded).
        in_step_params: the component reads or writes parameters inside the training step (under FSDP
            they are shards there, so ``cl.validate`` refuses it with trainer=fsdp).
        ckpt_attrs: attribute names holding the component's checkpoint state; ``None``: cannot be
            checkpointed (a run with it writes no checkpoints and starts over after an interruption).
        replays_general: names of general tasks whose (training) rows the component trains on; general
            retention on the others is reported apart (``general_retention_unreplayed``), because
            retention measured on a replayed task's distribution is partly the replay itself.
    """

    key: str | None = None
    replays_general: tuple[str, ...] = ()
    ckpt_attrs: tuple[str, ...] | None = ()
    in_step_params = False  # reads or writes parameters inside the training step (refused under FSDP)

    @classmethod
    def in_step(cls, node) -> bool:
        """Whether the component configured by ``node`` reads or writes parameters inside the training step."""
        return cls.in_step_params

    @classmethod
    def check_config(cls, check, at: str) -> None:
        """Add the problems of this component's settings at ``at`` (e.g. ``regularizer.ewc``) to ``check``
        (a :class:`cl.core.checks.Checker` over the whole config), before any work."""

    @property
    def label(self) -> str:
        """How messages name the component."""
        return getattr(self, "name", None) or type(self).__name__

    # -- hooks ------------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def on_task_start(self, ctx: TaskContext) -> None:
        pass

    def on_resume(self, ctx: TaskContext) -> None:
        """Instead of ``on_task_start`` when a run resumes inside task ``ctx.task_idx`` (the state that
        ``on_task_start`` built came with the checkpoint)."""

    def on_rank_count_change(self) -> None:
        """After ``load_state_dict`` when a run resumes on another number of ranks (``cl.checkpoint``): every
        rank got rank 0's state; drop what belongs to one rank's share of the batch (e.g. GRPO's reused
        rollout of its prompts)."""

    def prepare_data(self, ctx: TaskContext, task):
        return task

    def callbacks(self) -> list:
        return []

    def extra_loss(self, module, batch: dict, loss: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
        return None

    def batch_mixer(self):
        """An object that mixes stored rows into every training batch (experience replay): with
        ``active()``, ``rows()`` and ``sampler(n_new, steps, batch_size, task_idx, seed)``; ``None``: none."""
        return None

    def on_task_end(self, ctx: TaskContext) -> None:
        pass

    # -- results ----------------------------------------------------------------------------------------
    def record(self) -> dict | list | None:
        return None

    def metrics(self) -> dict:
        return {}

    @property
    def eval_seconds(self) -> float:
        return 0.0

    # -- checkpoint state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.ckpt_attrs is None:
            raise TypeError(f"{self.label} cannot be checkpointed")
        return {a: getattr(self, a) for a in self.ckpt_attrs}

    def load_state_dict(self, state: dict) -> None:
        for a, v in state.items():
            setattr(self, a, v)


def resumable(component) -> bool:
    return getattr(component, "ckpt_attrs", None) is not None
