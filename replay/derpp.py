"""DER++: dark experience replay with labels (Buzzega et al., NeurIPS 2020), for answer tokens.

A reservoir buffer over every training example the stream has seen keeps the example's token ids and the
model's logits on its answer positions at the time it was seen (its "dark knowledge"). Each step adds

    alpha * MSE(logits_now(x'), logits_stored(x'))  +  beta * CE(answer(x'') | x'')

on two independent minibatches x', x'' of the buffer (the MSE over the answer positions and the whole
vocabulary; the CE is the answer cross-entropy, as SFT's). The current batch enters the buffer with the
logits of the model that is about to be updated on it (one extra no-grad forward: the step's own logits
are not handed to components). RL batches enter with their rows' reference answers.

Departures from the paper, for language models: the stored logits come from a separate no-grad forward
(identical to the step's own without dropout, which the tiny model has none of); rows that experience
replay mixed into a batch enter the buffer like the task's own; with GRPO's ``ppo_epochs > 1`` each
optimizer step's batch enters once per step.

Memory: a stored example holds ``answer_length x vocabulary`` floats (kept in bfloat16 when
``half_logits``); with a real model's 150k-token vocabulary, size ``capacity`` accordingly.
Defaults: alpha 0.1 and beta 0.5 are in the ranges the paper's grid found best on its benchmarks; the
paper tunes them per benchmark.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cl.core.components import Component
from cl.core.data import collate_sft, model_inputs
from cl.core.losses import answer_cross_entropy


class DERPlusPlus(Component):
    """DER++ (``replay=derpp``).

    Args:
        alpha: weight of the logit-matching (MSE) term.
        beta: weight of the label (answer cross-entropy) term.
        capacity: buffer size in examples (reservoir over the whole stream).
        batch_size: examples per replayed minibatch (two are drawn per step).
        half_logits: store logits in bfloat16 (half the memory).
        fmt: the run's prompt format; seed: seeds the reservoir and the minibatch draws.
    """

    key = "derpp"
    ckpt_attrs = ("pairs", "logits", "seen", "gen", "replayed")

    @classmethod
    def check_config(cls, c, at: str) -> None:
        c.number(f"{at}.alpha", lo=0.0)
        c.number(f"{at}.beta", lo=0.0)
        c.integer(f"{at}.capacity", minimum=1)
        c.integer(f"{at}.batch_size", minimum=1)

    def __init__(self, fmt, alpha: float = 0.1, beta: float = 0.5, capacity: int = 500, batch_size: int = 8,
                 half_logits: bool = False, seed: int = 0):
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        if capacity < 1 or batch_size < 1:
            raise ValueError(f"capacity and batch_size must be >= 1, got {capacity}, {batch_size}")
        self.fmt, self.alpha, self.beta, self.capacity, self.batch_size = fmt, alpha, beta, capacity, batch_size
        self.half_logits = half_logits
        self.pairs: list[list[list[int]]] = []  # [prompt_ids, answer_ids] per stored example
        self.logits: list[torch.Tensor] = []  # [answer_len, vocab] per stored example
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.replayed = 0

    # -- buffer --------------------------------------------------------------------------------------------
    def _batch_pairs(self, batch: dict) -> list[tuple[list[int], list[int]]]:
        if "rows" in batch:  # an RL batch: its rows' reference answers
            rows = batch["rows"]
            return self.fmt.encode([r["prompt"] for r in rows], [r["answer"] for r in rows])
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        out = []
        for i in range(ids.size(0)):
            n = int(mask[i].sum())
            answer = (labels[i, :n] != -100).nonzero().flatten()
            start = int(answer[0]) if len(answer) else n
            out.append((ids[i, :start].tolist(), ids[i, start:n].tolist()))
        return out

    @staticmethod
    def answer_logits(logits: torch.Tensor, pairs) -> list[torch.Tensor]:
        """Each example's logits at the positions that predict its answer tokens: ``[len(answer), vocab]``."""
        return [logits[i, len(p) - 1: len(p) - 1 + len(a)] for i, (p, a) in enumerate(pairs)]

    def add(self, pairs, logits: list[torch.Tensor]) -> None:
        """Reservoir sampling: every example seen so far is in the buffer with probability capacity / seen."""
        for pair, lg in zip(pairs, logits):
            self.seen += 1
            lg = lg.detach().to("cpu", torch.bfloat16 if self.half_logits else torch.float32, copy=True)  # not a view
            if len(self.pairs) < self.capacity:
                self.pairs.append([copy.copy(pair[0]), list(pair[1])])  # copy.copy keeps a prompt's images
                self.logits.append(lg)
            else:
                j = int(torch.randint(self.seen, (1,), generator=self.gen))
                if j < self.capacity:
                    self.pairs[j], self.logits[j] = [copy.copy(pair[0]), list(pair[1])], lg

    def _sample(self) -> list[int]:
        n = len(self.pairs)
        return torch.randint(n, (min(self.batch_size, n),), generator=self.gen).tolist()

    # -- the loss term -------------------------------------------------------------------------------------
    def terms(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mse, ce)`` on two fresh minibatches of the buffer (zeros while it is empty)."""
        device = next(model.parameters()).device
        zero = torch.zeros((), device=device)
        if not self.pairs:
            return zero, zero
        mse = ce = zero
        if self.alpha > 0:
            idx = self._sample()
            pairs = [self.pairs[i] for i in idx]
            b = collate_sft(pairs, self.fmt.pad_id)
            logits = model(**model_inputs(b, device)).logits
            now = torch.cat(self.answer_logits(logits, pairs)).float()
            then = torch.cat([self.logits[i] for i in idx]).to(device, torch.float32)
            mse = F.mse_loss(now, then)
        if self.beta > 0:
            idx = self._sample()
            b = collate_sft([self.pairs[i] for i in idx], self.fmt.pad_id)
            logits = model(**model_inputs(b, device)).logits
            ce = answer_cross_entropy(logits, b["labels"].to(device))
        self.replayed += 1
        return mse, ce

    def extra_loss(self, module, batch: dict, loss=None):
        model = module.model
        mse, ce = self.terms(model)
        pairs = self._batch_pairs(batch)
        with torch.no_grad():  # the current batch enters with the logits of the model before this step
            b = collate_sft(pairs, self.fmt.pad_id)
            device = next(model.parameters()).device
            logits = model(**model_inputs(b, device)).logits
        self.add(pairs, self.answer_logits(logits, pairs))
        return self.alpha * mse + self.beta * ce, {"derpp/mse": mse.detach(), "derpp/ce": ce.detach()}

    def record(self) -> dict:
        return {"buffer_size": len(self.pairs), "examples_seen": self.seen, "replay_steps": self.replayed,
                "alpha": self.alpha, "beta": self.beta}
