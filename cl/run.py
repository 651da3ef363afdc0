"""Entry point: ``python -m cl.run [overrides]`` runs one continual post-training experiment.

cfg -> validate -> build tasks -> ensure base checkpoint -> load model -> ContinualLM
    -> run_stream (task loop, continual evaluation) -> results.json, curves.jsonl, summary table

Hydra's ``instantiate`` is called only here, and only on ``_target_``s inside the allowlisted packages.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from analysis import plots
from analysis.curve_metrics import curve_metrics
from analysis.metrics import general_retention, matrix_metrics
from cl.adapters import AdapterError, make_adapter, save_adapted
from cl.base_stage import BaseRecipe, base_health, base_key, ensure_base
from cl.checkpoint import CKPT_DIR, Checkpointer, CheckpointError, RunLock, latest_common, not_resumable, run_key
from cl.continual_eval import ContinualEvaluator
from cl import components as methods
from cl.core.components import Component
from cl.core.data import PromptFormat, SFTCollator, TaskExamples
from cl.dist import ShardBatches, global_rank, stream_device, world_size
from cl.fsdp import Sharding, is_fsdp
from cl.evaluation import EvalSet, Scorer
from cl.loop import StreamResult, run_stream
from cl.model import ModelLoadError, build_tiny, count_parameters, load_model_and_tokenizer
from cl.module import ContinualLM
from cl.runlog import RunLog
from cl.results import (fingerprint_diff, format_matrix, format_metrics, input_fingerprint, provenance,
                        write_json_atomic)
from cl.schedule import TrainSettings
from cl.tracking import make_logger
from cl.validate import ConfigError, is_vision_model, validate_config
from cl.tokenizer import build_char_tokenizer
from cl.vision import is_vision_config, make_format
from tasks.base import Task, VerifierError
from tasks.stream import build_tasks, joint_task
from tasks.user_data import DataError, check_encodable

log = logging.getLogger("cl")
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")  # train.nonfinite=skip
transformers.utils.logging.disable_progress_bar()
for noisy in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
              "pytorch_lightning.accelerators.cuda", "lightning_fabric.utilities.seed"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def task_loader(fmt: PromptFormat, batch_size: int, steps: int, seed: int, collate_fn=None, replay=None,
            rank: int = 0, world: int = 1):
    """``(task, t) -> DataLoader`` of exactly ``steps`` batches sampled with replacement, seeded per task.

    ``collate_fn`` comes from the objective (padded sequences for SFT, prompts + rows for RL). With an
    active ``replay`` (a component's ``batch_mixer()``, e.g. ``replay.mixing.ExperienceReplay``), each batch mixes buffered rows of earlier tasks
    into the current task's at the replay fraction; otherwise the sampler is the plain one. Under a
    distributed strategy (``world > 1``) every rank draws the same global batches and keeps rows
    ``rank::world`` of each (``cl.dist``)."""
    collate_fn = collate_fn or SFTCollator(fmt.pad_id)

    def make(task: Task, t: int) -> DataLoader:
        rows = task.train.to_list()
        mixed = replay is not None and replay.active()
        # the loader's own generator: creating its iterator must not draw from the global RNG (which GRPO
        # sampling uses), so a task resumed mid-way sees the same random stream as an uninterrupted one
        own = torch.Generator().manual_seed(seed * 1000 + t + 500)
        items = rows + replay.rows() if mixed else rows
        examples = TaskExamples(fmt.encode([r["prompt"] for r in items], [r["answer"] for r in items]), items)
        if mixed:
            batches = replay.sampler(len(rows), steps, batch_size, t, seed * 1000 + t)
        else:
            gen = torch.Generator().manual_seed(seed * 1000 + t)
            sampler = RandomSampler(examples, replacement=True, num_samples=steps * batch_size, generator=gen)
            if world == 1:
                return DataLoader(examples, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, generator=own)
            batches = BatchSampler(sampler, batch_size, drop_last=False)
        if world > 1:
            batches = ShardBatches(batches, rank, world)
        return DataLoader(examples, batch_sampler=batches, collate_fn=collate_fn, generator=own)

    return make


def prepare_model(cfg: DictConfig, run_dir: Path, tasks: dict[str, Task]):
    """Return ``(model, tokenizer, base_info)`` for the configured model and base stage."""
    m, b = cfg.model, cfg.base
    info: dict = {}
    if b.kind == "pretrain":
        recipe = BaseRecipe(**{k: v for k, v in OmegaConf.to_container(b, resolve=True).items() if k != "kind"})
        data = OmegaConf.to_container(cfg.data, resolve=True)
        arch = OmegaConf.to_container(m.arch, resolve=True)
        single = {**OmegaConf.to_container(cfg.trainer, resolve=True), "devices": 1, "num_nodes": 1, "strategy": "auto"}
        path = ensure_base(cfg.cache_dir, arch, recipe, data, tasks, single)  # one process: it is cached once
        info = _base_info(path, recipe)
    elif m.name_or_path:
        path = m.name_or_path
    else:
        path = build_tiny(run_dir / "init_model", seed=cfg.seed, **OmegaConf.to_container(m.arch))
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=m.trust_remote_code, dtype=m.dtype)
    model.train()
    info = {"path": str(path), **info, "parameters": count_parameters(model)}
    return model, tokenizer, info


def _base_info(path: Path, recipe: BaseRecipe) -> dict:
    """The base stage's report, its weights' hash and its health (targets met or not; warned on the console)."""
    import hashlib
    import json

    report = json.loads((Path(path) / "base_report.json").read_text())
    health = base_health(report, recipe)
    for problem in health["problems"]:
        print(f"warning: unhealthy base model: {problem} (results.json base_model.health; "
              f"python scripts/check_base.py tells whether the recipe has margin on this machine)", flush=True)
    weights = Path(path) / "model.safetensors"
    k = f"pass@{recipe.report_pass_k}"
    return {"health": health, "greedy": report.get("greedy"), k: report.get(k), "steps": report.get("steps"),
            "stopped_by": report.get("stopped_by"),
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else None}


def base_id(resolved: dict) -> str | None:
    """The base model as the fingerprint names it: the base stage's cache key, a local directory's content
    summary, or the hub id."""
    import hashlib

    b, m = resolved.get("base") or {}, resolved.get("model") or {}
    if b.get("kind") == "pretrain":
        try:
            recipe = BaseRecipe(**{k: v for k, v in b.items() if k != "kind"})
            return "base-" + base_key(m.get("arch"), recipe, resolved.get("data"))
        except (TypeError, ValueError):
            return None  # an invalid recipe: validation reports it
    path = m.get("name_or_path")
    if not path:
        return None  # a random initialisation: the config determines it
    d = Path(str(path)).expanduser()
    if not d.is_dir():
        return str(path)  # a hub id (the hub's revision is part of the config when pinned)
    h = hashlib.sha256()
    files = (x for x in d.rglob("*") if x.is_file() and not any(p.startswith(".") for p in x.relative_to(d).parts))
    for f in sorted(files):
        size = f.stat().st_size
        h.update(f"{f.relative_to(d)}:{size}".encode())
        with open(f, "rb") as fh:  # whole small files; the first and last MiB of large ones (weights)
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return f"dir:{h.hexdigest()[:16]}"  # the content, wherever the directory is


class RunMismatchError(CheckpointError):
    """A rerun into a directory that holds a run made from other inputs."""


def check_inputs(cfg: DictConfig, run_dir: Path) -> dict:
    """The run's input fingerprint (``results.json["provenance"]["fingerprint"]``); raises
    :class:`RunMismatchError` when ``run_dir`` holds a completed or interrupted run made from other inputs
    (with ``resume=auto``), before anything in ``run_dir`` is touched."""
    import json

    resolved = OmegaConf.to_container(cfg, resolve=True)
    fp = input_fingerprint(resolved, base_id(resolved))
    if cfg.resume != "auto":
        return fp
    try:
        old = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return fp
    status = str(old.get("status", ""))
    state = ("completed" if status == "completed" else
             "interrupted" if status == "running" or (Path(run_dir) / CKPT_DIR).is_dir() else None)
    old_fp = (old.get("provenance") or {}).get("fingerprint")
    if state is None or not old_fp:
        return fp
    diff = fingerprint_diff(old_fp, old.get("config") or {}, fp, resolved)
    if diff:
        raise RunMismatchError(
            f"{run_dir} holds {'a completed' if state == 'completed' else 'an interrupted'} run made from other inputs: {'; '.join(diff)}. Nothing was changed; "
            "rerun with resume=never to replace it, or give this command another hydra.run.dir")
    return fp


def jobs_at_once(n_jobs: int, cores: int | None = None) -> int:
    """Jobs a parallel launcher runs at once for ``hydra.launcher.n_jobs``, by joblib's rule: a count >= 1 as
    given; negative, ``cores + 1 + n_jobs`` (-1: one per core), at least 1. 0 is refused."""
    if n_jobs == 0:
        raise ValueError("hydra.launcher.n_jobs: 0 runs nothing; give a count >= 1, or -1 for one job per core")
    cores = cores or os.cpu_count() or 1
    return n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)


def set_threads(threads: int | None, hydra_cfg=None) -> int:
    """Set this process's torch compute threads: ``threads``, or, when null, the machine's cores shared
    evenly among the jobs a parallel launcher runs at once (``hydra/launcher=cl_parallel``: cores //
    n_jobs; ``hydra/launcher=cl_ray``: the CPUs each Ray task holds), else torch's default (all cores).
    Jobs x threads <= cores keeps parallel jobs from fighting over cores, which slows each of them far
    more than the shared load explains. Returns the count."""
    if threads is None:
        n_jobs = None
        try:
            launcher = (hydra_cfg or HydraConfig.get()).launcher
            n_jobs = launcher.get("n_jobs")
            cpus = (launcher.get("ray") or {}).get("remote", {}).get("num_cpus")
            threads = max(1, int(cpus)) if cpus else None  # a fractional CPU share: one thread
        except (ValueError, AttributeError):  # no Hydra context (tests, scripts)
            pass
        if isinstance(n_jobs, int) and n_jobs != 0 and jobs_at_once(n_jobs) > 1:
            threads = max(1, (os.cpu_count() or 1) // jobs_at_once(n_jobs))
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def run(cfg: DictConfig, run_dir: Path, hydra_cfg=None) -> dict:
    """Run one experiment in ``run_dir`` holding its lock (see ``_run``). Under a distributed strategy the
    other ranks run the same experiment in ``run_dir/.rank<r>`` without W&B (``cl.dist``).

    A directory holding a run made from other inputs is refused before anything in it changes
    (:func:`check_inputs`); a completed run with the same inputs is returned as it is (``resume=auto``).
    Otherwise ``.hydra/`` is written (``hydra_cfg``: the job's Hydra config) and everything the run prints
    goes to ``run_dir/run.log`` as well."""
    set_threads(cfg.threads, hydra_cfg)
    rank = global_rank(OmegaConf.to_container(cfg.trainer, resolve=True))
    if rank > 0:
        run_dir = run_dir / f".rank{rank}"
        cfg = cfg.copy()
        cfg.logger.kind = "none"
        run_dir.mkdir(parents=True, exist_ok=True)
        sys.stdout = open(run_dir / "stdout.log", "a", buffering=1)  # one console: rank 0's
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):  # its lock file goes with it: a refused rerun leaves the directory as it was
        fingerprint = check_inputs(cfg, run_dir)
        results_path = run_dir / "results.json"
        if cfg.resume == "auto" and (done := _completed(results_path)) is not None:
            print(f"[run] already completed: {results_path} (resume=never runs it again)", flush=True)
            return done
        if hydra_cfg is not None and rank == 0:
            save_hydra_files(cfg, hydra_cfg, run_dir)
        with RunLog(run_dir / "run.log"):
            return _run(cfg, run_dir, fingerprint)


def _run(cfg: DictConfig, run_dir: Path, fingerprint: dict | None = None) -> dict:
    """Run one experiment in ``run_dir``; returns the results dict (also written to results.json).

    With ``resume=auto`` (the default) a completed run in ``run_dir`` is not repeated (its results are
    returned) and an interrupted one continues from its last checkpoint; ``resume=never`` starts over."""
    start = time.time()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path, curves_path = run_dir / "results.json", run_dir / "curves.jsonl"
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    rank, world = global_rank(tcfg), world_size(tcfg)
    mode = cfg.resume
    # the newest checkpoint position every rank has (one process: its newest checkpoint)
    ckpt = latest_common(run_dir, rank, world) if mode == "auto" else None
    if ckpt is None:
        shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
        curves_path.unlink(missing_ok=True)
    results: dict = {"status": "running", "config": resolved, "provenance": provenance(cfg.seed, start, None, fingerprint)}
    partial: dict = {}  # matrices so far: a failed run still reports the tasks it finished
    try:  # bad config or data: a failed results.json (a sweep marks the point) and nothing else
        validate_config(resolved)
        d = cfg.data
        stream = build_tasks(list(cfg.stream.tasks), d.n_train, d.n_eval, d.seed)
        general = build_tasks(list(cfg.stream.general), d.n_train, d.n_eval, d.seed)
        by_name = {t.name: t for t in stream + general}
        if cfg.base.kind == "pretrain":
            extra = [n for n in list(cfg.base.general) + list(cfg.base.exposure) if n not in by_name]
            by_name.update({t.name: t for t in build_tasks(extra, d.n_train, d.n_eval, d.seed)})
            # the embedded model's tokenizer is known before its base stage: refuse unreadable user rows now
            # (the vision model's prompts go through its processor: checked once it is built)
            fmt = PromptFormat(build_char_tokenizer(), cfg.model.use_chat_template, cfg.model.get("system_prompt"))
            for task in stream + general if "image_size" not in cfg.model.arch else []:
                check_encodable(task, fmt, cfg.model.arch.max_position_embeddings)
    except (ConfigError, DataError) as e:
        results.update(status=f"failed: {type(e).__name__}: {e}".splitlines()[0],
                       provenance=provenance(cfg.seed, start, time.time(), fingerprint))
        write_json_atomic(results_path, results)
        raise

    if ckpt is None or not results_path.exists():  # a resumed run keeps the partial results it had
        write_json_atomic(results_path, results)  # status running: a sweep can tell this job apart
    logger = None
    try:
        model, tokenizer, base_info = prepare_model(cfg, run_dir, by_name)
        # W&B starts after the (cached) base stage so its service does not compete with pretraining.
        logger = make_logger(cfg.logger.kind, str(run_dir), project=cfg.logger.get("project"),
                             mode=cfg.logger.get("mode"), name=run_dir.name,
                             group=cfg.logger.get("group"), tags=cfg.logger.get("tags"), config=resolved,
                             job_type=cfg.logger.get("job_type"),
                             run_id=wandb_run_id(run_dir, resuming=ckpt is not None) if cfg.logger.kind == "wandb" else None)
        results["base_model"] = base_info
        pl.seed_everything(cfg.seed, verbose=False)
        if is_vision_config(model.config) and not is_vision_model(resolved):
            raise ConfigError([f"model: {base_info['path']} is a vision-language checkpoint; set model.modality=vision "
                               "(what such a model cannot do here is then refused)"])
        fmt = make_format(model, tokenizer, cfg.model.use_chat_template, cfg.model.get("system_prompt"),
                          path=base_info["path"], trust_remote_code=cfg.model.trust_remote_code)
        for task in stream + general:  # user rows the model cannot read as written: refused before training
            check_encodable(task, fmt, getattr(model.config.get_text_config(), "max_position_embeddings", None))
        objective = instantiate(cfg.objective)
        scorer = Scorer(fmt, cfg.eval.method, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                        engine=eval_engine(cfg.eval.backend, objective))
        evaluator = ContinualEvaluator(
            scorer,
            [EvalSet.build(t, fmt, cfg.eval.n_per_task, cfg.eval.subset_seed) for t in stream],
            [EvalSet.build(t, fmt, cfg.eval.n_per_task, cfg.eval.subset_seed) for t in general],
            curves_path, log=logger.log if logger else None,
            max_samples_per_point=cfg.eval.max_samples_per_point,
            max_samples_per_boundary=cfg.eval.max_samples_per_boundary,
            autocast=torch.bfloat16 if str(cfg.trainer.precision).startswith("bf16") else None,
            harness=make_harness(cfg.general_eval, fmt),
        )
        adapter = make_adapter(OmegaConf.to_container(cfg.adapter, resolve=True) if cfg.get("adapter") else {},
                               seed=cfg.seed, evaluator=evaluator)
        if hasattr(objective, "bind"):  # RL objectives score rollouts with the tasks' verifiers
            objective.bind(fmt, {t.name: t for t in stream})
        components = [adapter] + build_components(cfg, fmt, evaluator, objective, logger, general)
        for c in components:  # the adapter wraps the model here (cl.core.components: the hooks' order)
            model = c.setup(model)
        device = stream_device(tcfg)
        model.to(device)
        train = TrainSettings(**OmegaConf.to_container(cfg.train, resolve=True))
        module = ContinualLM(
            model, objective, instantiate(cfg.optimizer), train.schedule(),
            reset_optimizer_per_task=train.reset_optimizer_per_task,
            loss_components=components, compile_train=train.compile,
        )
        module.nonfinite = train.nonfinite
        if is_fsdp(tcfg):  # each fit trains a sharded copy; the whole model between fits (cl.fsdp)
            module.sharding = Sharding()
        replay = next((m for c in components if (m := c.batch_mixer()) is not None), None)
        phases = stream if cfg.stream.mode == "sequential" else [joint_task(stream)] * len(stream)
        ck = cfg.checkpoint
        fixed = not_resumable(components)
        if ck.enabled and fixed:
            log.warning("checkpoints off: %s change(s) the model's structure per task and cannot be restored; "
                        "an interrupted run starts over", ", ".join(fixed))
        checkpointer = Checkpointer(run_dir, module, components, evaluator, resolved, ck.every_n_steps,
                                    keep_prev=world > 1, write_weights=rank == 0, world=world,
                                    shared_dir=run_dir if rank == 0 else run_dir.parent) if ck.enabled and not fixed else None
        resume = None
        if ckpt is not None and checkpointer is not None:
            resume = checkpointer.load(ckpt)
            done_rows = resume["result"]["acc_matrix"]
            if done_rows:
                partial.update(_matrices(StreamResult(**resume["result"])), completed_tasks=len(done_rows))
            where = f"task {resume['task_idx'] + 1} step {resume['step_in_task']}"
            print(f"[resume] {ckpt}: continuing at {where} (global_iter {resume['global_iter']})", flush=True)
        print(f"[run] {cfg.stream.mode} stream: {' -> '.join(t.name for t in stream)} | objective "
              f"{module.objective.name} | lr {cfg.optimizer.lr} | {cfg.stream.steps_per_task} steps x "
              f"{cfg.stream.batch_size} per task | {base_info['parameters'] / 1e6:.2f}M params | {run_dir}",
              flush=True)

        def partial_results(t: int, res: StreamResult) -> None:
            partial.update(_matrices(res), completed_tasks=t + 1)
            write_json_atomic(results_path, {**results, **partial})

        res = run_stream(
            module, stream, phases,
            task_loader(fmt, cfg.stream.batch_size, cfg.stream.steps_per_task, cfg.seed, objective.collate_fn(fmt.pad_id),
                    replay, rank=rank, world=world),
            evaluator, tcfg, cfg.stream.steps_per_task,
            eval_every_n_steps=cfg.eval.every_n_steps, logger=logger, components=components,
            on_task_end=partial_results, checkpointer=checkpointer, resume=resume,
            on_task_seed=(lambda t: torch.manual_seed(cfg.seed * 100_003 + t)) if world > 1 else None,
            device=device,
        )
        end = time.time()
        if cfg.save_final_model:
            save_adapted(module.model, run_dir / "final_model", tokenizer)  # base + adapters, safetensors
        curves = _read_curves(curves_path)
        metrics = collect_metrics(res, curves, evaluator, components, results, tuple(cfg.eval.windows))
        metrics["compute"] = {
            "optimizer_steps": module.global_iter,
            "examples_seen": module.global_iter * cfg.stream.batch_size,
            "tokens_generated": getattr(objective, "tokens_generated", 0),
            "trainable_parameters_per_task": module.trainable_per_task,
            "train_steps_per_second": module.global_iter / max(1e-9, res.train_seconds),
            "skipped_nonfinite_steps": module.skipped_steps,
        }
        if hasattr(objective, "completion_len_by_task"):  # RL runs: rollouts' mean completion length (tokens)
            by_task = metrics["compute"]["completion_len_by_task"] = objective.completion_len_by_task()
            if by_task:
                metrics["completion_len"] = sum(by_task.values()) / len(by_task)
        if checkpointer is not None:
            metrics["compute"]["checkpoint_seconds"] = checkpointer.seconds
        if resume is not None:
            results["resumed_from"] = {"task_idx": resume["task_idx"], "step_in_task": resume["step_in_task"]}
        results.update(_matrices(res), metrics=metrics, status="completed",
                       provenance=provenance(cfg.seed, start, end, fingerprint))
        write_json_atomic(results_path, results)
        if not ck.keep_after_completion:
            shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
        pictures = _plots(run_dir, res, curves)
        if logger is not None:
            logger.log_images(pictures)
            logger.log_table("acc_matrix", ["after"] + res.tasks,
                             [[f"{i + 1}:{n}"] + row for i, (n, row) in enumerate(zip(res.tasks, res.acc_matrix))])
            logger.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    except BaseException as e:
        results.update(partial, status=f"failed: {type(e).__name__}: {e}".splitlines()[0],
                       provenance=provenance(cfg.seed, start, time.time(), fingerprint))
        write_json_atomic(results_path, results)
        raise
    finally:
        if logger is not None:
            logger.finish(exit_code=0 if results["status"] == "completed" else 1)
    print_summary(results, run_dir)
    return results


def _completed(results_path: Path) -> dict | None:
    import json

    try:
        res = json.loads(results_path.read_text())
    except (OSError, ValueError):
        return None
    return res if res.get("status") == "completed" else None


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of ``run_dir``: kept in ``run_dir/wandb_id`` so a resumed run continues the same W&B run."""
    import secrets

    path = run_dir / "wandb_id"
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def eval_engine(backend: str, objective):
    """The vLLM engine of ``eval.backend=vllm``: the GRPO rollouts' own when they use vLLM (one engine, one
    copy of the weights on the GPU), else a new one with default settings; None for ``hf``."""
    if backend != "vllm":
        return None
    from cl.rollouts import VLLMRollouts

    own = getattr(objective, "rollouts", None)
    return own if isinstance(own, VLLMRollouts) else VLLMRollouts()


def make_harness(node: DictConfig, fmt: PromptFormat):
    """The harness tasks of ``general_eval=lm_eval`` (lm-evaluation-harness) or ``general_eval=lmms_eval``
    (lmms-eval, vision-language models); None for ``toy`` (the probes only)."""
    if node.kind == "toy":
        return None
    from cl.harness import HarnessSettings, LmEvalGeneral, LmmsEvalGeneral, LmmsSettings

    settings = OmegaConf.to_container(node, resolve=True)
    try:
        if node.kind == "lmms_eval":
            return LmmsEvalGeneral(LmmsSettings(**settings), fmt)
        return LmEvalGeneral(HarnessSettings(**settings), fmt.tokenizer)
    except ValueError as e:
        raise ConfigError(f"general_eval: {e}") from None


def build_components(cfg: DictConfig, fmt: PromptFormat, evaluator: ContinualEvaluator, objective, logger,
                     general: list[Task] = ()) -> list:
    """The stream components in the order their hooks run: the objective's (GRPO's reference snapshot), then
    the configured ones (``cl.components``: averaging, replay, regularizer, meta, shift and rif groups)."""
    log = logger.log if logger else None
    components = []
    if isinstance(objective, Component):  # e.g. GRPO's reference snapshot at every task start
        components.append(objective)
    context = {"fmt": fmt, "evaluator": evaluator, "seed": cfg.seed, "log": log, "general": list(general),
               "stream_batch_size": cfg.stream.batch_size, "data_seed": cfg.data.seed, "objective": objective,
               "steps_per_task": cfg.stream.steps_per_task}
    try:
        components += methods.build(cfg, context)
    except ValueError as e:
        raise ConfigError([str(e)]) from e
    return components


def collect_metrics(res: StreamResult, curves: list[dict], evaluator: ContinualEvaluator, components: list,
                    results: dict, windows: tuple[int, ...]) -> dict:
    """Matrix and curve metrics, the components' records (into ``results``) and the evaluation cost."""
    metrics = matrix_metrics(res.acc_matrix, res.base_acc, res.general_matrix, res.general_base)
    metrics.update(curve_metrics(curves, res.tasks, res.task_end_iters, windows))
    replayed = {name for c in components for name in c.replays_general}
    if replayed and res.general_matrix:  # retention where no component trained on the probe's distribution
        keep = [g for g, name in enumerate(res.general_tasks) if name not in replayed]
        metrics["general_retention_unreplayed"] = general_retention(
            [[row[g] for g in keep] for row in res.general_matrix], [res.general_base[g] for g in keep]) \
            if keep else float("nan")
    eval_s = evaluator.seconds
    for c in components:  # every component's record under its key, its metrics, its evaluation work
        if c.key is not None and (rec := c.record()) is not None:
            results[c.key] = rec
        metrics.update(c.metrics())
        eval_s += c.eval_seconds
    metrics["eval_seconds"] = eval_s
    metrics["train_seconds"] = res.train_seconds
    metrics["eval_time_fraction"] = eval_s / max(1e-9, eval_s + res.train_seconds)
    metrics["eval_points"] = evaluator.points
    return metrics


def print_summary(results: dict, run_dir: Path) -> None:
    """The accuracy matrix and the summary metrics, readable in a terminal."""
    m = results["metrics"]
    print("\nAccuracy matrix (rows: after training task i; right of '|': general tasks)")
    print(format_matrix(results["tasks"], results["acc_matrix"], results["base_acc"], results["general_tasks"],
                        results["general_matrix"], results["general_base"]))
    print("\n" + format_metrics(m))
    health = (results.get("base_model") or {}).get("health")
    if health and not health["ok"]:
        print("WARNING: these results come from an unhealthy base model: " + "; ".join(health["problems"]))
    print(f"\nresults: {run_dir / 'results.json'}\ncurves:  {run_dir / 'curves.jsonl'}\nplots:   {run_dir / 'plots'}"
          f"\nwall time {results['provenance']['wall_seconds']:.0f} s (evaluation {m['eval_time_fraction']:.0%} "
          f"of train+eval)")


def _matrices(res: StreamResult) -> dict:
    return {"tasks": res.tasks, "general_tasks": res.general_tasks, "acc_matrix": res.acc_matrix,
            "base_acc": res.base_acc, "general_matrix": res.general_matrix, "general_base": res.general_base,
            "task_end_iters": res.task_end_iters}


def _plots(run_dir: Path, res: StreamResult, curves: list[dict]) -> dict[str, Path]:
    """Curves, matrix heatmap and stability-gap zoom as PNGs under ``run_dir/plots``."""
    out = run_dir / "plots"
    pics = {
        "plots/curves": plots.plot_curves(curves, res.tasks, res.task_end_iters, out / "curves.png"),
        "plots/acc_matrix": plots.plot_matrix(res.acc_matrix, res.tasks, out / "acc_matrix.png",
                                              res.general_matrix, res.general_tasks),
    }
    gap = plots.plot_stability_gap(curves, res.tasks, res.task_end_iters, out / "stability_gap.png")
    if gap is not None:
        pics["plots/stability_gap"] = gap
    return pics


def _read_curves(path: Path) -> list[dict]:
    import json

    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def save_hydra_files(cfg: DictConfig, hc, run_dir: Path) -> None:
    """``RUN_DIR/.hydra/{config,hydra,overrides}.yaml``, as Hydra writes them, but only once the run is
    known to belong in ``run_dir`` (``hydra.output_subdir`` is null so that Hydra does not write them first)."""
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), out / "overrides.yaml")


