"""GRPO-family reinforcement fine-tuning with verifier rewards, composed into ``ContinualLM``.

Follows DeepSeekMath's GRPO with the knobs of docs/methods.md section 2 (Objectives): per prompt a group of
G completions sampled with the KV cache (``transformers`` ``generate``), the task verifier as reward,
group-normalised advantages (or Dr. GRPO / RLOO), the clipped ratio with separate eps_low/eps_high,
optional PPO epochs over one rollout batch, k3 KL to a reference policy with an explicit ``kl_coef``,
and three loss aggregations. The loss itself is ``cl/objectives/grpo_loss.py`` (pure functions).

Simplifications, stated: one rollout batch is the loader batch of the step that draws it; with
``ppo_epochs = E`` the next ``E - 1`` optimizer steps reuse it (their loader batches are skipped), so
a task's step budget is in optimizer steps. Dynamic sampling drops all-equal groups without refilling
(DAPO refills by sampling more prompts); a step whose groups are all dropped has zero loss.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cl.core.data import PromptFormat, PromptRowsCollator, visual_inputs
from cl.objectives.grpo_loss import ADVANTAGES, AGGREGATIONS, group_advantages, grpo_loss, sampler_correction
from cl.objectives.length_rewards import LENGTH_REWARDS, grpo_lambda_terms, hapo_terms
from cl.objectives.sft import training_forward
from cl.rollouts import make_backend
from tasks.base import Task
from cl.core.components import Component

REFERENCES = ("base", "task_start", "sync")


@dataclass
class Rollout:
    input_ids: torch.Tensor      # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor  # [B, L-1] 1 where position t predicts a completion token
    advantages: torch.Tensor     # [B]
    old_logp: torch.Tensor | None  # [B, L-1] (None: one PPO epoch, the current policy is the old one)
    ref_logp: torch.Tensor | None  # [B, L-1]
    logs: dict
    is_ratio: torch.Tensor | None = None  # [B, L-1] or [B, 1] sampler correction (vLLM rollouts), else None
    visual: dict | None = None   # the sequences' image tensors (vision-language models), cl.core.data.visual_inputs


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, visual: dict | None = None) -> torch.Tensor:
    """[B, L-1] log-prob of each next token (logits divided by the sampling temperature, as TRL/verl do);
    ``model``: a causal LM or any callable with its forward's signature (``ContinualLM.forward_train``);
    ``visual``: the sequences' image tensors for a vision-language model."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **(visual or {})).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


