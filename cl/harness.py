"""General capability through lm-evaluation-harness, scored on the model in memory.

``general_eval=lm_eval`` adds harness tasks (MMLU, ARC, HellaSwag, GSM8K, or custom task YAMLs in
``include_path``) to the general suite: at every task boundary (and, with ``inner_points``, at the inner
evaluation points too) the harness scores the model being trained through its Hugging Face wrapper
(``HFLM(pretrained=<model object>)``), without saving and reloading weights. Each task's score becomes a
column ``lm_eval:<task>`` of the general matrix, next to the toy probes of ``stream.general``, and feeds
the curves, the logger, the plots and general retention like them.

The items are the same at every point: the harness takes the first ``limit`` documents of each task's
evaluation split, and few-shot examples are drawn with a fixed seed. Tasks and their data are loaded once,
when the run starts.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

PREFIX = "lm_eval:"

# The metric reported for a task when ``metrics`` does not name one: the first present, in this order
# (``acc_norm`` corrects multiple choice for answer length; generation tasks report exact_match per filter).
METRIC_ORDER = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none",
                "exact_match,flexible-extract", "f1,none")


@dataclass
class HarnessSettings:
    """``general_eval.*`` with ``general_eval=lm_eval`` (conf/general_eval/lm_eval.yaml).

    Attributes:
        kind: ``lm_eval``.
        tasks: harness task or group names (``mmlu`` scores as its group's aggregate).
        num_fewshot: few-shot examples per prompt (None: each task's own default, else 0).
        fewshot_seed: seed of the few-shot draw, restarted at every point (the same prompts every point).
        limit: documents per task at every point (the first ``limit`` of its evaluation split; None: all). A
            group applies it to each of its tasks: MMLU's 57 subjects score up to 57 x ``limit``.
        batch_size: the harness's batch size.
        max_length: context length the harness truncates to (None: the model's).
        include_path: a directory of custom task YAMLs (local data: ``dataset_path: json``).
        metrics: task -> harness metric key (e.g. ``gsm8k: exact_match,flexible-extract``); others take the
            first of :data:`METRIC_ORDER` the task reports.
        apply_chat_template: wrap prompts in the tokenizer's chat template.
        inner_points: also score the harness at inner evaluation points (default: boundaries only).
    """

    kind: str = "lm_eval"
    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "hellaswag", "mmlu"])
    num_fewshot: int | None = None
    fewshot_seed: int = 1234
    limit: int | None = 100
    batch_size: int = 8
    max_length: int | None = None
    include_path: str | None = None
    metrics: dict[str, str] = field(default_factory=dict)
    apply_chat_template: bool = False
    inner_points: bool = False


@dataclass
class HarnessPoint:
    """One harness evaluation: ``scores[name]`` in [0, 1], ``items[name]`` documents scored, the metric key
    each score is, and the harness's per-document samples (``samples[task]``: its logged requests)."""

    scores: dict[str, float]
    items: dict[str, int]
    metric: dict[str, str]
    samples: dict[str, list]


class LmEvalGeneral:
    """Harness tasks loaded once; :meth:`evaluate` scores a model object on them.

    Args:
        settings: :class:`HarnessSettings`.
        tokenizer: the run's tokenizer (the harness tokenizes with it).
    """

    def __init__(self, settings: HarnessSettings, tokenizer):
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise ValueError('general_eval=lm_eval needs lm-evaluation-harness: pip install -e ".[real]"') from None
        self.settings, self.tokenizer = settings, tokenizer
        if not settings.tasks:
            raise ValueError("general_eval.tasks is empty: name at least one harness task")
        logging.getLogger("lm-eval").setLevel(logging.WARNING)
        manager = TaskManager(include_path=settings.include_path, verbosity="WARNING")
        unknown = [t for t in settings.tasks if t not in manager.all_tasks]
        if unknown:
            where = f" (or in {settings.include_path})" if settings.include_path else ""
            raise ValueError(f"general_eval.tasks: unknown harness task(s) {', '.join(unknown)}; "
                             f"see `lm-eval ls tasks`{where}")
        self.loaded = manager.load(list(settings.tasks))
        for task in self.loaded["tasks"].values():  # what simple_evaluate does per task, once
            if settings.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=settings.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=settings.fewshot_seed)
        self.names = [PREFIX + t for t in settings.tasks]

    def evaluate(self, model: torch.nn.Module) -> HarnessPoint:
        """Score ``model`` (in memory, as it is now) on every task; restores its train/eval mode."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        s = self.settings
        for task in self.loaded["tasks"].values():  # the few-shot draw restarts: the same prompts every point
            task.set_fewshot_seed(seed=s.fewshot_seed)
        was_training = model.training
        quiet = logging.getLogger("lm_eval")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the wrapper warns on every point that it was given an object
        try:
            lm = _quiet(HFLM)(pretrained=model, tokenizer=self.tokenizer, batch_size=s.batch_size, max_length=s.max_length)
            out = evaluate(lm=lm, task_dict=self.loaded, limit=s.limit, bootstrap_iters=0, log_samples=True,
                           apply_chat_template=s.apply_chat_template, verbosity="ERROR")
        finally:
            quiet.setLevel(level)
            model.train(was_training)
        scores, items, metric = {}, {}, {}
        for task in s.tasks:
            res = out["results"][task]
            key = s.metrics.get(task) or next((k for k in METRIC_ORDER if k in res), None) or next(
                (k for k, v in res.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))), None)
            if key is None or key not in res:
                raise ValueError(f"harness task {task} reports no metric {key or ''} (it reports: "
                                 f"{', '.join(k for k in res if ',' in k)})")
            name = PREFIX + task
            scores[name], metric[name] = float(res[key]), key
            items[name] = _documents(out, task)
        return HarnessPoint(scores, items, metric, out.get("samples", {}))


def _documents(out: dict, task: str) -> int:
    """Documents the harness scored for ``task``: its own count, or the sum over its group's leaf tasks
    (MMLU: groups of groups)."""
    n = out.get("n-samples", {}).get(task)
    if n:
        return int(n.get("effective", 0))
    return sum(_documents(out, sub) for sub in out.get("group_subtasks", {}).get(task, []))


@functools.cache
def _quiet(hflm):
    """The harness's HF wrapper without its per-request progress bars (one set per point would bury the
    run's own progress lines)."""
    class QuietHFLM(hflm):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM
