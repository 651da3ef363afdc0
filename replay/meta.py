"""Efficient meta-experience replay (Abbes et al. 2025, Reptile-style), and k-FPF (Zhao et al. 2023).

``ReptileInterpolation``: every ``every`` optimizer steps, ``theta = anchor + eps * (theta - anchor)``,
then ``anchor = theta``; the anchor starts at the stream's starting weights. ``eps = 1`` is the identity.
Used together with experience replay (the "meta-experience" part is the replayed batches).

``KFPF``: instead of replay at every step, every ``every`` optimizer steps fine-tune only the
forgetting-prone modules (parameters whose names contain one of ``modules``, e.g. norms and the LM
head, optionally the top ``top_blocks`` transformer blocks) for ``steps`` SGD steps on minibatches of
its own replay buffer (a reservoir over every task's rows, each task's added at its start), with the
answer cross-entropy.
"""

from __future__ import annotations

import random
import re

import pytorch_lightning as pl
import torch

from cl.core.steps import EveryNSteps

from cl.core.data import collate_sft, model_inputs
from cl.core.losses import answer_cross_entropy
from replay.buffers import make_buffer
from cl.core.components import Component


class ReptileInterpolation(Component):
    """Reptile-style interpolation every ``every`` steps: ``theta <- anchor + eps * (theta - anchor)``,
    then the anchor moves to ``theta`` (``meta=reptile``)."""
    key = "meta_replay"
    ckpt_attrs = ("anchor", "applied")
    in_step_params = True

    @classmethod
    def check_config(cls, c, at: str) -> None:
        c.number(f"{at}.eps", lo=0.0, hi=1.0, strict_lo=True)
        c.integer(f"{at}.every", minimum=1)

    def __init__(self, eps: float = 0.1, every: int = 100):
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"eps: must be in (0, 1], got {eps}")
        self.eps, self.every, self.anchor = eps, every, None
        self.applied = 0

    def record(self) -> dict:
        return {"interpolations": self.applied}

    @torch.no_grad()
    def interpolate(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.anchor:
                a = self.anchor[n]
                p.copy_(a + self.eps * (p - a))
                a.copy_(p)
        self.applied += 1

    def on_task_start(self, ctx) -> None:
        if self.anchor is None:
            self.anchor = {n: p.detach().clone() for n, p in ctx.module.model.named_parameters() if p.requires_grad}

    def callbacks(self) -> list[pl.Callback]:
        return [EveryNSteps(self.every, lambda module: self.interpolate(module.model))]


class KFPF(Component):
    """k-FPF: every ``every`` steps, ``steps`` SGD steps on a buffer of the rows seen so far, updating only
    the forgetting-prone modules (names containing one of ``modules``, plus the top ``top_blocks``
    transformer blocks) (``meta=kfpf``).

    The buffer is a reservoir over every task's training rows, each task's added at its start, so the
    current task is in it from the first round on. ``lm_head`` in ``modules`` means the output layer: when
    the model ties it to the input embedding (no ``lm_head`` parameter of its own), the tied matrix is
    tuned, which moves the input embedding with it (the only way to tune a tied output layer)."""
    key = "kfpf"
    ckpt_attrs = ("buffer", "rng", "updates")
    in_step_params = True

    @classmethod
    def check_config(cls, c, at: str) -> None:
        for k in ("every", "steps", "batch_size", "capacity"):
            c.integer(f"{at}.{k}", minimum=1)
        c.integer(f"{at}.top_blocks", minimum=0)
        c.number(f"{at}.lr", lo=0.0, strict_lo=True)

    def __init__(self, fmt, every: int = 50, steps: int = 5, lr: float = 1e-4, batch_size: int = 16,
                 modules: tuple[str, ...] = ("norm", "lm_head"), top_blocks: int = 0, capacity: int = 1000,
                 seed: int = 0):
        self.fmt, self.every, self.steps, self.lr, self.batch_size = fmt, every, steps, lr, batch_size
        self.modules, self.top_blocks, self.seed = tuple(modules), top_blocks, seed
        self.buffer = make_buffer("reservoir", capacity, seed)
        self.rng = random.Random(seed)
        self.updates = 0
        self._pairs: list | None = None  # the buffer's token ids, re-encoded when the buffer changes

    def record(self) -> dict:
        return {"rounds": self.updates, "buffer_size": len(self.buffer)}

    def selected(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        layers = sorted({int(m.group(1)) for n, _ in model.named_parameters() if (m := re.search(r"layers\.(\d+)\.", n))})
        top = set(layers[-self.top_blocks:]) if self.top_blocks else set()
        out = {}
        for n, p in model.named_parameters():
            m = re.search(r"layers\.(\d+)\.", n)
            if any(k in n for k in self.modules) or (m and int(m.group(1)) in top):
                out[n] = p
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if "lm_head" in self.modules and head is not None and not any(p is head.weight for p in out.values()):
            # tied: the output layer's weight is registered under the input embedding's name
            out.update({n: p for n, p in model.named_parameters() if p is head.weight})
        return out

    def on_task_start(self, ctx) -> None:
        rows = ctx.task.train.to_list()
        random.Random(f"{self.seed}/{ctx.task.name}/kfpf").shuffle(rows)
        self.buffer.extend(rows)
        self._pairs = None

    def fine_tune(self, model: torch.nn.Module) -> None:
        if not len(self.buffer):
            return
        params = self.selected(model)
        opt = torch.optim.SGD(params.values(), lr=self.lr)
        frozen = [p for n, p in model.named_parameters() if n not in params and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        device = next(model.parameters()).device
        if self._pairs is None:
            items = self.buffer.items
            self._pairs = self.fmt.encode([r["prompt"] for r in items], [r["answer"] for r in items])
        pairs = self._pairs
        try:
            for _ in range(self.steps):
                b = collate_sft([pairs[self.rng.randrange(len(pairs))] for _ in range(self.batch_size)], self.fmt.pad_id)
                logits = model(**model_inputs(b, device)).logits
                loss = answer_cross_entropy(logits, b["labels"].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)
            model.zero_grad(set_to_none=True)
        self.updates += 1

    def callbacks(self) -> list[pl.Callback]:
        return [EveryNSteps(self.every, lambda module: self.fine_tune(module.model))]
