"""Model averaging and merging at task ends: WiSE, partwise, AMA, EMA and task-vector merges.

Convention (docs/methods.md section 6, Averaging): ``theta = alpha * theta_start + (1 - alpha) * theta_end``,
so ``alpha = 0`` keeps the fine-tuned weights and ``alpha = 1`` returns to the start (the task-start model,
or the base model with ``start=base``). The averaged weights become the stream's model: they are what
the boundary evaluation scores and where the next task starts. With ``log_unaveraged`` the task-end
model is also scored before averaging, so ``results.json`` holds both matrices (``acc_matrix`` averaged,
``averaging.unaveraged_matrix``).

- ``wise``: one alpha for every parameter.
- ``partwise``: per-block alphas, blocks given as layer boundaries (``[0, 2, 4]`` = layers 0-1 and 2-3);
  parameters outside the transformer blocks (embeddings, LM head, final norm) use the global alpha.
- ``ama`` (adaptive model averaging, Lin et al.): one logit ``a_k`` per block;
  ``alpha_k = alpha0 * K * (sigmoid(a_k) + eps) / sum_j (sigmoid(a_j) + eps)`` (mean alpha0; clamped to
  [0, 1], which only binds when ``alpha0 * K`` is large), weights frozen, the logits trained with Adam to
  maximise the likelihood of reward-filtered samples of the task-end model (GRPO runs: completions sampled
  at T=1 on the task's training prompts that the verifier accepts; SFT runs: the task's training answers)
  plus ``reg * sum_k |alpha_k - alpha0|`` (all block weights c_k = 1); parameters outside the blocks take
  ``alpha0``. The learned alphas are baked into the weights and logged per task.
- ``ema``: an exponential moving average of the weights after every optimizer step
  (``ema = decay * ema + (1 - decay) * theta``), swapped in at each task end.
- ``merge``: task vectors ``tau_t = theta_end(t) - theta_start(t)`` merged onto the stream's starting
  weights after every task, by ``mean`` or ``magmax`` (per entry, the task vector of largest magnitude).

Averaging acts on every floating-point parameter and buffer of the model as it is (for LoRA-family
adapters that are merged after each task this is the merged weights).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import logging
import re

import pytorch_lightning as pl
import torch
from torch.func import functional_call

from cl.core.data import collate_sft, model_inputs
from cl.generation import generate_ids
from cl.core.losses import answer_cross_entropy
from cl.core.steps import EveryNSteps
from cl.core.components import Component

log = logging.getLogger(__name__)
KINDS = ("none", "wise", "partwise", "ama", "ema", "merge")
STARTS = ("task_start", "base")
MERGES = ("mean", "magmax")
_LAYER = re.compile(r"layers\.(\d+)\.")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items() if p.is_floating_point()}


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for n, w in weights.items():
        state[n].copy_(w)


def interpolate(start: dict, end: dict, alpha: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """``alpha * start + (1 - alpha) * end`` per tensor (``alpha`` a number or ``{name: alpha}``)."""
    out = {}
    for n, e in end.items():
        a = alpha[n] if isinstance(alpha, dict) else alpha
        out[n] = e.clone() if a == 0 else (start[n].clone() if a == 1 else a * start[n] + (1 - a) * e)
    return out


def num_layers(names) -> int:
    idx = {int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    return max(idx) + 1 if idx else 0


def check_blocks(boundaries, n_layers: int | None) -> None:
    """Raise ``ValueError`` (one line) unless ``boundaries`` rise strictly from 0 to ``n_layers``
    (any end when ``n_layers`` is unknown)."""
    ok = (isinstance(boundaries, (list, tuple)) and len(boundaries) >= 2
          and all(isinstance(b, int) and not isinstance(b, bool) for b in boundaries) and boundaries[0] == 0
          and all(b < c for b, c in zip(boundaries, boundaries[1:]))
          and (n_layers is None or boundaries[-1] == n_layers))
    if not ok:
        n = n_layers or 2
        raise ValueError(f"blocks: {boundaries!r} must rise strictly from 0 to the number of layers"
                         f"{f' ({n_layers})' if n_layers is not None else ''}, e.g. [0, {n // 2}, {n}]")


def block_of(name: str, boundaries: list[int]) -> int | None:
    """Index of the block holding ``name``'s layer; None outside the transformer blocks."""
    m = _LAYER.search(name)
    if not m:
        return None
    layer = int(m.group(1))
    return next(k for k in range(len(boundaries) - 1) if boundaries[k] <= layer < boundaries[k + 1])


