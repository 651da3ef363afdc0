"""Distribution-shift probes measured at task ends (RL's Razor, Shenfeld, Pari, Agrawal 2025).

- ``forward_kl_sampled``: KL(pi_0 || pi) on the current task's prompts as RL's Razor defines it, pi_0 =
  the model at the task start: a Monte-Carlo estimate over completions sampled from pi_0 (temperature 1,
  ``samples`` per prompt, drawn at the task start), ``mean(log pi_0(y|x) - log pi(y|x))`` per sequence,
  with its standard error ``forward_kl_sampled_se``. RL's Razor finds forgetting grows with it.
- ``forward_kl_tf``: a cheap proxy, the mean per-token KL of the next-token distributions along the
  *reference* answers (teacher forcing), not along pi_0's own samples.
- ``kl_base_general`` / ``kl_base_prev``: KL(base || current) on general-task prompts and on earlier
  stream tasks' prompts (base = the model before the stream). In an earlier prototype of this suite this
  tracked general retention across runs.

The teacher-forced KLs (``forward_kl_tf`` and the base KLs) are exact for their prefixes (both models
see identical ones) and cheap. The reference side is computed once: pi_0's log-probs at the task start, the base's log-probs before the stream (kept in memory when
small, otherwise a frozen copy of the base model is kept and re-run). Selected by ``shift=kl`` (the
default, ``conf/shift/kl.yaml``); ``shift=none`` turns the probe off.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from cl.core.data import collate_sft, model_inputs
from cl.evaluation import EvalSet
from cl.generation import eval_mode, generate_ids
from cl.core.components import Component

CACHE_LIMIT = 20_000_000  # floats of cached reference log-probs per eval set (80 MB)


def _teacher_forced(model: torch.nn.Module, pairs, pad_id: int, batch_size: int):
    """Per batch of (prompt, answer) pairs: next-token logits [B, L-1, V] and their labels [B, L-1] (-100
    off the answer), on the model's device, in eval mode."""
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            batch = collate_sft(pairs[start : start + batch_size], pad_id)
            logits = model(**model_inputs(batch, device)).logits[:, :-1]
            yield logits, batch["labels"][:, 1:].to(device)


@torch.inference_mode()
def answer_logprobs(model: torch.nn.Module, pairs, pad_id: int, batch_size: int = 256) -> list[torch.Tensor]:
    """Per batch: log-softmax at answer positions, [n_positions, V] (float32, on CPU)."""
    return [F.log_softmax(logits[labels != -100].float(), -1).cpu()
            for logits, labels in _teacher_forced(model, pairs, pad_id, batch_size)]


@torch.inference_mode()
def sequence_logprobs(model: torch.nn.Module, pairs, pad_id: int, batch_size: int = 256) -> torch.Tensor:
    """``log p(completion | prompt)`` summed over the completion's tokens, per (prompt, completion) pair."""
    out = []
    for logits, labels in _teacher_forced(model, pairs, pad_id, batch_size):
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((lp * (labels != -100)).sum(-1).cpu())
    return torch.cat(out)


def kl_from_logprobs(ref: list[torch.Tensor], cur: list[torch.Tensor]) -> float:
    """Mean over positions of KL(ref || cur) given matching lists of [n, V] log-prob tensors."""
    total = sum((r.exp() * (r - c)).sum().item() for r, c in zip(ref, cur, strict=True))
    return total / max(1, sum(r.size(0) for r in ref))


def answer_token_kl(p_model: torch.nn.Module, q_model: torch.nn.Module, pairs, pad_id: int) -> float:
    """Mean over answer positions (answer tokens and eos) of KL(p(.|prefix) || q(.|prefix))."""
    return kl_from_logprobs(answer_logprobs(p_model, pairs, pad_id), answer_logprobs(q_model, pairs, pad_id))


