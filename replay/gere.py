"""GeRe general-sample replay: a fixed set of general examples replayed throughout, with a choice of loss.

Before the first task the replay set's last-layer hidden states ``h0`` are recorded, with the
per-dimension mean ``mu`` and std ``sigma`` over all its (non-padding) tokens; thresholds are
``pos = mu + sigma`` and ``neg = mu - sigma`` (docs/methods.md section 3, Replay). At every training step
a minibatch of the replay set is run through the model and one of these terms is added to the loss:

- ``ce`` (label fitting): cross-entropy on the replayed answers;
- ``kl`` (logit imitation): ``T^2 * KL(p_start / T || p / T)`` on answer positions, against the model as
  it was before the first task (kept as a frozen copy: storing logits would cost ``N x L x vocab``);
- ``l1`` / ``l2``: mean absolute / squared distance of the hidden states to ``h0`` on non-padding tokens;
- ``tm`` (threshold margin, GeRe's method): label fitting plus the TM loss with the dynamic weight
  ``w = max(0, CE) / TM`` (detached) where CE is the step's whole loss (objective + replay CE), clamped
  at 0 because an RL objective's loss can be negative and a negative weight would *maximise* the margin
  violation; or a fixed ``tm_weight`` (the official code's default is a fixed 100).
  TM per element, labelled by ``h0``: positive (``h0 >= pos``) ``relu(pos - h)``; negative
  (``h0 <= neg``) ``relu(h - neg)``; neutral ``relu(h - pos) + relu(neg - h)``; averaged over the
  non-zero elements, padding masked.

``ce``, ``kl``, ``l1`` and ``l2`` are multiplied by ``weight``. "Last-layer hidden states" are the
model's final hidden states (after the final norm, what the LM head reads).

The replay rows come from the training splits of the general tasks named in ``tasks``; by default every
other task of ``stream.general`` (the 1st, 3rd, ...), so the rest are never replayed. The paper replays
generic text and measures general ability on separate benchmarks; here the general tasks are also the
retention probes (their eval splits: disjoint rows of the same distribution), so retention measured on a
replayed task is partly the replay itself. The run reports ``general_retention_unreplayed`` on the tasks
no component replays, which is GeRe's protection of general skills it did not rehearse.
"""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F

from cl.core.data import collate_sft, model_inputs
from cl.core.losses import answer_cross_entropy
from cl.core.components import Component

GERE_LOSSES = ("ce", "kl", "l1", "l2", "tm")


