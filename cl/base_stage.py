"""The base stage of the embedded default: pretrain the tiny model from scratch, once, and cache it.

The model learns general skills (mastered) and gets exposure to the stream tasks up to a partial target
level, so that they keep headroom (greedy accuracy well below 1) and a learning signal for RL (pass@8
well above zero). The partial level comes from coverage of each stream task's input space, and the stage
ends by measured criteria rather than at a fixed step (:class:`BaseRecipe`), because the arithmetic skills
are learned in a sudden transition whose step moves with the machine's floating point; ``scripts/check_base.py`` measures the margin under perturbed numerics. The checkpoint is
cached under ``<cache_dir>/base-<hash>`` where the hash covers everything that determines it
(architecture, recipe, data settings, code version); concurrent runs serialise on a file lock and publish
with an atomic rename, so sweep jobs that start together train it once.
"""

from __future__ import annotations

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
from filelock import FileLock
from torch.utils.data import DataLoader

from cl.results import dumps_strict
from cl.core.data import SFTCollator, TaskExamples
from cl.evaluation import EvalSet, Scorer, pass_at_k
from cl.model import build_tiny, load_model_and_tokenizer
from cl.vision import make_format
from cl.module import ContinualLM
from cl.objectives.sft import SFTObjective
from cl.trainer import make_trainer
from tasks.base import Task

log = logging.getLogger(__name__)
BASE_STAGE_VERSION = 2  # bump when the code below changes what a cached checkpoint contains


@dataclass(frozen=True)
class BaseRecipe:
    """How the tiny base model is pretrained: the settings of ``conf/base/*.yaml`` and the one place their
    defaults are written (the defaults are ``base=tiny``'s, less its task mixture, coverage and expected
    levels; a preset sets only what differs).

    The stage trains on a weighted mixture of general tasks (to be mastered) and stream tasks
    ("exposure", to be partially known) and ends by measured properties, not at a fixed step:

    - **Coverage sets the stream tasks' partial level.** Exposure rows are only those whose first
      operand's leading digit is in ``cover`` (0-4: half of add3's and mul21's input space, a quarter of
      sub2's, where the larger operand comes first). The model learns the covered part and transfers
      little to the rest, so a task's accuracy levels off near its covered share. A level set by how far
      training has got instead sits on the arithmetic phase transition, whose step moves with the
      machine's floating point: measured, partial levels reached that way swung by +-0.3 within 50 steps
      and rose on their own once any arithmetic was trained, even with the task's own exposure removed.
    - **Compute goes where a general skill is not mastered yet**: every ``general_check_every`` steps a
      general task's weight becomes ``general[task] * max(general_floor, 1 - accuracy)`` on its validation
      rows (``val_n`` training rows the stage never trains on).
    - **Anneal, then stop once the covered part is learned and the levels are flat.** From ``min_steps``
      the LR anneals linearly over ``anneal_steps`` to ``min_lr_ratio`` and stays there; the stream tasks
      are scored every ``check_every`` steps from ``min_steps`` on (every ``general_check_every`` before).
      The stage stops at the first check after the anneal where every general task is >= ``general_min``,
      every stream task is >= ``cover_min`` on its covered validation rows (None: not required), and every
      stream task's accuracy differs by <= ``plateau_delta`` from its value at the check
      ``plateau_window`` steps earlier; or at ``steps`` (the cap; the health check then warns). Without the
      covered-rows criterion a plateau of the slowly learned add3 stopped some builds with its covered half
      still being learned, which made its level depend on the init seed and numerics.

    ``expected`` holds the stream tasks' levels as ``scripts/check_base.py`` measured them over init seeds
    and perturbed numerics; the health check compares a base with them (``health_band``) and its general
    tasks with ``general_health``.
    """

    steps: int = 1400                    # cap: the health check warns when the stage ends here
    min_steps: int = 500                 # the LR anneals from here over anneal_steps to min_lr_ratio
    batch_size: int = 192
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    gradient_clip_val: float = 1.0
    general: dict[str, float] = field(default_factory=dict)   # general task -> mixture weight
    exposure: dict[str, float] = field(default_factory=dict)  # stream task -> mixture weight
    cover: tuple[int, ...] | None = None  # exposure rows: only those whose key (the first operand's leading digit; a visual task's `key`) is one of these
    general_floor: float = 0.25          # a general task's weight: general[task] * max(general_floor, 1 - accuracy)
    general_min: float = 0.99            # stop: every general task >= this on its validation rows...
    cover_min: float | None = 0.8        # ...every stream task >= this on its covered validation rows...
    anneal_steps: int = 150
    min_lr_ratio: float = 0.2
    plateau_window: int = 100            # ...and every stream task moved <= plateau_delta over this many steps
    plateau_delta: float = 0.03
    check_every: int = 20                # stream tasks scored every check_every steps from min_steps
    general_check_every: int = 50        # general tasks scored (and reweighted) every general_check_every steps
    val_n: int = 300                     # validation rows per task, held out of the stage's training rows
    init_seed: int = 0
    report_n: int = 500                  # eval items per task in base_report.json
    report_pass_k: int = 8
    expected: dict[str, float] = field(default_factory=dict)  # measured levels (scripts/check_base.py)
    general_health: float = 0.95         # health: every general task >= this on the report items
    health_band: float = 0.10            # health: every stream task within this of its expected level

    @property
    def mixture(self) -> dict[str, float]:
        return {**self.general, **self.exposure}


