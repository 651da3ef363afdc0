"""Length-aware rewards for GRPO on reasoning streams (``objective.length_reward``), added to the task reward.

Correctness is the verifier accepting a completion (score 1); lengths are completion tokens.

``grpo_lambda`` (Dai et al. 2025, "Stable Reinforcement Learning for Efficient Reasoning", GRPO-lambda):
    groups are ranked by their correctness ratio (correct completions / G) within the batch; the top
    ``lambda_fraction`` of groups get a length penalty, the others plain correctness, so groups the model
    cannot yet solve reliably are never pushed to be short. The penalty is Kimi k1.5's per-group length
    reward: ``l_i = 0.5 - (L_i - L_min) / (L_max - L_min)`` (0 when all lengths are equal), given as is
    to correct completions and as ``min(0, l_i)`` to wrong ones (a short wrong answer is not rewarded).

``hapo`` (Huang et al. 2025, "HAPO: Training Language Models to Reason Concisely via History-Aware Policy
Optimization"): a history per problem, ``h`` = the shortest correct completion seen so far (over the whole
run; it is checkpointed). A completion of length ``L`` gets ``f = cos(min(L / h, 2) * pi / 2)``: 1 for an
empty one, 0 at the record, -1 from twice the record on; correct completions get ``f``, wrong ones
``min(f, 0)`` (shorter than the record and wrong: neither rewarded nor penalised, so exploration towards
short answers is not punished). No record yet: no length term. After scoring, ``h`` becomes the shortest
correct length of the group if that beats it.

Both are scaled by ``length_weight`` and added to the task reward before the group advantages. The
mechanisms are the papers'; the formulas are restated in the suite's terms and have not been checked
against the papers' released code (``lambda_fraction``'s default, 0.5, is this suite's choice).
"""

from __future__ import annotations

import math

import torch

LENGTH_REWARDS = ("none", "grpo_lambda", "hapo")


def kimi_length_reward(lengths: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """[G] Kimi k1.5's length reward within one group: ``0.5 - (L - L_min) / (L_max - L_min)`` for correct
    completions, ``min(0, .)`` for wrong ones; zeros when every length is the same."""
    lengths = lengths.float()
    lo, hi = lengths.min(), lengths.max()
    if hi == lo:
        return torch.zeros_like(lengths)
    lam = 0.5 - (lengths - lo) / (hi - lo)
    return torch.where(correct.bool(), lam, lam.clamp(max=0.0))


def grpo_lambda_terms(lengths: torch.Tensor, correct: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, G] length terms, [n] which groups are penalised): the top ``fraction`` of the ``n`` groups by
    correctness ratio (at least one group when ``fraction > 0``; ties broken by position, stably) get
    :func:`kimi_length_reward`, the rest 0."""
    n = lengths.shape[0]
    ratio = correct.float().mean(-1)
    k = min(n, math.ceil(fraction * n)) if fraction > 0 else 0
    order = sorted(range(n), key=lambda i: -float(ratio[i]))  # stable: earlier groups win ties
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order[:k]] = True
    terms = torch.zeros(lengths.shape)
    for i in range(n):
        if chosen[i]:
            terms[i] = kimi_length_reward(lengths[i], correct[i])
    return terms, chosen


def hapo_terms(lengths: torch.Tensor, correct: torch.Tensor, keys: list[str],
               history: dict[str, int]) -> torch.Tensor:
    """[n, G] HAPO length terms against ``history`` (problem key -> shortest correct length so far), which is
    then updated with this batch's correct completions."""
    terms = torch.zeros(lengths.shape)
    for i, key in enumerate(keys):
        h = history.get(key)
        if h is not None:
            f = torch.cos(torch.clamp(lengths[i].float() / max(h, 1), max=2.0) * (math.pi / 2))
            terms[i] = torch.where(correct[i].bool(), f, f.clamp(max=0.0))
        ok = lengths[i][correct[i].bool()]
        if len(ok):
            best = int(ok.min())
            history[key] = best if h is None else min(h, best)
    return terms
