"""Continual evaluation: score the stream and the general suite at evaluation points.

An evaluation point scores every stream task (``kind`` = ``stream`` for seen tasks, ``future`` for
unseen ones) and every general task on fixed seeded subsets, appends one line per (point, task) to
``curves.jsonl`` and mirrors the numbers to the logger against ``cl/global_iter``. Points happen before
the first update, at every task boundary and, with ``every_n_steps``, inside tasks (the callback).
Evaluation leaves training untouched: RNG states, train/eval mode and gradients are restored.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cl.evaluation import EvalSet, Scorer
from cl.results import dumps_strict
from cl.core.steps import InTaskEveryNSteps


class ContinualEvaluator:
    """Owns the eval subsets, the curves file and the evaluation clock.

    Args:
        scorer: computes per-task accuracy.
        stream: eval sets of the stream tasks, in stream order.
        general: eval sets of the general-capability tasks.
        curves_path: ``curves.jsonl`` (appended to).
        log: ``dict -> None`` mirror (W&B); failures are the logger's business.
        future_tasks: at intermediate points, how many unseen tasks to score (boundaries score all).
        max_samples_per_point: at intermediate points, cap on the items scored over all tasks; each
            task then scores a prefix of its fixed subset (:meth:`inner_items`), so the cost of a point
            does not grow with the stream. Boundary points score more items; they also record, in
            ``acc_at``, each stream task's accuracy on the prefixes the inner points of the tasks before
            and after them score, so the stability gap compares the same items (``analysis.curve_metrics``).
        max_samples_per_boundary: the same cap at task boundaries (default: none, every boundary scores
            the full subsets that fill the accuracy matrix). Long streams set it so that evaluation
            costs the same at every point, at the price of fewer items per matrix entry.
        autocast: evaluate under ``torch.autocast`` with this dtype (None: the model's own precision).
        harness: general tasks scored by lm-evaluation-harness or lmms-eval (:class:`cl.harness.LmEvalGeneral`,
            :class:`cl.harness.LmmsEvalGeneral`), at
            boundaries (and at inner points with its ``inner_points``); their columns follow ``general``'s.
    """

    def __init__(self, scorer: Scorer, stream: list[EvalSet], general: list[EvalSet], curves_path: str | Path,
                 log=None, future_tasks: int = 1, max_samples_per_point: int | None = None,
                 max_samples_per_boundary: int | None = None, autocast: torch.dtype | None = None, harness=None):
        self.scorer, self.stream, self.general = scorer, stream, general
        self.harness = harness
        self.curves_path = Path(curves_path)
        self.log = log
        self.future_tasks = future_tasks
        self.max_samples_per_point = max_samples_per_point
        self.max_samples_per_boundary = max_samples_per_boundary
        self.autocast = autocast  # e.g. bf16 when training runs bf16-mixed: evaluate in the same precision
        self.seconds = 0.0
        self.points = 0
        self.old_task_acc: float | None = None

    @property
    def general_names(self) -> list[str]:
        """The general matrix's columns: the probes of ``general``, then the harness tasks."""
        return [es.name for es in self.general] + (list(self.harness.names) if self.harness else [])

    def status(self) -> str:
        """Short progress text: the latest mean accuracy on earlier tasks."""
        return "" if self.old_task_acc is None else f"old-task acc {self.old_task_acc:.3f}"

    def inner_items(self, task_idx: int) -> int | None:
        """Items per task at the inner points of task ``task_idx`` (None: uncapped, the whole subset)."""
        if not self.max_samples_per_point:
            return None
        scored = sum(1 for j in range(len(self.stream)) if j <= task_idx + self.future_tasks)
        return max(1, self.max_samples_per_point // (scored + len(self.general)))

    def evaluate(self, model: torch.nn.Module, global_iter: int, task_idx: int, train_task: str,
                 boundary: bool) -> dict[str, dict[str, float]]:
        """Score one evaluation point; returns ``{"stream": {name: acc}, "general": {name: acc}}``."""
        start = time.perf_counter()
        result: dict[str, dict[str, float]] = {"stream": {}, "general": {}}
        lines, metrics = [], {"cl/global_iter": global_iter}
        stream = [(j, es) for j, es in enumerate(self.stream) if boundary or j <= task_idx + self.future_tasks]
        n = None
        cap = self.max_samples_per_boundary if boundary else self.max_samples_per_point
        if cap:
            n = max(1, cap // (len(stream) + len(self.general)))
        # the prefixes the inner points of the tasks before and after this boundary score
        prefixes = sorted({k for k in (self.inner_items(task_idx), self.inner_items(task_idx + 1)) if k}) \
            if boundary else []
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]), torch.autocast(device.type, dtype=self.autocast or torch.bfloat16,
                                                               enabled=self.autocast is not None):
            todo = [(j, es.head(n) if n else es) for j, es in stream] + [(None, es.head(n) if n else es)
                                                                          for es in self.general]
            items = self.scorer.item_scores(model, [es for _, es in todo])
            for (j, es), scores in zip(todo, items):
                acc = sum(scores) / len(scores)
                kind = "general" if j is None else ("stream" if j <= task_idx else "future")
                result["general" if j is None else "stream"][es.name] = acc
                line = self._line(global_iter, task_idx, train_task, es.name, kind, acc, boundary, len(es))
                if j is not None and any(k < len(scores) for k in prefixes):
                    line["acc_at"] = {str(k): sum(scores[:k]) / k for k in prefixes if k < len(scores)}
                lines.append(line)
                metrics[f"eval/{kind}/{es.name}"] = acc
            point = None
            if self.harness is not None and (boundary or self.harness.settings.inner_points):
                point = self.harness.evaluate(model)
                for name, acc in point.scores.items():
                    result["general"][name] = acc
                    line = self._line(global_iter, task_idx, train_task, name, "general", acc, boundary,
                                      point.items[name])
                    lines.append({**line, "metric": point.metric[name]})
                    metrics[f"eval/general/{name}"] = acc
        probes = [result["general"][es.name] for es in self.general]  # the same columns at every point
        if probes:
            metrics["eval/general_mean"] = sum(probes) / len(probes)
        if point is not None and point.scores:
            metrics[f"eval/{self.harness.settings.kind}_mean"] = sum(point.scores.values()) / len(point.scores)
        seen = [result["stream"][es.name] for es in self.stream[: task_idx + 1] if es.name in result["stream"]]
        if seen:
            metrics["eval/seen_mean"] = sum(seen) / len(seen)
        old = seen[:-1]  # tasks before the one being trained
        if old:
            self.old_task_acc = sum(old) / len(old)
            metrics["eval/old_mean"] = self.old_task_acc
        with self.curves_path.open("a") as f:
            f.writelines(dumps_strict(line) + "\n" for line in lines)
        if self.log is not None:
            self.log(metrics)
        self.seconds += time.perf_counter() - start
        self.points += 1
        return result

    @staticmethod
    def _line(global_iter, task_idx, train_task, eval_task, kind, acc, boundary, n) -> dict:
        return {"global_iter": global_iter, "task_idx": task_idx, "train_task": train_task,
                "eval_task": eval_task, "kind": kind, "acc": acc, "boundary": boundary, "n": n}


def EvalEveryNSteps(evaluator: ContinualEvaluator, n: int, train_task: str) -> InTaskEveryNSteps:
    """An evaluation point every ``n`` optimizer steps inside a task (not at its last step, which the task
    boundary covers)."""
    return InTaskEveryNSteps(n, lambda m: evaluator.evaluate(m.model, m.global_iter, m.task_idx, train_task,
                                                             boundary=False))