def tm_loss(h: torch.Tensor, h0: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Threshold-margin loss of hidden states ``h`` [B, L, H] labelled by ``h0``; ``mask`` [B, L] 1 on tokens."""
    is_pos, is_neg = h0 >= pos, h0 <= neg
    per = torch.where(is_pos, F.relu(pos - h), torch.where(is_neg, F.relu(h - neg), F.relu(h - pos) + F.relu(neg - h)))
    per = per * mask.unsqueeze(-1).to(per.dtype)
    nonzero = (per > 0).sum()
    return per.sum() / nonzero.clamp(min=1)


class GeneralReplay(Component):
    """Replay a fixed general set with a GeRe loss (a loss component of ``ContinualLM``).

    Args:
        fmt: the run's prompt format.
        general: the general tasks, whose training splits give ``n_samples`` rows drawn evenly (seeded by
            ``data_seed``), or the replay rows themselves (dicts with ``prompt`` and ``answer``).
        n_samples: size of the fixed general replay set.
        loss: one of ``ce``, ``kl``, ``l1``, ``l2``, ``tm``.
        batch_size: replayed examples per training step.
        weight: multiplier of ``ce``/``kl``/``l1``/``l2``.
        tm_weight: ``tm``'s weight on the TM term: None = the dynamic ``max(0, CE) / TM``, a number = fixed.
        tasks: the general tasks whose rows are replayed (None: every other task of ``stream.general``,
            starting with the first; list them all to replay every one).
        temperature: of the ``kl`` imitation.
        seed: seeds the minibatch draws.
    """
    key = "gere"
    ckpt_attrs = ("gen", "h0", "pos", "neg", "teacher")

    @classmethod
    def check_config(cls, c, at: str) -> None:
        c.choice(f"{at}.loss", GERE_LOSSES)
        c.integer(f"{at}.n_samples", minimum=1)
        c.integer(f"{at}.batch_size", minimum=1)
        c.number(f"{at}.weight", lo=0.0)
        c.number(f"{at}.temperature", lo=0.0, strict_lo=True)
        if c.get(f"{at}.tm_weight") is not None:
            c.number(f"{at}.tm_weight", lo=0.0)
        general = list(c.get("stream.general") or [])
        if not general:
            c.add(at, "GeRe replays general samples: stream.general must list at least one task")
        names = [g if isinstance(g, str) else (g or {}).get("name") for g in general]
        if c.get(f"{at}.tasks") is not None and not list(c.get(f"{at}.tasks")):
            c.add(f"{at}.tasks", "must list at least one general task (null: every other task of stream.general)")
        for t in c.get(f"{at}.tasks") or []:
            if t not in names:
                c.add(f"{at}.tasks", f"'{t}' is not a task of stream.general ({', '.join(map(str, names))})")

    def __init__(self, fmt, general: list, n_samples: int = 256, loss: str = "tm", batch_size: int = 4,
                 weight: float = 1.0, tm_weight: float | None = None, tasks: list[str] | None = None,
                 temperature: float = 2.0, data_seed: int = 0, seed: int = 0):
        if general and isinstance(general[0], dict):
            rows, self.replays_general = list(general), ()
        else:
            chosen = general[::2] if tasks is None else [t for t in general if t.name in tasks]
            rows, self.replays_general = general_replay_rows(chosen, n_samples, data_seed), tuple(t.name for t in chosen)
        if loss not in GERE_LOSSES:
            raise ValueError(f"loss: '{loss}' is not one of {', '.join(GERE_LOSSES)}")
        if not rows:
            raise ValueError("the general replay set is empty (stream.general lists no task?)")
        self.fmt, self.loss, self.batch_size, self.weight, self.temperature = fmt, loss, batch_size, weight, temperature
        self.tm_weight = tm_weight
        self.n_rows = len(rows)
        self.pairs = fmt.encode([r["prompt"] for r in rows], [r["answer"] for r in rows])
        self.gen = torch.Generator().manual_seed(seed)
        self.h0: torch.Tensor | None = None  # [N, Lmax, H]
        self.pos = self.neg = None
        self.teacher: torch.nn.Module | None = None

    # -- recording before the first task -------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self, model: torch.nn.Module, batch_size: int = 256) -> None:
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        lmax = max(len(p) + len(a) for p, a in self.pairs)
        states, masks = [], []
        for s in range(0, len(self.pairs), batch_size):
            b = collate_sft(self.pairs[s:s + batch_size], self.fmt.pad_id)
            out = model(**model_inputs(b, device),
                        output_hidden_states=True)
            h = out.hidden_states[-1].float()
            states.append(F.pad(h, (0, 0, 0, lmax - h.size(1))))
            masks.append(F.pad(b["attention_mask"].to(device), (0, lmax - h.size(1))))
        model.train(was)
        self.h0 = torch.cat(states)
        m = torch.cat(masks).bool()
        tokens = self.h0[m]  # [n_tokens, H]
        mu, sigma = tokens.mean(0), tokens.std(0)
        self.pos, self.neg = mu + sigma, mu - sigma
        if self.loss == "kl":
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def on_task_start(self, ctx) -> None:
        if self.h0 is None:
            self.snapshot(ctx.module.model)

    def record(self) -> dict:
        return {"loss": self.loss, "rows": self.n_rows, "replayed_general_tasks": list(self.replays_general),
                "tm_weight": "dynamic: max(0, CE) / TM" if self.tm_weight is None else self.tm_weight}

    # -- the loss term -------------------------------------------------------------------------------------
    def extra_loss(self, module, batch: dict, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        if self.h0 is None:
            raise RuntimeError("GeneralReplay.snapshot(model) must run before training (on_task_start does it)")
        idx = torch.randint(len(self.pairs), (self.batch_size,), generator=self.gen)
        b = collate_sft([self.pairs[i] for i in idx.tolist()], self.fmt.pad_id)
        device = next(module.model.parameters()).device
        b = {k: v.to(device) for k, v in b.items()}
        need_h = self.loss in ("l1", "l2", "tm")
        out = module.model(**model_inputs(b), output_hidden_states=need_h)
        logs: dict = {}
        if self.loss in ("ce", "tm"):
            ce = answer_cross_entropy(out.logits, b["labels"])
            logs["gere/ce"] = ce.detach()
        if need_h:
            h = out.hidden_states[-1].float()
            h0 = self.h0[idx.to(self.h0.device), : h.size(1)].to(device)
            m = b["attention_mask"].unsqueeze(-1).float()
            n = m.sum() * h.size(-1)
        if self.loss == "ce":
            term = self.weight * ce
        elif self.loss == "kl":
            with torch.no_grad():
                t_logits = self.teacher(**model_inputs(b)).logits
            sel = b["labels"][:, 1:] != -100
            T = self.temperature
            s_logp = F.log_softmax(out.logits[:, :-1][sel].float() / T, -1)
            t_logp = F.log_softmax(t_logits[:, :-1][sel].float() / T, -1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * T * T
            logs["gere/kl"] = kl.detach()
            term = self.weight * kl
        elif self.loss == "l1":
            d = ((h - h0).abs() * m).sum() / n
            logs["gere/l1"] = d.detach()
            term = self.weight * d
        elif self.loss == "l2":
            d = (((h - h0) ** 2) * m).sum() / n
            logs["gere/l2"] = d.detach()
            term = self.weight * d
        else:
            tm = tm_loss(h, h0, self.pos.to(device), self.neg.to(device), b["attention_mask"])
            if self.tm_weight is not None:
                w = torch.tensor(float(self.tm_weight), device=device)
            else:  # never negative: an RL objective's loss can be < 0, and w < 0 would maximise the TM term
                total = (ce.detach() + (loss.detach() if loss is not None else 0.0)).clamp(min=0.0)
                w = total / tm.detach() if tm.item() > 0 else torch.zeros((), device=device)
            logs.update({"gere/tm": tm.detach(), "gere/tm_weight": w})
            term = ce + w * tm
        return term, logs


def general_replay_rows(general_tasks, n: int, seed: int) -> list[dict]:
    """``n`` rows drawn evenly from the general tasks' training splits (seeded, without replacement)."""
    rows: list[dict] = []
    per = max(1, n // max(1, len(general_tasks)))
    for t in general_tasks:
        pool = t.train.to_list()
        random.Random(f"{seed}/{t.name}/gere").shuffle(pool)
        rows += pool[:per]
    return rows[:n]
