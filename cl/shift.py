"""Distribution-shift probes measured at task ends (RL's Razor, Shenfeld, Pari, Agrawal 2025).

- ``forward_kl``: KL(pi_0 || pi) on the current task's prompts, pi_0 = the model at the task start.
  RL's Razor finds forgetting grows with it.
- ``kl_base_general`` / ``kl_base_prev``: KL(base || current) on general-task prompts and on earlier
  stream tasks' prompts (base = the model before the stream). In the toy prototype this tracked general
  retention across runs (../shared/TOYWORLD.md).

Simplification: the KL is the mean per-token KL of the next-token distributions along the
*reference* answers (teacher forcing, one forward pass per model), not a Monte-Carlo estimate over
samples of pi_0. Both models see identical prefixes, so it is exact for those prefixes and cheap.
Keeping pi_0 and the base costs two frozen copies of the model; ``eval.shift_metrics=false`` turns
the probe off for large models.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cl.data import collate_sft
from cl.evaluation import EvalSet


@torch.no_grad()
def answer_token_kl(p_model: torch.nn.Module, q_model: torch.nn.Module, pairs, pad_id: int,
                    batch_size: int = 256) -> float:
    """Mean over answer positions (answer tokens and eos) of KL(p(.|prefix) || q(.|prefix))."""
    device = next(q_model.parameters()).device
    total, count = 0.0, 0
    modes = (p_model.training, q_model.training)
    p_model.eval()
    q_model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collate_sft(pairs[start : start + batch_size], pad_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            scored = (batch["labels"][:, 1:] != -100).to(device)
            logp = F.log_softmax(p_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            logq = F.log_softmax(q_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            total += kl[scored].sum().item()
            count += int(scored.sum())
    finally:
        p_model.train(modes[0])
        q_model.train(modes[1])
    return total / max(1, count)


class DistributionShiftProbe:
    """A task-boundary component: snapshots the model at the stream start and each task start, and at
    each task end records the KLs above. ``records`` holds one dict per task."""

    def __init__(self, stream: list[EvalSet], general: list[EvalSet], pad_id: int, n: int = 100,
                 log=None):
        self.stream, self.general, self.pad_id, self.n, self.log = stream, general, pad_id, n, log
        self.base: torch.nn.Module | None = None
        self.task_start: torch.nn.Module | None = None
        self.records: list[dict] = []

    @staticmethod
    def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
        c = copy.deepcopy(model).eval()
        for p in c.parameters():
            p.requires_grad_(False)
        return c

    def on_task_start(self, ctx) -> None:
        if self.base is None:
            self.base = self._frozen_copy(ctx.module.model)
        self.task_start = self._frozen_copy(ctx.module.model)

    def on_task_end(self, ctx) -> None:
        model, t = ctx.module.model, ctx.task_idx
        kl = lambda ref, es: answer_token_kl(ref, model, es.pairs[: self.n], self.pad_id)  # noqa: E731
        rec = {"task_idx": t, "task": self.stream[t].name, "global_iter": ctx.module.global_iter,
               "forward_kl": kl(self.task_start, self.stream[t])}
        if self.general:
            rec["kl_base_general"] = sum(kl(self.base, es) for es in self.general) / len(self.general)
        if t > 0:
            rec["kl_base_prev"] = sum(kl(self.base, es) for es in self.stream[:t]) / t
        self.records.append(rec)
        self.task_start = None
        if self.log is not None:
            self.log({"cl/global_iter": rec["global_iter"],
                      **{f"shift/{k}": v for k, v in rec.items() if k.startswith(("forward", "kl_"))}})