HEALTH_FIELDS = ("expected", "general_health", "health_band")  # how a base is judged, not how it is built


def base_key(arch: dict, recipe: BaseRecipe, data: dict) -> str:
    """The cache key: a hash of everything that determines the checkpoint (not of the health criteria)."""
    built = {k: v for k, v in asdict(recipe).items() if k not in HEALTH_FIELDS}
    key = {"arch": arch, "recipe": built, "data": data, "version": BASE_STAGE_VERSION}
    if "image_size" in arch:  # a vision-language base: its images come from the visual task drawings
        import PIL

        from tasks.visual import VERSION

        key["visual_tasks"] = [VERSION, PIL.__version__]  # the drawings and the font they use
    blob = json.dumps(key, sort_keys=True, default=str)
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
    with FileLock(root / f"base-{key}.lock"):  # one build per key; concurrent runs wait and reuse it
        if (final / "base_report.json").exists():  # built by a concurrent run while we waited
            return final
        for stale in root.glob(f"base-{key}.tmp-*"):  # left by a run killed mid-build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"base-{key}.tmp-{os.getpid()}"
        report = _train_base(tmp, arch, recipe, tasks, trainer_kwargs)
        report["key"], report["arch"], report["recipe"], report["data"] = key, arch, asdict(recipe), data
        (tmp / "base_report.json").write_text(dumps_strict(report, indent=2))
        os.rename(tmp, final)
    print(f"[base] cached at {final}", flush=True)
    return final


def _leading_digit(prompt: str) -> int | None:
    """The first operand's leading digit of a synthetic arithmetic prompt (``A3:123+456=`` -> 1)."""
    body = prompt.split(":", 1)[-1]
    return int(body[0]) if body[:1].isdigit() else None


def cover_keys(rows) -> list[int | None]:
    """Each row's part of the input space: its ``key`` column where the task has one (the visual tasks), else
    the first operand's leading digit (:func:`_leading_digit`)."""
    if "key" in rows:
        return list(rows["key"])
    return [_leading_digit(p) for p in rows["prompt"]]


def covered_split(scores: list[float], keys: list[int | None], cover) -> dict[str, float | None]:
    """Mean score over the rows inside (``covered``) and outside (``uncovered``) the covered part of the
    input space (``keys``: :func:`cover_keys`; ``None`` for an empty part)."""
    out = {}
    for part, keep in (("covered", True), ("uncovered", False)):
        x = [v for v, k in zip(scores, keys) if (k in cover) == keep]
        out[part] = sum(x) / len(x) if x else None
    return out


class MixtureBatches:
    """Batches of row indices drawn from a task mixture whose weights may change between batches.

    ``spans[name] = (first, n)`` locates a task's rows in the dataset; each batch draws a task per example
    from the active tasks' weights and then a row of that task uniformly, with its own generator."""

    def __init__(self, spans: dict[str, tuple[int, int]], weights: dict[str, float], batch_size: int, steps: int,
                 seed: int):
        self.spans, self.weights, self.batch_size, self.steps = spans, dict(weights), batch_size, steps
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        names = list(self.spans)
        for _ in range(self.steps):
            w = torch.tensor([self.weights[n] for n in names], dtype=torch.float64)
            which = torch.multinomial(w, self.batch_size, replacement=True, generator=self.gen)
            rows = torch.rand(self.batch_size, generator=self.gen, dtype=torch.float64)
            out = []
            for k, r in zip(which.tolist(), rows.tolist()):
                first, n = self.spans[names[k]]
                out.append(first + min(int(r * n), n - 1))
            yield out


