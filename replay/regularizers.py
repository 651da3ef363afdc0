"""Rehearsal-free regularizers, each a loss term returned to ``ContinualLM`` (docs/methods.md section 4, Regularizers).

- ``L2Anchor``: ``coef * sum (theta - theta_0)^2`` to the weights the stream started from.
- ``EWC``: ``coef * sum F_i (theta_i - theta*_i)^2``, online: after each task the diagonal empirical
  Fisher ``F_new`` (mean squared gradients of the answer cross-entropy over ``fisher_batches`` batches of
  that task's training rows, for SFT and RL runs alike) is folded in as ``F = gamma * F + F_new`` and the
  anchor ``theta*`` moves to the task-end weights. Zero during the first task.
- ``KLDistill`` (LwF-style): ``coef * T^2 * KL(p_start / T || p / T)`` to a frozen copy of the model as it
  was at the task start, on the current batch's inputs (all non-padding positions of SFT sequences;
  the prompts of RL batches).
"""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F

from cl.core.data import collate_prompts, collate_sft, model_inputs
from cl.core.losses import answer_cross_entropy
from cl.core.components import Component


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class L2Anchor(Component):
    """``coef * sum (theta - theta_0)^2`` to the weights the stream started from (``regularizer=l2``)."""
    ckpt_attrs = ("anchor",)
    in_step_params = True

    @classmethod
    def check_config(cls, c, at: str) -> None:
        c.number(f"{at}.coef", lo=0.0)
    def __init__(self, coef: float):
        self.coef, self.anchor = coef, None

    def on_task_start(self, ctx) -> None:
        if self.anchor is None:
            self.anchor = {n: p.detach().clone() for n, p in _trainable(ctx.module.model).items()}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        params = _trainable(model)
        return sum(((params[n] - a) ** 2).sum() for n, a in self.anchor.items() if n in params)

    def extra_loss(self, module, batch, loss=None):
        pen = self.penalty(module.model)
        return self.coef * pen, {"reg/l2": pen.detach()}


class EWC(Component):
    """Online EWC re-anchored at every task end (``regularizer=ewc``).

    The Fisher is the empirical diagonal Fisher: the mean over ``fisher_batches x stream_batch_size``
    training rows of each row's *own* squared gradient (the row's answer cross-entropy, token mean), as
    in Kirkpatrick et al. (2017). Squaring a minibatch-mean gradient instead would be biased low and
    vanish at convergence, where per-row gradients cancel."""
    ckpt_attrs = ("fisher", "anchor")
    in_step_params = True

    @classmethod
    def check_config(cls, c, at: str) -> None:
        c.number(f"{at}.coef", lo=0.0)
        c.number(f"{at}.gamma", lo=0.0, hi=1.0)
        c.integer(f"{at}.fisher_batches", minimum=1)

    def __init__(self, coef: float, fmt, gamma: float = 1.0, fisher_batches: int = 10, stream_batch_size: int = 16,
                 seed: int = 0):
        self.coef, self.fmt, self.gamma = coef, fmt, gamma
        self.fisher_batches, self.batch_size, self.seed = fisher_batches, stream_batch_size, seed
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None

    def estimate_fisher(self, model: torch.nn.Module, rows: list[dict]) -> dict[str, torch.Tensor]:
        params = _trainable(model)
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        rng = random.Random(self.seed)
        pairs = self.fmt.encode([r["prompt"] for r in rows], [r["answer"] for r in rows])
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        n_rows = self.fisher_batches * self.batch_size
        names = list(params)
        for _ in range(self.fisher_batches):
            b = collate_sft([pairs[rng.randrange(len(pairs))] for _ in range(self.batch_size)], self.fmt.pad_id)
            logits = model(**model_inputs(b, device)).logits
            labels = b["labels"].to(device)
            for i in range(labels.size(0)):  # one gradient per row, squared, then averaged over rows
                grads = torch.autograd.grad(answer_cross_entropy(logits[i:i + 1], labels[i:i + 1]),
                                            [params[n] for n in names], retain_graph=True, allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        fisher[n] += g.detach() ** 2 / n_rows
        model.zero_grad(set_to_none=True)
        model.train(was)
        return fisher

    def on_task_end(self, ctx) -> None:
        model = ctx.module.model
        new = self.estimate_fisher(model, ctx.task.train.to_list())
        self.fisher = new if self.fisher is None else {n: self.gamma * self.fisher[n] + f for n, f in new.items()}
        self.anchor = {n: p.detach().clone() for n, p in _trainable(model).items()}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        if self.fisher is None:
            return torch.zeros((), device=next(model.parameters()).device)
        params = _trainable(model)
        return sum((self.fisher[n] * (params[n] - a) ** 2).sum() for n, a in self.anchor.items() if n in params)

    def extra_loss(self, module, batch, loss=None):
        pen = self.penalty(module.model)
        return self.coef * pen, {"reg/ewc": pen.detach()}

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.fisher, self.anchor = state["fisher"], state["anchor"]


class KLDistill(Component):
    """LwF-style distillation to the task-start model on the batch's inputs (``regularizer=lwf``)."""
    ckpt_attrs = ("teacher",)

    @classmethod
    def check_config(cls, c, at: str) -> None:
        c.number(f"{at}.coef", lo=0.0)
        c.number(f"{at}.temperature", lo=0.0, strict_lo=True)

    def __init__(self, coef: float, fmt, temperature: float = 1.0):
        self.coef, self.pad_id, self.temperature = coef, fmt.pad_id, temperature
        self.teacher: torch.nn.Module | None = None

    def on_task_start(self, ctx) -> None:
        self.teacher = copy.deepcopy(ctx.module.model).eval().requires_grad_(False)

    def extra_loss(self, module, batch, loss=None):
        device = next(module.model.parameters()).device
        inputs = model_inputs(batch if "input_ids" in batch else collate_prompts(batch["prompt_ids"], self.pad_id),
                              device)
        mask = inputs["attention_mask"]
        logits = module.model(**inputs).logits
        with torch.no_grad():
            t_logits = self.teacher(**inputs).logits
        sel = mask.bool()
        T = self.temperature
        s_logp = F.log_softmax(logits[sel].float() / T, -1)
        t_logp = F.log_softmax(t_logits[sel].float() / T, -1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * T * T
        return self.coef * kl, {"reg/kl": kl.detach()}