def ama_alphas(logits: torch.Tensor, alpha0: float, eps: float) -> torch.Tensor:
    s = torch.sigmoid(logits) + eps
    return (alpha0 * len(logits) * s / s.sum()).clamp(0.0, 1.0)


@dataclass
class AMASettings:
    """AMA's learned per-block alphas: ``alpha0`` the mean alpha, ``eps`` the floor inside the softmax-like
    normalisation, Adam's ``lr`` and ``reg`` (the weight of ``sum_k |alpha_k - alpha0|``), ``steps`` on
    ``n_samples`` rows of the task in batches of ``batch_size``. Parameters outside the transformer blocks
    (embeddings, final norm, LM head) take ``alpha0``."""

    alpha0: float = 0.2
    eps: float = 0.2
    lr: float = 2.0e-5
    reg: float = 1.0e-4
    steps: int = 50
    n_samples: int = 256
    batch_size: int = 16


class Averaging(Component):
    """Weight averaging at task ends (``averaging=wise|partwise|ama|ema|merge``, ``conf/averaging/``).

    Args:
        kind: ``wise``, ``partwise``, ``ama``, ``ema`` or ``merge``.
        alpha: the global alpha (weight of the start model).
        start: ``task_start`` or ``base`` (the model before the stream).
        blocks: layer boundaries for ``partwise`` and ``ama`` (None: one block per layer for AMA).
        block_alphas: ``partwise`` alphas, one per block.
        ema_decay: ``ema``'s decay.
        merge: ``mean`` or ``magmax``.
        ama: :class:`AMASettings` (or a mapping of its fields).
        fmt, evaluator: for AMA's samples and for scoring the un-averaged model.
        log_unaveraged: also score the task-end model before averaging.
    """
    key = "averaging"
    ckpt_attrs = ("base", "task_start", "ema", "task_vectors", "records")

    @classmethod
    def check_config(cls, c, at: str) -> None:
        kind = c.get(f"{at}.kind")
        c.choice(f"{at}.kind", KINDS[1:])
        c.number(f"{at}.alpha", lo=0.0, hi=1.0)
        c.choice(f"{at}.start", STARTS)
        layers = c.get("model.arch.num_hidden_layers") if not c.get("model.name_or_path") else None
        blocks = c.get(f"{at}.blocks")
        if kind == "partwise" and blocks is None:
            c.add(f"{at}.blocks", "partwise needs layer boundaries, e.g. [0, 1, 2] for two blocks of a 2-layer model")
        if blocks is not None:
            try:
                check_blocks(list(blocks) if isinstance(blocks, (list, tuple)) else blocks, layers)
            except ValueError as e:
                c.add(f"{at}.blocks", str(e).split(": ", 1)[1])
                blocks = None
        if blocks is not None and kind == "partwise":
            alphas = c.get(f"{at}.block_alphas")
            if (not isinstance(alphas, (list, tuple)) or len(alphas) != len(blocks) - 1
                    or not all(isinstance(a, (int, float)) and 0 <= a <= 1 for a in alphas)):
                c.add(f"{at}.block_alphas", f"needs {len(blocks) - 1} numbers in [0, 1] (one per block), got {alphas!r}")
        if kind == "ema":
            c.number(f"{at}.ema_decay", lo=0.0, hi=1.0)
        if kind == "merge":
            c.choice(f"{at}.merge", MERGES)
        if kind == "ama":
            c.integer(f"{at}.ama.n_samples", minimum=1)
            c.integer(f"{at}.ama.steps", minimum=1)
            c.integer(f"{at}.ama.batch_size", minimum=1)
            c.number(f"{at}.ama.alpha0", lo=0.0, hi=1.0)
            c.number(f"{at}.ama.lr", lo=0.0, strict_lo=True)

    @classmethod
    def in_step(cls, node) -> bool:
        return node.get("kind") == "ema"  # the EMA update reads every parameter after each step

    def __init__(self, kind: str, alpha: float = 0.2, start: str = "task_start", blocks: list[int] | None = None,
                 block_alphas: list[float] | None = None, ema_decay: float = 0.99, merge: str = "mean",
                 ama: AMASettings = AMASettings(), fmt=None, evaluator=None, log_unaveraged: bool = True, seed: int = 0,
                 log=None):
        if kind not in KINDS[1:]:
            raise ValueError(f"kind: '{kind}' is not one of {', '.join(KINDS)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
        if start not in STARTS:
            raise ValueError(f"start: '{start}' is not one of {', '.join(STARTS)}")
        if merge not in MERGES:
            raise ValueError(f"merge: '{merge}' is not one of {', '.join(MERGES)}")
        self.kind, self.alpha, self.start, self.blocks, self.block_alphas = kind, alpha, start, blocks, block_alphas
        self.ema_decay, self.merge = ema_decay, merge
        self.ama = replace(ama) if isinstance(ama, AMASettings) else AMASettings(**dict(ama or {}))
        self.fmt, self.evaluator, self.log_unaveraged, self.seed, self.log = fmt, evaluator, log_unaveraged, seed, log
        self.base: dict | None = None
        self.task_start: dict | None = None
        self.ema: dict | None = None
        self.task_vectors: list[dict] = []
        self.records: list[dict] = []

    # -- hooks ---------------------------------------------------------------------------------------------
    def on_task_start(self, ctx) -> None:
        model = ctx.module.model
        self.task_start = snapshot(model)
        if self.base is None:
            self.base = {n: w.clone() for n, w in self.task_start.items()}
            if self.kind in ("partwise", "ama") and self.blocks is not None:
                check_blocks(list(self.blocks), num_layers(self.base))
        if self.kind == "ema":
            self.ema = {n: w.clone() for n, w in self.task_start.items()}

    @torch.no_grad()
    def update_ema(self, module) -> None:
        d = self.ema_decay
        for n, p in module.model.state_dict().items():
            if n in self.ema:
                self.ema[n].mul_(d).add_(p.detach(), alpha=1 - d)

    def callbacks(self) -> list[pl.Callback]:
        return [EveryNSteps(1, self.update_ema)] if self.kind == "ema" else []

    def on_task_end(self, ctx) -> None:
        model = ctx.module.model
        end = snapshot(model)
        rec: dict = {"task_idx": ctx.task_idx, "task": ctx.task.name, "kind": self.kind}
        if self.log_unaveraged and self.evaluator is not None:
            rec["unaveraged_acc"] = {es.name: self.evaluator.scorer.accuracy(model, es) for es in self.evaluator.stream}
        start = self.base if self.start == "base" else self.task_start
        if self.kind == "wise":
            new = interpolate(start, end, self.alpha)
        elif self.kind == "partwise":
            new = interpolate(start, end, self._per_tensor(self.block_alphas))
        elif self.kind == "ama":
            alphas = self._learn_ama(model, start, end, ctx)
            rec["ama_alphas"] = alphas
            new = interpolate(start, end, self._per_tensor(alphas, outside=self.ama.alpha0))
        elif self.kind == "ema":
            new = {n: w.clone() for n, w in self.ema.items()}
        else:
            self.task_vectors.append({n: end[n] - self.task_start[n] for n in end})
            new = {n: self.base[n] + self._merged(n) for n in end}
        load_weights(model, new)
        self.records.append(rec)
        if self.log is not None and "ama_alphas" in rec:
            self.log({"cl/global_iter": ctx.module.global_iter,
                      **{f"averaging/alpha_block{k}": a for k, a in enumerate(rec["ama_alphas"])}})

    # -- helpers -------------------------------------------------------------------------------------------
    def _boundaries(self) -> list[int]:
        n = num_layers(self.base)
        return list(self.blocks) if self.blocks is not None else list(range(n + 1))

    def _per_tensor(self, alphas, outside: float | None = None) -> dict[str, float]:
        """Each tensor's alpha: its block's, or ``outside`` (default: the global alpha) outside the blocks."""
        b = self._boundaries()
        other = self.alpha if outside is None else outside
        out = {}
        for n in self.base:
            k = block_of(n, b)
            out[n] = other if k is None else float(alphas[k])
        return out

    def _merged(self, name: str) -> torch.Tensor:
        taus = torch.stack([tv[name] for tv in self.task_vectors])
        if self.merge == "mean":
            return taus.mean(0)
        idx = taus.abs().argmax(0, keepdim=True)
        return taus.gather(0, idx).squeeze(0)

    def _ama_samples(self, model, ctx) -> list[tuple[list[int], list[int]]]:
        n = self.ama.n_samples
        rows = ctx.task.train.select(range(min(n, len(ctx.task.train)))).to_list()
        objective = getattr(ctx.module, "objective", None)
        if getattr(objective, "name", "sft") == "sft":
            return self.fmt.encode([r["prompt"] for r in rows], [r["answer"] for r in rows])
        prompts = self.fmt.prompt_ids([r["prompt"] for r in rows])
        torch.manual_seed(self.seed * 1000 + ctx.task_idx)
        comps = generate_ids(model, prompts, self.fmt, getattr(objective, "max_new_tokens", 16), do_sample=True)
        texts = [self.fmt.decode(c) for c in comps]
        cols = {c: [r[c] for r in rows] for c in rows[0]}
        ok = ctx.task.score(texts, **cols)
        return [(p, c if c and c[-1] == self.fmt.eos_id else c + [self.fmt.eos_id])
                for p, c, s in zip(prompts, comps, ok) if s >= 1.0]

    def _learn_ama(self, model, start: dict, end: dict, ctx) -> list[float]:
        b = self._boundaries()
        K = len(b) - 1
        alpha0, eps = self.ama.alpha0, self.ama.eps
        samples = self._ama_samples(model, ctx)
        if not samples:
            log.warning("AMA: no reward-filtered samples for task %s; using alpha0 in every block", ctx.task.name)
            print(f"[averaging] AMA: no accepted sample on {ctx.task.name}; alpha0 everywhere", flush=True)
            return [alpha0] * K
        logits = torch.zeros(K, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=self.ama.lr)
        reg, bs = self.ama.reg, self.ama.batch_size
        names = [n for n, _ in model.named_parameters()]  # tied weights appear once here
        blk = {n: block_of(n, b) for n in names}
        g = torch.Generator().manual_seed(self.seed)
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        for _ in range(self.ama.steps):
            alphas = ama_alphas(logits, alpha0, eps)
            params = {n: (alpha0 if blk[n] is None else alphas[blk[n]]) * start[n]
                      + (1 - (alpha0 if blk[n] is None else alphas[blk[n]])) * end[n] for n in names}
            idx = torch.randint(len(samples), (min(bs, len(samples)),), generator=g).tolist()
            batch = collate_sft([samples[i] for i in idx], self.fmt.pad_id)
            out = functional_call(model, params, args=(), kwargs=model_inputs(batch, device))
            loss = answer_cross_entropy(out.logits, batch["labels"].to(device)) + reg * (alphas - alpha0).abs().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.train(was)
        learned = ama_alphas(logits.detach(), alpha0, eps).tolist()
        print(f"[averaging] AMA on {ctx.task.name} ({len(samples)} samples): alphas "
              + ", ".join(f"{a:.3f}" for a in learned), flush=True)
        return learned

    def record(self) -> dict:
        out: dict = {"kind": self.kind, "alpha": self.alpha, "per_task": self.records}
        if self.records and "unaveraged_acc" in self.records[0]:
            out["unaveraged_matrix"] = [list(r["unaveraged_acc"].values()) for r in self.records]
        return out
