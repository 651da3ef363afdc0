"""RIF-RFT: rollout-based instance filtering before RL on a task (RFT-CPT paper, Lai et al. 2025).

Before training on a task, roll out K completions per training instance with the current model
(temperature 1) and drop the instances with no correct completion ("not learnable now"); optionally
drop the all-correct ones too (off by default, as in the paper). GRPO then trains on the rest.

The screened rows are a seeded random sample of ``max_instances`` training rows (``null``: the whole pool;
the stream samples ``steps x batch`` rows per task, and screening a large pool whole can cost more than
the RL itself); the kept rows form the task's training pool. ``control=random`` is the paper's control
arm: the same screening, then a random subset of the screened rows *of the same size* as the kept set,
regardless of the rollouts' verdicts, so a comparison separates "which rows" from "how many rows".
Reported per task: screened, kept, dropped, the rollout tokens the screening cost, and the rollout tokens
it saves: the share of the task's planned GRPO rollouts that would have gone to dropped (zero-signal)
prompts.
"""

from __future__ import annotations

import random
from dataclasses import replace

from cl.generation import generate_ids
from tasks.base import Task
from cl.core.components import Component


CONTROLS = ("none", "random")


class RolloutInstanceFilter(Component):
    """A data component: ``prepare_data(ctx, task) -> task`` with unlearnable instances removed.

    Args:
        k: rollouts per instance.
        max_instances: how many training rows to screen (a seeded random sample; None: all).
        control: ``none`` (keep the rows with a correct rollout) or ``random`` (keep as many rows, at random).
        drop_all_correct: also drop rows whose K rollouts are all correct.
        temperature: sampling temperature of the screening rollouts.

    From the run (not configuration): the objective (its completion budget ``max_new_tokens`` and group
    size ``group_size``; 16 and 1 without them) and the stream's steps and batch size, which give the
    prompts the objective will roll out on a task (for "saved").
    """
    key = "rif"
    ckpt_attrs = ("records",)

    @classmethod
    def check_config(cls, c, at: str) -> None:
        c.integer(f"{at}.k", minimum=1)
        c.integer(f"{at}.max_instances", minimum=1, optional=True)
        c.number(f"{at}.temperature", lo=0.0, strict_lo=True)
        c.choice(f"{at}.control", CONTROLS)

    def __init__(self, fmt, k: int = 8, max_instances: int | None = 1024, drop_all_correct: bool = False,
                 temperature: float = 1.0, control: str = "none", objective=None, stream_batch_size: int = 0,
                 steps_per_task: int = 0, seed: int = 0, log=None):
        if control not in CONTROLS:
            raise ValueError(f"control: '{control}' is not one of {', '.join(CONTROLS)}")
        self.fmt, self.k, self.max_instances, self.drop_all_correct = fmt, k, max_instances, drop_all_correct
        self.control, self.seed = control, seed
        self.max_new_tokens = getattr(objective, "max_new_tokens", 16)
        self.group_size = getattr(objective, "group_size", 1)
        self.temperature, self.log = temperature, log
        self.planned_prompts = steps_per_task * stream_batch_size
        self.records: list[dict] = []

    def record(self) -> list[dict]:
        return self.records

    def prepare_data(self, ctx, task: Task) -> Task:
        n = len(task.train) if self.max_instances is None else min(self.max_instances, len(task.train))
        picked = sorted(random.Random(f"{self.seed}/{task.name}/rif").sample(range(len(task.train)), n))
        rows = task.train.select(picked).to_list()
        prompts = self.fmt.prompt_ids([r["prompt"] for r in rows])
        comps = generate_ids(ctx.module.model, prompts, self.fmt, self.max_new_tokens, do_sample=True,
                             temperature=self.temperature, num_return_sequences=self.k)
        texts = [self.fmt.decode(c) for c in comps]
        cols = {c: [r[c] for r in rows for _ in range(self.k)] for c in rows[0]}
        scores = task.score(texts, **cols)
        kept = []
        for i in range(len(rows)):
            s = scores[i * self.k:(i + 1) * self.k]
            if max(s) <= 0 or (self.drop_all_correct and min(s) >= 1):
                continue
            kept.append(i)
        cost = sum(len(c) for c in comps)
        mean_len = cost / max(1, len(comps))
        dropped = len(rows) - len(kept)
        saved = self.planned_prompts * self.group_size * mean_len * dropped / max(1, len(rows))
        rec = {"task_idx": ctx.task_idx, "task": task.name, "pool": len(task.train), "screened": len(rows),
               "kept": len(kept), "dropped": dropped, "control": self.control, "rollout_tokens_cost": cost,
               "rollout_tokens_saved_est": saved}
        if self.control == "random":  # as many rows as the filter kept, chosen without looking at the rollouts
            kept = sorted(random.Random(f"{self.seed}/{task.name}/rif-control").sample(range(len(rows)), len(kept)))
            rec["kept_with_a_correct_rollout"] = sum(max(scores[i * self.k:(i + 1) * self.k]) > 0 for i in kept)
            # the saving: the drop in the share of zero-signal rows the pool holds (about 0 for a random subset)
            zero_kept = 1 - rec["kept_with_a_correct_rollout"] / max(1, len(kept))
            saved = self.planned_prompts * self.group_size * mean_len * max(0.0, dropped / max(1, len(rows)) - zero_kept)
            rec["rollout_tokens_saved_est"] = saved
        self.records.append(rec)
        how = " at random (control=random)" if self.control == "random" else ""
        print(f"[rif] {task.name}: kept {len(kept)}/{len(rows)} screened instances{how} ({dropped} had no correct "
              f"completion in {self.k}); screening cost {cost} generated tokens, saves ~{saved:.0f}", flush=True)
        if self.log is not None:
            self.log({"cl/global_iter": ctx.module.global_iter, **{f"rif/{k}": v for k, v in rec.items()
                                                                   if isinstance(v, (int, float))}})
        if not kept:
            print(f"[rif] {task.name}: no learnable instance; training on the unfiltered pool", flush=True)
            return task
        return replace(task, train=task.train.select([picked[i] for i in kept]))
