"""A-GEM: averaged gradient episodic memory (Chaudhry et al., ICLR 2019), for answer tokens.

An episodic memory keeps ``per_task`` training rows of every finished task. At each optimizer step the
reference gradient ``g_ref`` is the gradient of the answer cross-entropy on a random memory minibatch
(``batch_size`` rows); when the step's gradient ``g`` conflicts with it (``g . g_ref < 0``), ``g`` is
projected onto the half-space where it does not:

    g <- g - (g . g_ref / g_ref . g_ref) g_ref

so that, to first order, the step does not increase the memory's loss. Nothing happens during the first
task (the memory is empty). The projection acts on the full gradient of all trainable parameters, before
gradient clipping; RL steps are projected against the memory's SFT loss on its reference answers.
"""

from __future__ import annotations

import copy

import random

import pytorch_lightning as pl
import torch

from cl.core.components import Component
from cl.core.data import collate_sft, model_inputs
from cl.core.losses import answer_cross_entropy


def project(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """A-GEM's projection of the flattened gradient ``grads`` against ``ref``; returns ``(grads, projected)``."""
    dot = sum((g.double() * r.double()).sum() for g, r in zip(grads, ref))  # in float64: the sign decides
    if dot >= 0:
        return grads, False
    norm = sum((r.double() * r.double()).sum() for r in ref)
    if norm <= 0:
        return grads, False
    scale = dot / norm
    return [(g.double() - scale * r.double()).to(g.dtype) for g, r in zip(grads, ref)], True


class _Project(pl.Callback):
    def __init__(self, agem: "AGEM"):
        self.agem = agem

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.agem.step(pl_module.model)


class AGEM(Component):
    """A-GEM (``regularizer=agem``).

    Args:
        per_task: memory rows kept from each finished task (a seeded random sample of its training rows).
        batch_size: memory rows per reference gradient.
        fmt: the run's prompt format; seed: seeds the memory's rows and the minibatch draws.
    """

    key = "agem"
    ckpt_attrs = ("memory", "rng", "steps", "projected")
    in_step_params = True

    @classmethod
    def check_config(cls, c, at: str) -> None:
        c.integer(f"{at}.per_task", minimum=1)
        c.integer(f"{at}.batch_size", minimum=1)

    def __init__(self, fmt, per_task: int = 256, batch_size: int = 16, seed: int = 0):
        if per_task < 1 or batch_size < 1:
            raise ValueError(f"per_task and batch_size must be >= 1, got {per_task}, {batch_size}")
        self.fmt, self.per_task, self.batch_size, self.seed = fmt, per_task, batch_size, seed
        self.memory: list[list[list[int]]] = []  # [prompt_ids, answer_ids]
        self.rng = random.Random(seed)
        self.steps = 0  # steps with a reference gradient
        self.projected = 0  # of which the gradient was projected

    def on_task_end(self, ctx) -> None:
        rows = ctx.task.train.to_list()
        random.Random(f"{self.seed}/{ctx.task.name}/{ctx.task_idx}/agem").shuffle(rows)
        rows = rows[: self.per_task]
        self.memory += [list(map(copy.copy, p)) for p in self.fmt.encode([r["prompt"] for r in rows],
                                                                         [r["answer"] for r in rows])]  # keeps images

    def callbacks(self) -> list[pl.Callback]:
        return [_Project(self)]

    def reference_gradient(self, model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        pairs = [self.memory[i] for i in self.rng.sample(range(len(self.memory)), min(self.batch_size, len(self.memory)))]
        device = params[0].device
        b = collate_sft(pairs, self.fmt.pad_id)
        logits = model(**model_inputs(b, device)).logits
        loss = answer_cross_entropy(logits, b["labels"].to(device))
        return list(torch.autograd.grad(loss, params, allow_unused=True))

    def step(self, model: torch.nn.Module) -> None:
        """Project the gradients now in ``.grad`` (called after backward, before clipping and the update)."""
        if not self.memory:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return  # a skipped (non-finite) step
        with torch.enable_grad():
            ref = self.reference_gradient(model, params)
        ref = [torch.zeros_like(p) if r is None else r.detach() for p, r in zip(params, ref)]
        grads, projected = project([p.grad for p in params], ref)
        self.steps += 1
        if projected:
            self.projected += 1
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.grad.copy_(g)

    def record(self) -> dict:
        return {"memory_size": len(self.memory), "steps": self.steps, "projected_steps": self.projected,
                "projected_fraction": self.projected / self.steps if self.steps else None}
