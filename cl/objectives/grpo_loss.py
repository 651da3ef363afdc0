"""GRPO-family losses as pure tensor functions (formulas: docs/methods.md section 2, Objectives).

Shapes: ``B`` completions (prompts x group size), ``T`` completion tokens (right-padded).
"""

from __future__ import annotations

import math

import torch

ADVANTAGES = ("grpo", "dr_grpo", "rloo")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Per-completion advantages from rewards grouped by prompt.

    Args:
        rewards: [B] with ``B = n_prompts * group_size``, groups contiguous.
        kind: ``grpo`` ``(r - mean) / (std + eps)`` (unbiased std, as TRL and verl compute it);
            ``dr_grpo`` ``r - mean`` (Dr. GRPO: no std division); ``rloo`` ``r - mean of the others``.
    Returns:
        [B] advantages; a group whose rewards are all equal gets exactly zero.
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"objective.advantage: '{kind}' is not one of {', '.join(ADVANTAGES)}")
    r = rewards.view(-1, group_size).float()
    mean = r.mean(-1, keepdim=True)
    if kind == "grpo":
        std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = (r - mean) / (std + eps)
    elif kind == "dr_grpo":
        adv = r - mean
    else:
        adv = (r - mean) * group_size / (group_size - 1) if group_size > 1 else torch.zeros_like(r)
    return adv.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token k3 ("low_var_kl") estimate of KL(pi || pi_ref): ``exp(d) - d - 1`` with ``d = ref - logp``."""
    d = (ref_logp - logp).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1.0


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    ``token_mean``: over all completion tokens of the batch (DAPO); ``seq_mean_token_mean``: per-sequence
    token mean, then mean over sequences (original GRPO); ``seq_mean_token_sum_norm``: per-sequence token
    sum divided by the constant ``max_len``, then mean over sequences (Dr. GRPO).
    """
    mask = mask.to(per_token.dtype)
    if mode == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if mode == "seq_mean_token_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if mode == "seq_mean_token_sum_norm":
        if not max_len:
            raise ValueError("seq_mean_token_sum_norm needs max_len")
        return ((per_token * mask).sum(-1) / max_len).mean()
    raise ValueError(f"objective.loss_agg: '{mode}' is not one of {', '.join(AGGREGATIONS)}")


def sampler_correction(old_logp: torch.Tensor, sample_logp: torch.Tensor, mask: torch.Tensor,
                       mode: str = "sequence_mask", clip_min: float | None = None,
                       clip_max: float | None = 3.0) -> torch.Tensor:
    """Importance weights for tokens sampled by another engine (vLLM) than the one that trains: the two
    assign the same tokens slightly different probabilities (kernels, precision), so the samples are not
    exactly on-policy. TRL's ``vllm_importance_sampling_*`` (same modes, same defaults).

    Args:
        old_logp: [B, T] the trainer's log-probs of the sampled tokens at sampling time.
        sample_logp: [B, T] the sampler's log-probs of the same tokens (NaN where it gave none: the
            difference counts as 0 there, a ratio of 1).
        mask: [B, T] 1 on completion tokens.
        mode: ``token_*``: one ratio per token; ``sequence_*``: ``exp`` of the summed log-ratio, one per
            completion; ``*_truncate`` clips ratios to ``[clip_min, clip_max]``, ``*_mask`` sets ratios
            outside it to 0 (those tokens or completions leave the loss).
    Returns:
        [B, T] (token modes) or [B, 1] (sequence modes) weights, multiplied into the per-token surrogate.
    """
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"importance sampling mode '{mode}' is not one of {', '.join(SAMPLER_CORRECTIONS)}")
    diff = torch.nan_to_num((old_logp - sample_logp) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio if clip_min is None and clip_max is None else ratio.clamp(min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.3,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    loss_agg: str = "token_mean",
    max_len: int | None = None,
    is_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO loss (to minimise).

    Args:
        logp: [B, T] log-probs of the sampled tokens under the current policy (with grad).
        old_logp: [B, T] the same under the policy that sampled them (no grad).
        advantages: [B] one advantage per completion, shared by its tokens.
        mask: [B, T] 1 on completion tokens (including eos), 0 on padding.
        kl_coef: weight of the k3 KL to ``ref_logp``; 0 drops the term (no reference needed).
        is_ratio: [B, T] or [B, 1] sampler-correction weights (``sampler_correction``) multiplied into the
            surrogate (not the KL term), as TRL applies them.
    Returns:
        ``(loss, stats)`` with stats ``kl`` (mean k3 over tokens) and ``clip_frac``.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    per_token = -surrogate
    if is_ratio is not None:
        per_token = per_token * is_ratio
    stats: dict[str, torch.Tensor] = {}
    m = mask.to(logp.dtype)
    if kl_coef:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs reference log-probs")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_coef * kl
        stats["kl"] = ((kl * m).sum() / m.sum().clamp(min=1.0)).detach()
    clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    stats["clip_frac"] = ((clipped.to(m.dtype) * m).sum() / m.sum().clamp(min=1.0)).detach()
    return aggregate(per_token, mask, loss_agg, max_len), stats