class AnnealFrom:
    """The base stage's LR multiplier: linear warm-up, constant, then from ``anneal_start`` a linear anneal
    over ``anneal_steps`` to ``min_lr_ratio``, which it keeps."""

    def __init__(self, warmup_steps: int, anneal_start: int, anneal_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.anneal_start = warmup_steps, anneal_start
        self.anneal_steps, self.min_lr_ratio = anneal_steps, min_lr_ratio

    def lr_lambda(self, total_steps: int, task_idx: int = 0):
        def fn(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            if step < self.anneal_start:
                return 1.0
            frac = min(1.0, (step - self.anneal_start) / max(1, self.anneal_steps))
            return 1.0 - (1.0 - self.min_lr_ratio) * frac

        return fn


class MixtureController(pl.Callback):
    """The base stage's measured stop (see :class:`BaseRecipe`): rescales the general tasks' weights by what
    is not mastered yet and stops training once the general skills are mastered and the stream tasks have
    levelled off after the anneal."""

    def __init__(self, recipe: BaseRecipe, batches: MixtureBatches, val: dict[str, EvalSet], scorer: Scorer):
        self.r, self.batches, self.val, self.scorer = recipe, batches, val, scorer
        self.general_acc: dict[str, float] = {}
        self.history: list[dict] = []
        self.stopped_at: int | None = None

    def _score(self, model, names: list[str]) -> dict[str, float]:
        return dict(zip(names, self.scorer.accuracies(model, [self.val[n] for n in names])))

    def _score_stream(self, model) -> dict[str, float]:
        """Each stream task's validation accuracy, and (with ``cover``) that of its covered and uncovered rows
        (``add3:covered``, ``add3:uncovered``)."""
        out = {}
        for name in self.r.exposure:
            s = self.scorer.scores(model, self.val[name])
            out[name] = sum(s) / len(s)
            if self.r.cover is not None:
                for part, acc in covered_split(s, cover_keys(self.val[name].rows), self.r.cover).items():
                    if acc is not None:
                        out[f"{name}:{part}"] = acc
        return out

    def on_train_batch_end(self, trainer, pl_module, *_):
        r, step = self.r, trainer.global_step
        if step < r.warmup_steps or step % (r.check_every if step >= r.min_steps else r.general_check_every):
            return
        model = pl_module.model
        scored = self._score_stream(model)
        stream = {n: scored[n] for n in r.exposure}
        learned = r.cover_min is None or all(scored.get(f"{n}:covered", 1.0) >= r.cover_min for n in r.exposure)
        annealed = step >= r.min_steps + r.anneal_steps
        past = [h for h in self.history if h["step"] <= step - r.plateau_window]
        flat = bool(past) and all(abs(stream[n] - past[-1][n]) <= r.plateau_delta for n in stream)
        stop_candidate = annealed and learned and (flat or not stream)
        if step % r.general_check_every == 0 or stop_candidate:
            self.general_acc = self._score(model, list(r.general))
            for name, acc in self.general_acc.items():  # more exposure where the skill is not mastered yet
                self.batches.weights[name] = r.general[name] * max(r.general_floor, 1.0 - acc)
        general_ok = all(self.general_acc.get(n, 0.0) >= r.general_min for n in r.general)
        self.history.append({"step": step, **{n: round(a, 4) for n, a in {**scored, **self.general_acc}.items()}})
        if step % r.general_check_every == 0:
            print(f"[base] step {step}: " + " ".join(f"{n} {a:.2f}" for n, a in scored.items())
                  + " | general " + " ".join(f"{n} {a:.2f}" for n, a in self.general_acc.items()), flush=True)
        if stop_candidate and general_ok:
            self.stopped_at = step
            trainer.should_stop = True


def _train_base(out: Path, arch: dict, recipe: BaseRecipe, tasks: dict[str, Task], trainer_kwargs: dict,
                perturb: float = 0.0) -> dict:
    """Train and save the base model in ``out``; returns its report. ``perturb`` > 0 adds Gaussian noise of
    that relative size to the initial weights (``scripts/check_base.py``'s numerics perturbation)."""
    t0 = time.perf_counter()
    build_tiny(out, seed=recipe.init_seed, **arch)
    model, tokenizer = load_model_and_tokenizer(out)
    if perturb > 0:
        gen = torch.Generator().manual_seed(10_007 + recipe.init_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * perturb * p.abs().mean())
    model.train()
    fmt = make_format(model, tokenizer, path=out)
    pairs, spans, val = [], {}, {}
    for name in recipe.mixture:
        rows = tasks[name].train
        n_val = min(recipe.val_n, len(rows) // 5)  # the stage never trains on its validation rows
        held = rows.select(range(len(rows) - n_val, len(rows)))
        val[name] = EvalSet(tasks[name], held.to_dict(), fmt.encode(held["prompt"], held["answer"]))
        prompts, answers = rows["prompt"][: len(rows) - n_val], rows["answer"][: len(rows) - n_val]
        if name in recipe.exposure and recipe.cover is not None:  # the covered part of the task's input space
            keys = cover_keys(rows[: len(rows) - n_val])
            keep = [i for i, k in enumerate(keys) if k in recipe.cover]
            prompts, answers = [prompts[i] for i in keep], [answers[i] for i in keep]
        if not prompts:
            raise ValueError(f"base stage: no training rows of '{name}' left (base.cover {recipe.cover}, "
                             f"base.val_n {recipe.val_n})")
        enc = fmt.encode(prompts, answers)
        spans[name] = (len(pairs), len(enc))
        pairs += enc
    batches = MixtureBatches(spans, recipe.mixture, recipe.batch_size, recipe.steps, seed=recipe.init_seed)
    loader = DataLoader(TaskExamples(pairs), batch_sampler=batches, collate_fn=SFTCollator(fmt.pad_id))
    schedule = AnnealFrom(recipe.warmup_steps, recipe.min_steps, recipe.anneal_steps, recipe.min_lr_ratio)
    module = ContinualLM(
        model, SFTObjective(),
        partial(torch.optim.AdamW, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay),
        schedule,
    )
    scorer = Scorer(fmt)
    controller = MixtureController(recipe, batches, val, scorer)
    pl.seed_everything(recipe.init_seed, verbose=False)
    kwargs = {**trainer_kwargs, "gradient_clip_val": recipe.gradient_clip_val}
    print(f"[base] pretraining the tiny model: up to {recipe.steps} steps x {recipe.batch_size} on "
          f"{', '.join(f'{k}:{v}' for k, v in recipe.mixture.items())}; anneals from step {recipe.min_steps}, stops "
          f"once general tasks are >= {recipe.general_min}"
          + (f", covered stream rows >= {recipe.cover_min}" if recipe.cover is not None and recipe.cover_min else "")
          + " and stream tasks level off", flush=True)
    make_trainer(recipe.steps, kwargs, "base", callbacks=[controller], progress_every=100).fit(module, loader)
    train_s = time.perf_counter() - t0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    report: dict = {"train_seconds": train_s, "steps": module.trainer.global_step if module._trainer else None,
                    "stopped_by": "criteria" if controller.stopped_at is not None else "cap",
                    "greedy": {}, f"pass@{recipe.report_pass_k}": {}, "history": controller.history}
    model.eval()
    for name in recipe.mixture:
        es = EvalSet.build(tasks[name], fmt, recipe.report_n, seed=0)
        scores = scorer.scores(model, es)
        report["greedy"][name] = sum(scores) / len(scores)
        if name in recipe.exposure and recipe.cover is not None:  # the covered and uncovered parts separately
            for part, acc in covered_split(scores, cover_keys(es.rows), recipe.cover).items():
                report.setdefault(f"greedy_{part}", {})[name] = acc
        if name in recipe.exposure:
            report[f"pass@{recipe.report_pass_k}"][name] = pass_at_k(model, es, fmt, k=recipe.report_pass_k)
    report["general_mean"] = (sum(report["greedy"][n] for n in recipe.general) / len(recipe.general)
                              if recipe.general else None)
    report["seconds"] = time.perf_counter() - t0
    print(f"[base] stopped at step {report['steps']} ({report['stopped_by']}); greedy accuracy: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report["greedy"].items()), flush=True)
    print(f"[base] pass@{recipe.report_pass_k} (T=1): "
          + ", ".join(f"{k} {v:.3f}" for k, v in report[f"pass@{recipe.report_pass_k}"].items())
          + f" | {report['seconds']:.0f} s", flush=True)
    return report


def base_health(report: dict, recipe: BaseRecipe) -> dict:
    """Compare a base report with its recipe: ``{"ok": bool, "problems": [one line each]}``.

    A general task must reach ``general_health`` greedy accuracy on the report items (the stage itself
    stops at ``general_min`` on its validation rows); a stream task's greedy accuracy must lie within
    ``health_band`` of its ``expected`` level; the stage must have stopped by its criteria, not its cap."""
    problems = []
    greedy = report.get("greedy", {})
    for name in recipe.general:
        if name in greedy and greedy[name] < recipe.general_health:
            problems.append(f"general task {name}: greedy accuracy {greedy[name]:.3f} < {recipe.general_health}")
    for name, level in recipe.expected.items():
        if name in greedy and abs(greedy[name] - level) > recipe.health_band:
            problems.append(f"stream task {name}: greedy accuracy {greedy[name]:.3f} outside its expected level "
                            f"{level:.2f} +- {recipe.health_band}")
    if report.get("stopped_by") == "cap":
        problems.append(f"the base stage reached its {recipe.steps}-step cap before its stopping criteria held")
    return {"ok": not problems, "problems": problems}
