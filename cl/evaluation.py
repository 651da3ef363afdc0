"""Scoring a model on a task's fixed evaluation subset.

Greedy exact match can be computed in one teacher-forced forward pass: greedy decoding reproduces
``answer + eos`` exactly when, given the gold prefix, every answer token and the eos are the argmax
(``tests/test_evaluation.py`` checks this against ``generate``). That shortcut is used where the
task's verifier is strict exact match (``method=auto``); otherwise completions are generated greedily
and scored by the verifier.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from cl.core.data import PromptFormat, collate_sft, model_inputs
from cl.generation import eval_mode, generate_ids
from tasks.base import Task

METHODS = ("auto", "teacher_forced", "generate")


@dataclass
class EvalSet:
    """A fixed, seeded subset of one task's eval split, already tokenized."""

    task: Task
    rows: dict[str, list]
    pairs: list[tuple[list[int], list[int]]]

    @classmethod
    def build(cls, task: Task, fmt: PromptFormat, n: int, seed: int) -> "EvalSet":
        idx = list(range(len(task.eval)))
        random.Random(f"{seed}/{task.name}/evalsubset").shuffle(idx)
        sub = task.eval.select(sorted(idx[: min(n, len(idx))]))
        rows = sub.to_dict()
        return cls(task=task, rows=rows, pairs=fmt.encode(rows["prompt"], rows["answer"]))

    @property
    def name(self) -> str:
        return self.task.name

    def __len__(self) -> int:
        return len(self.pairs)

    def head(self, n: int) -> "EvalSet":
        """The first ``n`` items (the subset stays fixed; a smaller budget takes a prefix of it)."""
        if n >= len(self.pairs):
            return self
        return EvalSet(self.task, {k: v[:n] for k, v in self.rows.items()}, self.pairs[:n])


@torch.inference_mode()
def teacher_forced_correct(
    model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 512
) -> list[bool]:
    """Per example: are all answer tokens and the eos the argmax given the gold prefix?"""
    device = next(model.parameters()).device
    out: list[bool] = []
    for start in range(0, len(pairs), batch_size):
        batch = collate_sft(pairs[start : start + batch_size], pad_id)
        logits = model(**model_inputs(batch, device)).logits
        pred = logits[:, :-1].argmax(-1).cpu()
        target = batch["labels"][:, 1:]
        scored = target != -100
        out.extend(((pred == target) | ~scored).all(-1).tolist())
    return out


@dataclass
class EvalSettings:
    """``eval.*``: how the stream is evaluated. The one place these defaults are written (``conf/eval``
    presets set only what differs).

    Attributes:
        method: ``auto`` (one teacher-forced pass for exact-match tasks, generation otherwise),
            ``teacher_forced`` or ``generate``.
        n_per_task: items in each task's fixed, seeded evaluation subset.
        subset_seed: the seed of those subsets.
        every_n_steps: also evaluate every n optimizer steps inside a task (None: boundaries only).
        max_samples_per_point: cap on the items scored at an inner point, over all tasks (None: no cap).
        max_samples_per_boundary: the same cap at task boundaries (None: the full subsets; long streams
            set it).
        batch_size: evaluation batch size.
        windows: windowed forgetting/plasticity ``wf_<w>``/``wp_<w>``, ``w`` in training iterations (null
            when no two evaluation points are within ``w``: keep ``w >= every_n_steps``).
        max_new_tokens: generation budget beyond the longest reference answer.
        backend: who generates for generation-scored tasks: ``hf`` (transformers ``generate`` on the
            training model) or ``vllm`` (a vLLM engine, the GRPO rollouts' own when they use vLLM; weights
            pushed before each evaluation point; needs vLLM and a GPU). Teacher-forced scoring and the
            harness probe always run on the training model.
    """

    method: str = "auto"
    n_per_task: int = 200
    subset_seed: int = 0
    every_n_steps: int | None = 50
    max_samples_per_point: int | None = 280
    max_samples_per_boundary: int | None = None
    batch_size: int = 256
    windows: list[int] = field(default_factory=lambda: [50, 150])
    max_new_tokens: int = 8
    backend: str = "hf"