def data_source(data_dir: str | None, relative: str, hub: str | None = None) -> str:
    """``${cl_data:DIR,REL,HUB}`` in stream presets: ``DIR/REL`` when a local copy's directory is set, else the
    hub dataset ``HUB`` (a preset without one names a local default directory instead)."""
    if data_dir:
        return str(Path(data_dir) / relative)
    if hub is None:
        raise ValueError(f"no local directory for {relative}: set stream.data_dir")
    return hub


OmegaConf.register_new_resolver("cl_key", run_key, replace=True)  # hydra.run.dir / hydra.sweep.subdir
OmegaConf.register_new_resolver("cl_data", data_source, replace=True)  # stream presets: local copy or hub
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # absolute: works for `cl-run` as well
# conf/<group>/<method>.yaml take their types and defaults from the classes; so do method files in the
# directories a command line adds with hydra.searchpath
methods.register_schemas(CONF_DIR, *methods.searchpath_dirs(sys.argv[1:]))


def compose_config(*overrides: str) -> DictConfig:
    """The composed config tree with overrides, outside a Hydra job (scripts, tests, notebooks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        results = run(cfg, run_dir, hc)
    except (ConfigError, DataError, ModelLoadError, AdapterError, CheckpointError, VerifierError) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        if multirun and isinstance(e, RunMismatchError):  # nothing was written: the summary names the job
            return f"refused: {e}"
        if multirun:  # recorded in results.json; the sweep goes on and its summary names this job
            return None
        sys.exit(2)
    except Exception:
        if multirun:  # a crash of one job (e.g. a non-finite loss) must not lose the sweep's other jobs
            log.exception("job %s (%s) failed", HydraConfig.get().job.num, run_dir)
            return None
        raise
    return results["metrics"]["avg_acc"]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