class GRPOObjective(Component):
    """Group-relative policy optimisation.

    Args:
        group_size: completions per prompt (G).
        temperature, top_p: sampling settings of the rollouts.
        max_new_tokens: completion budget (also the Dr. GRPO length normaliser).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``.
        kl_coef: weight of the k3 KL to the reference (0: no KL and no reference copy).
        reference: ``base`` (model before the stream), ``task_start``, or ``sync`` (refreshed every
            ``ref_sync_every`` steps).
        loss_agg: ``token_mean`` | ``seq_mean_token_mean`` | ``seq_mean_token_sum_norm``.
        advantage: ``grpo`` | ``dr_grpo`` | ``rloo``.
        ppo_epochs: optimizer steps per rollout batch.
        dynamic_sampling: drop groups whose rewards are all equal.
        reward_scale: rewards are multiplied by this (verifier scores are in [0, 1]). A task's
            ``reward`` (e.g. worked-steps prompts: 0.9 accuracy + 0.1 format) replaces its verifier as
            the reward; ``pass_rate`` always counts verifier passes.
        rollout_backend: ``hf`` (transformers ``generate`` on the training model), ``hf_fast`` (a minimal
            decode loop on the training model, same tokens; not under FSDP) or ``vllm`` (a colocated
            vLLM engine, weights synced before each rollout; ``cl.rollouts``).
        rollout_compile: with ``hf_fast`` on CPUs, the Llama-family decode step through ``torch.compile``
            (``cl.generation.decode_ids(compile_step=True)``): faster steps after a one-off compilation per
            prompt-batch shape (8-25 s at the tiny model); needs a C++ compiler. Ignored on CUDA, where the
            step is a CUDA graph, and for models outside the Llama family (they decode eagerly).
        vllm: the vLLM engine's settings (``cl.rollouts.VLLMRollouts``).
        length_reward: ``none`` | ``grpo_lambda`` | ``hapo``: a length term added to the task reward
            (:mod:`cl.objectives.length_rewards`; HAPO's per-problem history is checkpointed).
        length_weight: weight of that term.
        lambda_fraction: grpo_lambda's share of a batch's groups (those most often correct) that are
            length-penalised.
    """

    name = "grpo"
    nested_settings = {"vllm": "cl.rollouts.VLLMRollouts"}  # objective.vllm: that class's settings

    @classmethod
    def check_config(cls, c, at: str) -> None:
        """Ranges and choices of the settings at ``at`` (``objective``), and the rollout backend's needs."""
        from cl.objectives.grpo_loss import ADVANTAGES, AGGREGATIONS, SAMPLER_CORRECTIONS

        c.integer(f"{at}.group_size", minimum=2)
        c.integer(f"{at}.max_new_tokens", minimum=1)
        c.integer(f"{at}.ppo_epochs", minimum=1)
        c.number(f"{at}.temperature", lo=0.0, strict_lo=True)
        c.number(f"{at}.top_p", lo=0.0, hi=1.0, strict_lo=True)
        c.number(f"{at}.eps_low", lo=0.0, hi=1.0)
        c.number(f"{at}.eps_high", lo=0.0)
        c.number(f"{at}.kl_coef", lo=0.0)
        c.choice(f"{at}.reference", REFERENCES)
        c.choice(f"{at}.loss_agg", AGGREGATIONS)
        c.choice(f"{at}.advantage", ADVANTAGES)
        from cl.objectives.length_rewards import LENGTH_REWARDS

        c.choice(f"{at}.length_reward", LENGTH_REWARDS)
        c.number(f"{at}.lambda_fraction", lo=0.0, hi=1.0)
        c.number(f"{at}.length_weight", lo=0.0)
        if c.get(f"{at}.reference") == "sync":
            c.integer(f"{at}.ref_sync_every", minimum=1)
        from cl.fsdp import is_fsdp
        from cl.rollouts import BACKENDS, RolloutBackendError, VLLMRollouts

        from cl.fastdecode import cxx_compiler

        c.choice(f"{at}.rollout_backend", BACKENDS)
        if c.get(f"{at}.rollout_compile") and c.get(f"{at}.rollout_backend") != "hf_fast":
            c.add(f"{at}.rollout_compile", f"compiles hf_fast's decode step; rollout_backend is "
                                           f"{c.get(f'{at}.rollout_backend')} (use rollout_backend=hf_fast)")
        elif c.get(f"{at}.rollout_compile") and not cxx_compiler():
            c.add(f"{at}.rollout_compile", "torch.compile needs a C++ compiler on CPUs and none was found (install "
                                           "g++ or set CXX), or set rollout_compile=false")
        if c.get(f"{at}.rollout_backend") == "hf_fast" and is_fsdp(dict(c.get("trainer") or {})):
            c.add(f"{at}.rollout_backend", "hf_fast cannot step sharded ranks in lockstep under trainer=fsdp; "
                                               "use rollout_backend=hf")
        if c.get(f"{at}.rollout_backend") == "hf_fast":
            from cl.vision import declared_model_type, hf_fast_refusal

            why = hf_fast_refusal(declared_model_type(c.get("model") or {}))
            if why:
                c.add(f"{at}.rollout_backend", why)
        if c.get(f"{at}.rollout_backend") == "vllm":
            c.number(f"{at}.vllm.gpu_memory_utilization", lo=0.0, hi=1.0, strict_lo=True)
            if c.get(f"{at}.vllm.importance_sampling") is not None:
                c.choice(f"{at}.vllm.importance_sampling", (*SAMPLER_CORRECTIONS, "none"))
            for bound in ("is_clip_min", "is_clip_max"):
                if c.get(f"{at}.vllm.{bound}") is not None:
                    c.number(f"{at}.vllm.{bound}", lo=0.0)
            lo, hi = c.get(f"{at}.vllm.is_clip_min"), c.get(f"{at}.vllm.is_clip_max")
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
                c.add(f"{at}.vllm.is_clip_min", f"{lo} is above is_clip_max {hi}")
            if c.get("adapter.name") in ("lora", "reglora") and is_fsdp(dict(c.get("trainer") or {})):
                c.add(f"{at}.rollout_backend", "vllm with LoRA under trainer=fsdp is not supported (the "
                                                   "adapter deltas would be computed from shards); use trainer=ddp")
            if c.get("adapter.name") in ("mora", "task_lora"):
                c.add(f"{at}.rollout_backend", f"vllm cannot hold adapter={c.get('adapter.name')} "
                                                   "(its layers are not in vLLM's model); use rollout_backend=hf")
            try:
                VLLMRollouts.check_available()
            except RolloutBackendError as e:
                c.add(f"{at}.rollout_backend", str(e).split(": ", 1)[1])

    def __init__(self, group_size: int = 8, temperature: float = 1.0, top_p: float = 0.99,
                 max_new_tokens: int = 16, eps_low: float = 0.2, eps_high: float = 0.3, kl_coef: float = 0.01,
                 reference: str = "task_start", ref_sync_every: int | None = None, loss_agg: str = "token_mean",
                 advantage: str = "grpo", ppo_epochs: int = 1, dynamic_sampling: bool = False,
                 reward_scale: float = 1.0, rollout_backend: str = "hf", rollout_compile: bool = False,
                 vllm: dict | None = None,
                 length_reward: str = "none", length_weight: float = 1.0, lambda_fraction: float = 0.5):
        if reference not in REFERENCES:
            raise ValueError(f"objective.reference: '{reference}' is not one of {', '.join(REFERENCES)}")
        if advantage not in ADVANTAGES:
            raise ValueError(f"objective.advantage: '{advantage}' is not one of {', '.join(ADVANTAGES)}")
        if loss_agg not in AGGREGATIONS:
            raise ValueError(f"objective.loss_agg: '{loss_agg}' is not one of {', '.join(AGGREGATIONS)}")
        if length_reward not in LENGTH_REWARDS:
            raise ValueError(f"objective.length_reward: '{length_reward}' is not one of {', '.join(LENGTH_REWARDS)}")
        if not 0.0 <= lambda_fraction <= 1.0:
            raise ValueError(f"objective.lambda_fraction: must be in [0, 1], got {lambda_fraction}")
        if reference == "sync" and not ref_sync_every:
            raise ValueError("objective.ref_sync_every: needed (>= 1) with reference=sync")
        self.group_size, self.temperature, self.top_p = group_size, temperature, top_p
        self.max_new_tokens, self.eps_low, self.eps_high = max_new_tokens, eps_low, eps_high
        self.kl_coef, self.reference, self.ref_sync_every = kl_coef, reference, ref_sync_every
        self.loss_agg, self.advantage, self.ppo_epochs = loss_agg, advantage, ppo_epochs
        self.dynamic_sampling, self.reward_scale = dynamic_sampling, reward_scale
        self.rollouts = make_backend(rollout_backend, dict(vllm or {}), compile_step=rollout_compile)
        self.length_reward, self.length_weight, self.lambda_fraction = length_reward, length_weight, lambda_fraction
        self.length_history: dict[str, int] = {}  # hapo: problem -> shortest correct completion so far
        self.completion_tokens: dict[str, list[int]] = {}  # task -> [completions, tokens] rolled out
        self.fmt: PromptFormat | None = None
        self.tasks: dict[str, Task] = {}
        self.ref_model: torch.nn.Module | None = None
        self._rollout: Rollout | None = None
        self._uses = 0
        self._steps = 0
        self.tokens_generated = 0

    ckpt_attrs = ("ref_model", "rollout_state", "_uses", "_steps", "tokens_generated", "length_history",
                  "completion_tokens")

    @property
    def rollout_state(self) -> dict | None:
        """The rollout being reused (ppo_epochs > 1) as plain tensors, for checkpoints."""
        return None if self._rollout is None else dataclasses.asdict(self._rollout)

    @rollout_state.setter
    def rollout_state(self, state: dict | None) -> None:
        self._rollout = None if state is None else Rollout(**state)

    # -- wiring -------------------------------------------------------------------------------------
    def bind(self, fmt: PromptFormat, tasks: dict[str, Task]) -> None:
        """Give the objective the prompt format and the tasks whose verifiers are the rewards."""
        self.fmt, self.tasks = fmt, dict(tasks)

    def collate_fn(self, pad_id: int):
        return PromptRowsCollator()

    def _snapshot(self, model: torch.nn.Module) -> None:
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    def on_rank_count_change(self) -> None:
        self._rollout, self._uses = None, 0  # rank 0's prompts' completions: each rank samples its own anew

    def on_task_start(self, ctx) -> None:
        self._rollout, self._uses = None, 0
        self.rollouts.mark_stale()  # boundary hooks (averaging, merges) changed the weights
        if not self.kl_coef:
            self.ref_model = None
        elif self.reference == "task_start" or (self.reference in ("base", "sync") and self.ref_model is None):
            self._snapshot(ctx.module.model)

    # -- rollouts -----------------------------------------------------------------------------------
    def _rewards(self, completions: list[str], rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards, passed) per completion: the task's reward (verifier, or verifier plus a format term)
        and whether the verifier accepts it."""
        g = self.group_size
        expanded = [r for r in rows for _ in range(g)]
        rewards, passed = [0.0] * len(expanded), [0.0] * len(expanded)
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(expanded):
            by_task.setdefault(r["task"], []).append(i)
        for name, idx in by_task.items():
            if name not in self.tasks:
                raise KeyError(f"no verifier for task '{name}' (bound tasks: {', '.join(self.tasks)})")
            task = self.tasks[name]
            cols = {k: [expanded[i][k] for i in idx] for k in expanded[idx[0]]}
            texts = [completions[i] for i in idx]
            scores = task.score(texts, **cols)
            rs = task.reward_scores(texts, **cols) if task.reward is not None else scores
            for i, s, r in zip(idx, scores, rs):
                passed[i], rewards[i] = float(s), float(r)
        return torch.tensor(rewards) * self.reward_scale, torch.tensor(passed)

    @torch.no_grad()
    def rollout(self, module, batch: dict) -> Rollout:
        """Sample G completions per prompt, score them, and compute advantages and reference log-probs."""
        model, fmt, g = module.model, self.fmt, self.group_size
        prompts: list[list[int]] = batch["prompt_ids"]
        if hasattr(fmt, "check_images"):
            fmt.check_images(prompts)
        comps, sample_logps = self.rollouts.generate(module, prompts, fmt, g, self.max_new_tokens, self.temperature,
                                                     self.top_p)
        texts = [fmt.decode(c) for c in comps]
        raw, passed = self._rewards(texts, batch["rows"])
        length_logs = {}
        if self.length_reward != "none":
            raw, length_logs = self._length_shaped(raw, passed, comps, batch["rows"])
        adv = group_advantages(raw, g, self.advantage)
        keep = torch.ones(len(prompts), dtype=torch.bool)
        zero_groups = (raw.view(-1, g).max(-1).values == raw.view(-1, g).min(-1).values)
        if self.dynamic_sampling:
            keep = ~zero_groups
        seqs = [p + c for i, p in enumerate(prompts) if keep[i] for c in comps[i * g:(i + 1) * g]]
        plen = [len(p) for i, p in enumerate(prompts) if keep[i] for _ in range(g)]
        adv = adv.view(-1, g)[keep].reshape(-1)
        device = next(model.parameters()).device
        logs = {**self._logs(raw, passed, comps, batch["rows"], zero_groups), **length_logs}
        self.tokens_generated += sum(len(c) for c in comps)
        for i, row in enumerate(batch["rows"]):
            seen = self.completion_tokens.setdefault(row["task"], [0, 0])
            seen[0] += g
            seen[1] += sum(len(c) for c in comps[i * g:(i + 1) * g])
        if not seqs:
            return Rollout(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long),
                           torch.zeros(0, 0), adv, None, None, logs)
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), fmt.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), L), dtype=torch.long)
        cmask = torch.zeros((len(seqs), L - 1))
        for i, (s, pl) in enumerate(zip(seqs, plen)):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            cmask[i, pl - 1 : len(s) - 1] = 1.0
        ids, attn, cmask = ids.to(device), attn.to(device), cmask.to(device)
        visual = {k: v.to(device) for k, v in visual_inputs(seqs).items()} or None
        # a backend returns sampler log-probs exactly when its samples need the correction (vLLM)
        old = token_logprobs(model, ids, attn, self.temperature, visual) \
            if self.ppo_epochs > 1 or sample_logps is not None else None
        ref = token_logprobs(self.ref_model, ids, attn, self.temperature, visual) if self.kl_coef else None
        is_ratio = None
        if sample_logps is not None:
            kept = [lp for i in range(len(prompts)) if keep[i] for lp in sample_logps[i * g:(i + 1) * g]]
            is_ratio = self._sampler_weights(old, kept, plen, cmask, logs)
        if self.ppo_epochs == 1:
            old = None  # no update since sampling: the current policy is the old one
        return Rollout(ids, attn, cmask, adv.to(device), old, ref, logs, is_ratio, visual)

    def _sampler_weights(self, old: torch.Tensor, sample_logps: list[list[float]], plen: list[int],
                         cmask: torch.Tensor, logs: dict) -> torch.Tensor:
        """The sampler correction for completions drawn by another engine, aligned with ``cmask``; logs the
        mean trainer-minus-sampler log-prob per token, the mean weight and the share of zero weights."""
        sample = torch.full(cmask.shape, float("nan"))
        for i, (lp, pl) in enumerate(zip(sample_logps, plen)):
            sample[i, pl - 1: pl - 1 + len(lp)] = torch.tensor(lp)
        sample = sample.to(old.device)
        w = sampler_correction(old, sample, cmask, **self.rollouts.correction)
        m = cmask.to(old.dtype)
        valid = m * (~sample.isnan()).to(m.dtype)
        logs["sampler_logp_diff"] = (torch.nan_to_num(old - sample) * valid).sum() / valid.sum().clamp(min=1.0)
        per_token = w.expand_as(m)
        logs["sampler_is_weight"] = (per_token * m).sum() / m.sum().clamp(min=1.0)
        logs["sampler_is_zero_frac"] = ((per_token == 0).to(m.dtype) * m).sum() / m.sum().clamp(min=1.0)
        return w

    def completion_len_by_task(self) -> dict[str, float]:
        """Mean completion length (tokens, eos included) of every task's rollouts over the run."""
        return {t: tokens / n for t, (n, tokens) in self.completion_tokens.items() if n}

    def _length_shaped(self, raw: torch.Tensor, passed: torch.Tensor, comps: list[list[int]],
                       rows: list[dict]) -> tuple[torch.Tensor, dict]:
        """The task rewards plus ``length_weight`` x the length term of ``length_reward``
        (:mod:`cl.objectives.length_rewards`); logs the mean term and, for grpo_lambda, the share of groups
        penalised."""
        g = self.group_size
        lengths = torch.tensor([len(c) for c in comps]).view(-1, g)
        correct = (passed >= 1.0).view(-1, g)
        logs = {}
        if self.length_reward == "grpo_lambda":
            terms, chosen = grpo_lambda_terms(lengths, correct, self.lambda_fraction)
            logs["length_penalised_frac"] = chosen.float().mean()
        else:
            keys = [f"{r['task']}\x00{r['prompt']}" for r in rows]
            terms = hapo_terms(lengths, correct, keys, self.length_history)
        logs["length_term"] = terms.mean()
        return raw + self.length_weight * self.reward_scale * terms.reshape(-1), logs

    def _logs(self, rewards: torch.Tensor, passed: torch.Tensor, comps: list[list[int]], rows: list[dict],
              zero_groups) -> dict:
        g = self.group_size
        lens = torch.tensor([float(len(c)) for c in comps])
        logs = {"reward": rewards.mean(), "pass_rate": passed.mean(),
                "completion_len": lens.mean(), "zero_adv_frac": zero_groups.float().mean()}
        for name in {r["task"] for r in rows}:
            idx = torch.tensor([i for i, r in enumerate(rows) if r["task"] == name])
            logs[f"{name}/reward"] = rewards.view(-1, g)[idx].mean()
        return logs

    # -- the objective ------------------------------------------------------------------------------
    def step(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.fmt is None:
            raise RuntimeError("GRPOObjective.bind(fmt, tasks) was not called")
        if self.reference == "sync" and self.kl_coef and self._steps and self._steps % self.ref_sync_every == 0:
            self._snapshot(module.model)
        self._steps += 1
        if self._rollout is None or self._uses >= self.ppo_epochs:
            self._rollout, self._uses = self.rollout(module, batch), 0
        ro = self._rollout
        self._uses += 1
        if ro.input_ids.size(0) == 0:  # every group dropped by dynamic sampling
            zero = sum(p.sum() for p in module.model.parameters() if p.requires_grad) * 0.0
            return zero, dict(ro.logs)
        logp = token_logprobs(training_forward(module), ro.input_ids, ro.attention_mask, self.temperature, ro.visual)
        old = ro.old_logp if ro.old_logp is not None else logp.detach()
        loss, stats = grpo_loss(logp, old, ro.advantages, ro.completion_mask, self.eps_low, self.eps_high,
                                self.kl_coef, ro.ref_logp, self.loss_agg, self.max_new_tokens, ro.is_ratio)
        return loss, {**ro.logs, **stats, "loss": loss.detach()}