class Scorer:
    """Accuracy of a model on an :class:`EvalSet`, by the cheapest exact method.

    Args:
        fmt: prompt format of the run.
        method: ``auto`` (teacher-forced where exact, else generate), ``teacher_forced``, ``generate``.
        max_new_tokens: generation budget beyond the longest reference answer.
        batch_size: evaluation batch size.
        engine: a vLLM engine (``cl.rollouts.VLLMRollouts``) that generates instead of HF ``generate``.
    """

    def __init__(self, fmt: PromptFormat, method: str = EvalSettings.method,
                 max_new_tokens: int = EvalSettings.max_new_tokens, batch_size: int = EvalSettings.batch_size,
                 engine=None):
        if method not in METHODS:
            raise ValueError(f"eval.method: '{method}' is not one of {', '.join(METHODS)}")
        self.fmt, self.method, self.max_new_tokens, self.batch_size = fmt, method, max_new_tokens, batch_size
        self.engine = engine

    def uses_teacher_forcing(self, es: EvalSet) -> bool:
        if self.method == "teacher_forced" and not es.task.exact_match:
            raise ValueError(
                f"eval.method=teacher_forced is exact only for exact-match verifiers; task '{es.name}' has another"
            )
        return self.method == "teacher_forced" or (self.method == "auto" and es.task.exact_match)

    @torch.no_grad()
    def scores(self, model: torch.nn.Module, es: EvalSet) -> list[float]:
        """Per-example scores in [0, 1]; the model's train/eval mode is restored afterwards."""
        with eval_mode(model):
            if self.uses_teacher_forcing(es):
                return [float(c) for c in teacher_forced_correct(model, es.pairs, self.fmt.pad_id, self.batch_size)]
            return self.generated_scores(model, es)

    def generated_scores(self, model: torch.nn.Module, es: EvalSet, pushed: bool = False) -> list[float]:
        longest = max(len(a) for _, a in es.pairs)
        prompts = [p for p, _ in es.pairs]
        if self.engine is not None:
            ids = self.engine.greedy(model, prompts, self.fmt, longest + self.max_new_tokens, push=not pushed)
        else:
            ids = generate_ids(model, prompts, self.fmt, max_new_tokens=longest + self.max_new_tokens,
                               batch_size=self.batch_size)
        completions = [self.fmt.decode(x) for x in ids]
        return es.task.score(completions, **es.rows)

    def accuracy(self, model: torch.nn.Module, es: EvalSet) -> float:
        s = self.scores(model, es)
        return sum(s) / len(s)

    @torch.no_grad()
    def item_scores(self, model: torch.nn.Module, sets: list[EvalSet]) -> list[list[float]]:
        """Per-item scores of each set, with the teacher-forced sets scored together in shared batches (many
        small sets, e.g. a long stream under an evaluation cap, cost about what one set of their total size
        costs); the numbers equal per-set ``scores``."""
        tf = [i for i, es in enumerate(sets) if self.uses_teacher_forcing(es)]
        out: list[list[float] | None] = [None] * len(sets)
        if tf:
            with eval_mode(model):
                correct = teacher_forced_correct(model, [p for i in tf for p in sets[i].pairs], self.fmt.pad_id,
                                                 self.batch_size)
            start = 0
            for i in tf:
                n = len(sets[i])
                out[i] = [float(c) for c in correct[start:start + n]]
                start += n
        rest = [i for i, es in enumerate(sets) if out[i] is None]
        if rest and self.engine is not None:
            self.engine.push(model)  # one weight push per evaluation point, however many sets generate
            with eval_mode(model):
                for i in rest:
                    out[i] = self.generated_scores(model, sets[i], pushed=True)
        for i in rest:
            if out[i] is None:
                out[i] = self.scores(model, sets[i])
        return out

    def accuracies(self, model: torch.nn.Module, sets: list[EvalSet]) -> list[float]:
        """``accuracy`` of each set (scored as in :meth:`item_scores`)."""
        return [sum(s) / len(s) for s in self.item_scores(model, sets)]


def pass_at_k(
    model: torch.nn.Module, es: EvalSet, fmt: PromptFormat, k: int = 8, temperature: float = 1.0,
    max_new_tokens: int = 8, batch_size: int = 128,
) -> float:
    """Fraction of prompts with at least one correct completion among ``k`` samples."""
    longest = max(len(a) for _, a in es.pairs)
    ids = generate_ids(
        model, [p for p, _ in es.pairs], fmt, max_new_tokens=longest + max_new_tokens, do_sample=True,
        temperature=temperature, num_return_sequences=k, batch_size=batch_size,
    )
    completions = [fmt.decode(x) for x in ids]
    cols = {c: [v for v in vals for _ in range(k)] for c, vals in es.rows.items()}
    scores = es.task.score(completions, **cols)
    hits = [max(scores[i * k : (i + 1) * k]) for i in range(len(es.pairs))]
    return sum(hits) / len(hits)
