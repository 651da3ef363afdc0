"""The base stage of the embedded default: pretrain the tiny model from scratch, once, and cache it.

The recipe (../shared/TOYWORLD.md) trains on a mixture of general skills plus light exposure to the
stream tasks, so that general tasks are mastered while stream tasks keep headroom (low greedy accuracy)
and a learning signal for RL (pass@k well above zero). The checkpoint is cached under
``<cache_dir>/base-<hash>`` where the hash covers everything that determines it (architecture, recipe,
data settings, code version); concurrent runs serialise on a file lock and publish with an atomic
rename, so sweep jobs that start together train it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from cl.data import PromptFormat, SFTCollator, TaskExamples
from cl.evaluation import EvalSet, Scorer, pass_at_k
from cl.model import build_tiny_llama, load_model_and_tokenizer
from cl.module import ContinualLM
from cl.objectives.sft import SFTObjective
from cl.schedule import LRSchedule
from cl.trainer import make_trainer
from tasks.base import Task

log = logging.getLogger(__name__)
BASE_STAGE_VERSION = 1  # bump when the code below changes what a cached checkpoint contains


@dataclass(frozen=True)
class BaseRecipe:
    """How the tiny base model is pretrained (``conf/base/*.yaml``)."""

    steps: int = 900
    batch_size: int = 256
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay: str = "linear"
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    gradient_clip_val: float = 1.0
    general: dict[str, float] = field(default_factory=dict)
    exposure: dict[str, float] = field(default_factory=dict)
    init_seed: int = 0
    report_n: int = 200
    report_pass_k: int = 8

    @property
    def mixture(self) -> dict[str, float]:
        return {**self.general, **self.exposure}


def base_key(arch: dict, recipe: BaseRecipe, data: dict) -> str:
    blob = json.dumps({"arch": arch, "recipe": asdict(recipe), "data": data, "version": BASE_STAGE_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_base(cache_dir: str | Path, arch: dict, recipe: BaseRecipe, data: dict, tasks: dict[str, Task],
                trainer_kwargs: dict) -> Path:
    """Return the cached base checkpoint directory, training it first if it is not there.

    Args:
        cache_dir: root of the cache.
        arch: tiny-model architecture (``conf/model/tiny.yaml``'s ``arch``).
        recipe: the pretraining recipe.
        data: the data settings the tasks were built with (part of the key).
        tasks: the built tasks named in the recipe's mixture.
        trainer_kwargs: Lightning Trainer settings.
    """
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    key = base_key(arch, recipe, data)
    final = root / f"base-{key}"
    if (final / "base_report.json").exists():
        log.info("base checkpoint found in cache: %s", final)
        return final
    with open(root / f"base-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "base_report.json").exists():  # built by a concurrent run while we waited
            return final
        for stale in root.glob(f"base-{key}.tmp-*"):  # left by a run killed mid-build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"base-{key}.tmp-{os.getpid()}"
        report = _train_base(tmp, arch, recipe, tasks, trainer_kwargs)
        report["key"], report["arch"], report["recipe"], report["data"] = key, arch, asdict(recipe), data
        (tmp / "base_report.json").write_text(json.dumps(report, indent=2))
        os.rename(tmp, final)
    print(f"[base] cached at {final}", flush=True)
    return final


def _train_base(out: Path, arch: dict, recipe: BaseRecipe, tasks: dict[str, Task], trainer_kwargs: dict) -> dict:
    t0 = time.perf_counter()
    build_tiny_llama(out, seed=recipe.init_seed, **arch)
    model, tokenizer = load_model_and_tokenizer(out)
    model.train()
    fmt = PromptFormat(tokenizer)
    pairs, weights = [], []
    for name, w in recipe.mixture.items():
        rows = tasks[name].train
        enc = fmt.encode(rows["prompt"], rows["answer"])
        pairs += enc
        weights += [w / len(enc)] * len(enc)
    gen = torch.Generator().manual_seed(recipe.init_seed)
    sampler = WeightedRandomSampler(weights, num_samples=recipe.steps * recipe.batch_size, replacement=True,
                                    generator=gen)
    loader = DataLoader(TaskExamples(pairs), batch_size=recipe.batch_size, sampler=sampler,
                        collate_fn=SFTCollator(fmt.pad_id))
    module = ContinualLM(
        model, SFTObjective(),
        partial(torch.optim.AdamW, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay),
        LRSchedule(recipe.warmup_steps, recipe.decay, recipe.min_lr_ratio, recipe.decay_fraction),
    )
    pl.seed_everything(recipe.init_seed, verbose=False)
    kwargs = {**trainer_kwargs, "gradient_clip_val": recipe.gradient_clip_val}
    print(f"[base] pretraining the tiny model: {recipe.steps} steps x {recipe.batch_size} on "
          f"{', '.join(f'{k}:{v}' for k, v in recipe.mixture.items())}", flush=True)
    make_trainer(recipe.steps, kwargs, "base", progress_every=100).fit(module, loader)
    train_s = time.perf_counter() - t0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    scorer = Scorer(fmt)
    report: dict = {"train_seconds": train_s, "greedy": {}, f"pass@{recipe.report_pass_k}": {}}
    for name in recipe.mixture:
        es = EvalSet.build(tasks[name], fmt, recipe.report_n, seed=0)
        report["greedy"][name] = scorer.accuracy(model, es)
        if name in recipe.exposure:
            report[f"pass@{recipe.report_pass_k}"][name] = pass_at_k(model, es, fmt, k=recipe.report_pass_k)
    report["general_mean"] = (sum(report["greedy"][n] for n in recipe.general) / len(recipe.general)
                              if recipe.general else None)
    report["seconds"] = time.perf_counter() - t0
    print("[base] greedy accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in report["greedy"].items()), flush=True)
    print(f"[base] pass@{recipe.report_pass_k} (T=1): "
          + ", ".join(f"{k} {v:.3f}" for k, v in report[f"pass@{recipe.report_pass_k}"].items())
          + f" | {report['seconds']:.0f} s", flush=True)
    return report