class DistributionShiftProbe(Component):
    """A task-boundary component: references are recorded at the stream start (base) and at each task
    start (pi_0); at each task end the KLs above are appended to ``records``."""
    key = "shift"
    ckpt_attrs = ("base_ref", "base_model", "task_ref", "task_samples", "records", "seconds")

    @classmethod
    def check_config(cls, c, at: str) -> None:
        c.integer(f"{at}.n_items", minimum=1)
        c.integer(f"{at}.samples", minimum=0)

    def __init__(self, evaluator, fmt, n_items: int = 50, samples: int = 4, objective=None, seed: int = 0,
                 log=None):
        """``n_items``: items per task (the first of each evaluation subset) on which the KLs are measured;
        ``samples``: completions sampled from pi_0 per item for ``forward_kl_sampled`` (0: not measured),
        each up to the objective's ``max_new_tokens`` (16 without one)."""
        self.stream, self.general, self.pad_id, self.fmt = evaluator.stream, evaluator.general, fmt.pad_id, fmt
        self.n, self.samples, self.seed, self.log = n_items, samples, seed, log
        self.max_new_tokens = getattr(objective, "max_new_tokens", 16)
        self.task_samples: dict | None = None  # pi_0's samples on the current task and their log-probs
        self.base_ref: dict[str, list[torch.Tensor]] | None = None
        self.base_model: torch.nn.Module | None = None
        self.task_ref: list[torch.Tensor] | None = None
        self.records: list[dict] = []
        self.seconds = 0.0

    def record(self) -> list[dict]:
        return self.records

    @property
    def eval_seconds(self) -> float:
        return self.seconds

    def metrics(self) -> dict:
        """The mean forward KL over task ends, the last general-set KL to the base, the probes' seconds
        (evaluation work: the run adds them to ``eval_seconds``)."""
        out = {"shift_seconds": self.seconds}
        if self.records:
            out["forward_kl_tf_mean"] = sum(r["forward_kl_tf"] for r in self.records) / len(self.records)
            sampled = [r["forward_kl_sampled"] for r in self.records if "forward_kl_sampled" in r]
            if sampled:
                out["forward_kl_sampled_mean"] = sum(sampled) / len(sampled)
            if "kl_base_general" in self.records[-1]:
                out["kl_base_general_final"] = self.records[-1]["kl_base_general"]
        return out

    def _pairs(self, es: EvalSet):
        return es.pairs[: self.n]

    def _ref(self, model, es: EvalSet) -> list[torch.Tensor]:
        return answer_logprobs(model, self._pairs(es), self.pad_id)

    def on_task_start(self, ctx) -> None:
        t0 = time.perf_counter()
        model = ctx.module.model
        if self.base_ref is None:
            sets = self.general + self.stream
            size = max(len(self._pairs(es)) * max(len(a) for _, a in self._pairs(es)) for es in sets)
            if size * model.config.get_text_config().vocab_size <= CACHE_LIMIT:
                self.base_ref = {es.name: self._ref(model, es) for es in sets}
            else:
                self.base_ref = {}
                self.base_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.task_ref = self._ref(model, self.stream[ctx.task_idx])
        if self.samples:
            self.task_samples = self._sample_pi0(model, self.stream[ctx.task_idx], ctx.task_idx)
        self.seconds += time.perf_counter() - t0

    def _sample_pi0(self, model, es: EvalSet, task_idx: int) -> dict:
        """``samples`` completions per prompt from the model (pi_0), at temperature 1 with the run's RNG
        untouched (a forked, seeded generator), and their summed log-probs under pi_0."""
        prompts = [p for p, _ in self._pairs(es)]
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # CPU and the model's GPU
            torch.manual_seed(self.seed * 1000 + task_idx)
            comps = generate_ids(model, prompts, self.fmt, self.max_new_tokens, do_sample=True, temperature=1.0,
                                 num_return_sequences=self.samples)
        pairs = [(prompts[i // self.samples], c) for i, c in enumerate(comps)]
        return {"pairs": pairs, "logp0": sequence_logprobs(model, pairs, self.pad_id)}

    def _kl_base(self, model, es: EvalSet) -> float:
        ref = self.base_ref.get(es.name) or self._ref(self.base_model, es)
        return kl_from_logprobs(ref, self._ref(model, es))

    def on_task_end(self, ctx) -> None:
        t0 = time.perf_counter()
        model, t = ctx.module.model, ctx.task_idx
        rec = {"task_idx": t, "task": self.stream[t].name, "global_iter": ctx.module.global_iter,
               "forward_kl_tf": kl_from_logprobs(self.task_ref, self._ref(model, self.stream[t]))}
        if self.task_samples is not None:
            diff = self.task_samples["logp0"] - sequence_logprobs(model, self.task_samples["pairs"], self.pad_id)
            rec["forward_kl_sampled"] = float(diff.mean())
            rec["forward_kl_sampled_se"] = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else float("nan")
            rec["kl_samples"] = len(diff)
            self.task_samples = None
        if self.general:
            rec["kl_base_general"] = sum(self._kl_base(model, es) for es in self.general) / len(self.general)
        if t > 0:
            rec["kl_base_prev"] = sum(self._kl_base(model, es) for es in self.stream[:t]) / t
        self.records.append(rec)
        self.task_ref = None
        self.seconds += time.perf_counter() - t0
        if self.log is not None:
            self.log({"cl/global_iter": rec["global_iter"],
                      **{f"shift/{k}": v for k, v in rec.items() if k.startswith(("forward", "kl_base"))}})
