"""The outer continual loop: plain Python over the stream, Lightning inside each task.

    evaluate the starting model (base_acc, general_base)
    for t, task in enumerate(stream):
        components.on_task_start(ctx), components.prepare_data(ctx, task)
        trainer.fit(module, data of task t)       (components' callbacks and extra_loss terms inside)
        components.on_task_end(ctx)
        evaluate at the boundary -> row t of R and of the general matrix
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from cl.continual_eval import ContinualEvaluator, EvalEveryNSteps
from cl.core.components import Component, TaskContext
from cl.module import ContinualLM
from cl.trainer import make_trainer
from tasks.base import Task


@dataclass
class StreamResult:
    tasks: list[str]
    general_tasks: list[str]
    base_acc: list[float] = field(default_factory=list)
    general_base: list[float] = field(default_factory=list)
    acc_matrix: list[list[float]] = field(default_factory=list)
    general_matrix: list[list[float]] = field(default_factory=list)
    task_end_iters: list[int] = field(default_factory=list)
    train_seconds: float = 0.0


def run_stream(
    module: ContinualLM,
    stream: list[Task],
    phases: list[Task],
    make_loader: Callable[[Task, int], DataLoader],
    evaluator: ContinualEvaluator,
    trainer_kwargs: dict,
    steps_per_task: int,
    eval_every_n_steps: int | None = None,
    logger=None,
    components: Sequence[Component] = (),
    on_task_end: Callable[[int, StreamResult], None] | None = None,
    checkpointer=None,
    resume: dict | None = None,
    on_task_seed: Callable[[int], None] | None = None,
    device: torch.device | None = None,
) -> StreamResult:
    """Train ``module`` phase by phase and fill the accuracy matrices.

    Args:
        stream: the stream tasks (columns of the accuracy matrix).
        phases: what each phase trains on: the stream itself (sequential mode) or, in joint mode, the
            mixture of all tasks repeated once per stream task (same budget, same evaluation points).
        make_loader: ``(phase_task, t) -> DataLoader`` of exactly ``steps_per_task`` batches.
        on_task_end: called after each boundary evaluation (e.g. to write partial results).
        checkpointer: ``cl.run.Checkpointer`` (or None): ``save(task_idx, step_in_task, res, phase)`` at
            every boundary and, through its callback, inside tasks.
        resume: a loaded checkpoint's loop state (``task_idx``, ``step_in_task``, ``result``,
            ``phase_rows``); the module, components, evaluator and RNGs are already restored.
        on_task_seed: called with ``t`` before task ``t``'s start hooks (distributed runs re-seed the global
            RNG there, so ranks whose sampling consumed different amounts of it agree again).
        device: where the model lives between fits (Lightning moves it to the CPU when a fit ends); task
            hooks, reference copies and boundary evaluation then run on the accelerator.
    """
    names = [t.name for t in stream]
    if resume is None:
        res = StreamResult(tasks=names, general_tasks=evaluator.general_names)
        first = evaluator.evaluate(module.model, 0, -1, "base", boundary=True)
        res.base_acc = [first["stream"][n] for n in names]
        res.general_base = [first["general"][name] for name in evaluator.general_names]
        t0, k0 = 0, 0
    else:
        res = StreamResult(**resume["result"])
        t0, k0 = resume["task_idx"], resume["step_in_task"]

    def status() -> str:
        k = module.task_idx
        old = evaluator.status()
        return f"task {k + 1}/{len(stream)} {names[k]}" + (f" | {old}" if old else "")

    for t in range(t0, len(phases)):
        phase = phases[t]
        ctx = TaskContext(t, phase, module, stream)
        skip = k0 if t == t0 else 0  # steps of this task done before the interruption
        if skip:  # resumed inside the task: its start hooks ran before; their state came with the checkpoint
            module.start_task(t, steps_per_task, start_iter=module.global_iter_offset - skip)
            if resume.get("phase_rows") is not None:
                phase = replace_rows(phase, resume["phase_rows"])
            for c in components:
                c.on_resume(ctx)
        else:
            if on_task_seed is not None:
                on_task_seed(t)
            for c in components:
                c.on_task_start(ctx)
            module.start_task(t, steps_per_task)
            for c in components:  # data components (e.g. RIF-RFT) return a filtered or mixed task
                phase = c.prepare_data(ctx, phase)
        # per-step components (Reptile interpolation, k-FPF) act before a same-step evaluation sees the model
        callbacks = [cb for c in components for cb in c.callbacks()]
        if eval_every_n_steps:
            callbacks.append(EvalEveryNSteps(evaluator, eval_every_n_steps, names[t]))
        if checkpointer is not None:  # last: a checkpoint holds the evaluations of its step
            callbacks += checkpointer.callbacks(res, phase if phase is not phases[t] else None)
        trainer = make_trainer(steps_per_task - skip, trainer_kwargs, f"task {t + 1}/{len(stream)} {names[t]}",
                               callbacks=callbacks, logger=logger, status=status)
        t_start, e0 = time.perf_counter(), evaluator.seconds
        trainer.fit(module, skip_batches(make_loader(phase, t), skip))
        res.train_seconds += time.perf_counter() - t_start - (evaluator.seconds - e0)  # minus inner evaluation
        module.end_task(trainer.global_step)
        if device is not None:
            module.to(device)
        for c in components:
            c.on_task_end(ctx)
        row = evaluator.evaluate(module.model, module.global_iter, t, names[t], boundary=True)
        res.acc_matrix.append([row["stream"][n] for n in names])
        res.general_matrix.append([row["general"][name] for name in evaluator.general_names])
        res.task_end_iters.append(module.global_iter)
        seen = res.acc_matrix[-1][: t + 1]
        print(f"[eval] after task {t + 1}/{len(stream)} {names[t]}: "
              + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, res.acc_matrix[-1]))
              + f" | seen mean {sum(seen) / len(seen):.3f}", flush=True)
        if on_task_end is not None:
            on_task_end(t, res)
        if checkpointer is not None and t + 1 < len(phases):
            checkpointer.save(t + 1, 0, res, None)
    return res


def replace_rows(task: Task, rows: list[dict]) -> Task:
    """``task`` training on ``rows`` (a data component's selection, restored from a checkpoint)."""
    from datasets import Dataset

    return dataclasses.replace(task, train=Dataset.from_list(rows))


class _SkipSampler(Sampler):
    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)


def skip_batches(loader: DataLoader, skip: int) -> DataLoader:
    """``loader`` without its first ``skip`` batches: the same index stream, fast-forwarded by indices only
    (no data is loaded for the skipped batches)."""
    if not skip:
        return loader
    return DataLoader(loader.dataset, batch_sampler=_SkipSampler(loader.batch_sampler, skip),
                      collate_fn=loader.collate_fn, generator=loader.generator)
