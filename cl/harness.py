"""General capability through lm-evaluation-harness (text) or lmms-eval (vision-language), scored on the
model in memory.

``general_eval=lm_eval`` adds harness tasks (MMLU, ARC, HellaSwag, GSM8K, or custom task YAMLs in
``include_path``) to the general suite: at every task boundary (and, with ``inner_points``, at the inner
evaluation points too) the harness scores the model being trained through its Hugging Face wrapper
(``HFLM(pretrained=<model object>)``), without saving and reloading weights. Each task's score becomes a
column ``lm_eval:<task>`` of the general matrix, next to the toy probes of ``stream.general``, and feeds
the curves, the logger, the plots and general retention like them.

``general_eval=lmms_eval`` does the same for a vision-language model with lmms-eval's tasks (MMMU,
ScienceQA-IMG, ..., or custom task YAMLs): columns ``lmms_eval:<task>``, the model answering through the
run's own prompt format and greedy decoding (:class:`LmmsEvalGeneral`).

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
        return _point(out, s.tasks, s.metrics, PREFIX)


def _point(out: dict, tasks: list[str], metrics: dict[str, str], prefix: str) -> HarnessPoint:
    """A harness's ``evaluate`` output as a :class:`HarnessPoint`: per task the metric ``metrics`` names, else
    the first of :data:`METRIC_ORDER` it reports, else its first numeric metric (lm-evaluation-harness and
    lmms-eval report results the same way)."""
    scores, items, metric = {}, {}, {}
    for task in tasks:
        res = out["results"][task]
        key = metrics.get(task) or next((k for k in METRIC_ORDER if k in res), None) or next(
            (k for k, v in res.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))), None)
        if key is None or key not in res:
            raise ValueError(f"harness task {task} reports no metric {key or ''} (it reports: "
                             f"{', '.join(k for k in res if ',' in k)})")
        name = prefix + task
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


# --- lmms-eval: general multimodal capability (MMMU and the like) of a vision-language model ---

LMMS_PREFIX = "lmms_eval:"
LMMS_INSTALL = "pip install --no-deps lmms-eval==0.7.3 loguru==0.7.3 tenacity==9.2.1"


@dataclass
class LmmsSettings:
    """``general_eval.*`` with ``general_eval=lmms_eval`` (conf/general_eval/lmms_eval.yaml).

    Attributes:
        kind: ``lmms_eval``.
        tasks: lmms-eval task or group names (``mmmu_val``, ``scienceqa_img``, ...; a group scores as its
            ``aggregate_metric_list``; groups without one and tags are refused).
        limit: documents per task at every point (the first ``limit`` of its evaluation split; None: all).
        batch_size: prompts per generation batch.
        include_path: a directory of custom task YAMLs (e.g. local image-question files).
        metrics: task -> metric key (e.g. ``mmmu_val: mmmu_acc,none``); others take the first of
            :data:`METRIC_ORDER` the task reports, else its first numeric metric.
        inner_points: also score at inner evaluation points (default: boundaries only).
    """

    kind: str = "lmms_eval"
    tasks: list[str] = field(default_factory=lambda: ["mmmu_val"])
    limit: int | None = 100
    batch_size: int = 8
    include_path: str | None = None
    metrics: dict[str, str] = field(default_factory=dict)
    inner_points: bool = False


class LmmsEvalGeneral:
    """lmms-eval tasks loaded once; :meth:`evaluate` scores the vision-language model in memory on them.

    The model answers through the run's own prompt format (:class:`cl.vision.VisionFormat`: the same chat
    template and image layout as the stream's tasks, images leading the user turn) and its own greedy
    decoding; each task's own answer extraction and metric score the answers. Requests are answered as
    lmms-eval's simple models answer them: ``generate_until`` greedily up to the task's ``max_new_tokens``
    (default 32) and cut at its ``until`` strings (sampling settings of a task are not applied: every point
    is scored greedily, so points compare); ``loglikelihood`` (multiple-choice tasks) as lmms-eval's HF models
    answer it: the mean negative log-likelihood per continuation token after the context and images (the
    task picks the choice with the smallest), with whether every token was the argmax.

    Args:
        settings: :class:`LmmsSettings`.
        fmt: the run's :class:`cl.vision.VisionFormat`.
    """

    def __init__(self, settings: LmmsSettings, fmt):
        try:
            from lmms_eval.tasks import TaskManager
        except ImportError:
            raise ValueError(f"general_eval=lmms_eval needs lmms-eval: {LMMS_INSTALL}") from None
        if not hasattr(fmt, "processor"):
            raise ValueError("general_eval=lmms_eval scores vision-language models; this run's model reads text "
                             "only (use general_eval=lm_eval)")
        if not settings.tasks:
            raise ValueError("general_eval.tasks is empty: name at least one lmms-eval task")
        self.settings, self.fmt = settings, fmt
        logging.getLogger("lmms-eval").setLevel(logging.WARNING)
        _quiet_loguru()
        # custom tasks alone skip indexing lmms-eval's ~2000 own tasks (several seconds)
        manager = TaskManager(verbosity="WARNING", include_path=settings.include_path,
                              include_defaults=settings.include_path is None)
        if any(t not in manager.all_tasks for t in settings.tasks) and settings.include_path is not None:
            manager = TaskManager(verbosity="WARNING", include_path=settings.include_path)
        unknown = [t for t in settings.tasks if t not in manager.all_tasks]
        if unknown:
            where = f" (or in {settings.include_path})" if settings.include_path else ""
            raise ValueError(f"general_eval.tasks: unknown lmms-eval task(s) {', '.join(unknown)}; "
                             f"see `lmms-eval --tasks list`{where}")
        tags = [t for t in settings.tasks if t in manager.all_tags]
        if tags:
            raise ValueError(f"general_eval.tasks: {', '.join(tags)} tag several tasks and report no score of their "
                             "own; name the tasks (or a group with an aggregate_metric_list)")
        self.loaded = manager.load_task_or_group(list(settings.tasks), "simple")
        for group in self.loaded:
            if not isinstance(group, str) and not group.config.get("aggregate_metric_list"):
                raise ValueError(f"general_eval.tasks: group {group.group_name} reports no aggregate score (no "
                                 "aggregate_metric_list); name its tasks")
        for name, task in _named_leaves(self.loaded):
            kind = task.get_config("output_type")
            if kind not in ("generate_until", "multiple_choice", "loglikelihood"):
                raise ValueError(f"lmms-eval task {name}: output_type {kind} is not supported here (single-turn "
                                 "generate_until, multiple_choice and loglikelihood tasks are)")
            if "acc_mutual_info" in getattr(task, "_metric_fn_list", {}):
                raise ValueError(f"lmms-eval task {name}: acc_mutual_info is not supported here")
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        self.names = [LMMS_PREFIX + t for t in settings.tasks]

    def evaluate(self, model: torch.nn.Module) -> HarnessPoint:
        """Score ``model`` (in memory, as it is now) on every task; restores its train/eval mode."""
        import random

        import numpy as np
        from lmms_eval.evaluator import evaluate

        s = self.settings
        was_training = model.training
        lm = _suite_lmms()(model, self.fmt, s.batch_size)
        for name, task in _named_leaves(self.loaded):
            lm.task_dict[name] = task.dataset
            task.set_fewshot_seed(seed=1234)  # the same few-shot examples at every point
        # answer parsers draw at random when they find no answer (MMMU's): the same draws at every point, in
        # document order (one worker), and the run's own random state left as it was
        states = random.getstate(), np.random.get_state()
        random.seed(0)
        np.random.seed(1234)
        try:
            out = evaluate(lm=lm, task_dict=self.loaded, limit=s.limit, bootstrap_iters=0, log_samples=True,
                           verbosity="ERROR", process_docs_parallel=1)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            model.train(was_training)
        return _point(out, s.tasks, s.metrics, LMMS_PREFIX)


def _named_leaves(task_dict: dict):
    """(name, task) of every leaf task of a (nested) task dict; groups map to dicts or (group, task) pairs."""
    for name, obj in task_dict.items():
        if isinstance(obj, dict):
            yield from _named_leaves(obj)
        elif isinstance(obj, tuple):
            if obj[1] is not None:
                yield name, obj[1]
        else:
            yield name, obj


def _quiet_loguru() -> None:
    """lmms-eval logs through loguru at INFO on every request batch; keep its warnings and errors only."""
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


@functools.cache
def _suite_lmms():
    """The lmms-eval model class over a model object and the run's vision format (built on first use: the
    package is optional)."""
    from lmms_eval.api.model import lmms

    from cl.core.data import collate_sft, model_inputs
    from cl.generation import eval_mode, generate_ids
    from cl.vision import store_image

    class SuiteLMMS(lmms):
        def __init__(self, model, fmt, batch_size: int):
            super().__init__()
            self.model, self.fmt, self.batch_size = model, fmt, batch_size
            self.accelerator = None  # one process: the evaluator need not build an Accelerator every point

        def _prompt(self, context: str, doc_to_visual, doc_id, task: str, split: str) -> str:
            """The suite's prompt string: one ``<image:REF>`` tag per image, then the context."""
            from PIL import Image

            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            visuals = [v for v in (visuals or []) if v is not None]
            if any(not isinstance(v, Image.Image) for v in visuals):
                kinds = sorted({type(v).__name__ for v in visuals if not isinstance(v, Image.Image)})
                raise ValueError(f"lmms-eval task {task}: only image inputs are supported here, got {', '.join(kinds)}")
            return "".join(store_image(v.convert("RGB")) for v in visuals) + context.replace("<image>", "")

        def generate_until(self, requests) -> list[str]:
            args = [r.args for r in requests]
            prompts = [self._prompt(a[0], a[2], a[3], a[4], a[5]) for a in args]
            budget = [int(a[1].get("max_new_tokens", 32)) for a in args]
            out: list[str] = [""] * len(args)
            for n in sorted(set(budget)):  # one generation call per token budget, in request order within it
                idx = [i for i, b in enumerate(budget) if b == n]
                ids = generate_ids(self.model, self.fmt.prompt_ids([prompts[i] for i in idx]), self.fmt,
                                   max_new_tokens=n, batch_size=self.batch_size)
                for i, x in zip(idx, ids):
                    out[i] = _cut(self.fmt.decode(x), args[i][1].get("until"))
            return out

        @torch.no_grad()
        def loglikelihood(self, requests) -> list:
            """Per request: (the mean negative log-likelihood per continuation token given the context and
            images, whether every continuation token was the argmax). The loss, not the log-likelihood:
            lmms-eval's models return it and its multiple-choice scoring takes the argmin."""
            pairs = []
            for r in requests:
                context, continuation, doc_to_visual, doc_id, task, split = r.args
                if callable(continuation):  # output_type loglikelihood passes the task's doc_to_target
                    continuation = continuation(self.task_dict[task][split][doc_id])
                prompt = self.fmt.prompt_ids([self._prompt(context, doc_to_visual, doc_id, task, split)])[0]
                cont = self.fmt.tokenizer(str(continuation), add_special_tokens=False)["input_ids"]
                pairs.append((prompt, cont))
            from lmms_eval.api.instance import GenerationResult

            out = []
            device = next(self.model.parameters()).device
            with eval_mode(self.model):
                for start in range(0, len(pairs), self.batch_size):
                    batch = collate_sft(pairs[start:start + self.batch_size], self.fmt.pad_id)
                    logits = self.model(**model_inputs(batch, device)).logits[:, :-1]
                    target = batch["labels"][:, 1:].to(device)
                    rows, cols = (target != -100).nonzero(as_tuple=True)
                    # the continuation's positions only: [B, L, vocab] in fp32 would not fit for long image prompts
                    picked = logits[rows, cols].float()
                    tok = target[rows, cols]
                    logp = torch.log_softmax(picked, -1).gather(-1, tok[:, None])[:, 0]
                    n = len(batch["labels"])
                    count = torch.zeros(n, device=device).index_add_(0, rows, torch.ones_like(logp))
                    nll = -torch.zeros(n, device=device).index_add_(0, rows, logp) / count.clamp(min=1)
                    wrong = torch.zeros(n, device=device).index_add_(0, rows, (picked.argmax(-1) != tok).float())
                    out += [(float(x), bool(w == 0)) for x, w in zip(nll.tolist(), wrong.tolist())]
            # lmms-eval 0.7.3's evaluator stores any answer that is neither a string nor a GenerationResult as
            # its str(), which breaks multiple-choice scoring; a GenerationResult's payload passes unchanged
            return [GenerationResult(text=x) for x in out]

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("general_eval=lmms_eval: multi-round tasks are not supported; choose "
                                      "single-turn tasks")

    return SuiteLMMS


def _cut(text: str, until) -> str:
    """``text`` up to the first of the stop strings ``until`` (a string or a list)."""
    for stop in [until] if isinstance(until, str) else (until or []):
        if stop:
            text = text.split(stop, 1)[0]
    return text
