"""Whole-config validation before any work: one line per problem, naming the field and allowed values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


from cl.core.checks import Checker, get as _get
from cl.core.components import Component
from cl.evaluation import METHODS
from cl.fsdp import is_fsdp
from cl.schedule import DECAYS
from cl.tracking import MODES
from tasks.registry import TASK_NAMES, build_task
from tasks.verifiers import VERIFIER_KINDS

ALLOWED_TARGET_PREFIXES = ("cl.", "tasks.", "replay.", "analysis.", "torch.optim.")
STREAM_MODES = ("sequential", "joint")
BASE_KINDS = ("pretrain", "none")
LOGGER_KINDS = ("wandb", "none")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Checker(Checker):
    def task_list(self, field: str, allow_user: bool) -> list[str]:
        v = _get(self.cfg, field)
        if not isinstance(v, Sequence) or isinstance(v, str):
            self.add(field, f"must be a list of task names, got {v!r}")
            return []
        names = []
        for i, item in enumerate(v):
            if isinstance(item, str):
                if item not in TASK_NAMES:
                    self.add(f"{field}[{i}]", f"unknown task '{item}'; allowed: {', '.join(TASK_NAMES)} "
                                              "or a mapping with name/train for user data")
                names.append(item)
            elif allow_user and isinstance(item, Mapping):
                if not item.get("name") or not item.get("train"):
                    self.add(f"{field}[{i}]", "a user-data task needs 'name' and 'train' (a file path or hub:NAME)")
                if item.get("verifier", "exact") not in VERIFIER_KINDS:
                    self.add(f"{field}[{i}].verifier",
                             f"'{item.get('verifier')}' is not one of {', '.join(VERIFIER_KINDS)}")
                names.append(str(item.get("name")))
            else:
                self.add(f"{field}[{i}]", f"must be a task name{' or a mapping' if allow_user else ''}, got {item!r}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            self.add(field, f"task names repeat: {', '.join(dup)}")
        return names


def _targets(cfg, prefix: str = ""):
    """Every ``_target_`` in the config (the ``hydra`` node is Hydra's own), as ``(dotted field, value)``."""
    if isinstance(cfg, Mapping):
        for k, v in cfg.items():
            if not prefix and k == "hydra":
                continue
            field = f"{prefix}{k}"
            if k == "_target_":
                yield field, v
            else:
                yield from _targets(v, field + ".")
    elif isinstance(cfg, Sequence) and not isinstance(cfg, str):
        for i, v in enumerate(cfg):
            yield from _targets(v, f"{prefix.rstrip('.')}[{i}].")


def validate_config(cfg: Mapping) -> None:
    """Raise :class:`ConfigError` listing every problem found in the composed config."""
    c = _Checker(cfg)
    c.integer("seed", minimum=0)
    c.integer("data.seed", minimum=0)
    c.integer("data.n_train", minimum=1)
    c.integer("data.n_eval", minimum=1)

    c.choice("stream.mode", STREAM_MODES)
    stream = c.task_list("stream.tasks", allow_user=True)
    if not stream and "stream.tasks" not in " ".join(c.problems):
        c.add("stream.tasks", "the stream is empty")
    general = c.task_list("stream.general", allow_user=False)
    overlap = sorted(set(stream) & set(general))
    if overlap:
        c.add("stream.general", f"general tasks must not also be stream tasks: {', '.join(overlap)}")
    c.integer("stream.steps_per_task", minimum=1)
    c.integer("stream.batch_size", minimum=1)

    c.number("optimizer.lr", lo=0.0, strict_lo=True)
    c.integer("train.warmup_steps", minimum=0)
    c.choice("train.decay", DECAYS)
    c.number("train.min_lr_ratio", lo=0.0, hi=1.0)
    if _get(cfg, "train.decay") == "infinite":
        c.number("train.const_ratio", lo=0.0, hi=1.0)
        c.integer("train.cooldown_steps", minimum=0)

    c.integer("threads", minimum=1, optional=True)
    c.choice("eval.method", METHODS)
    c.integer("eval.n_per_task", minimum=1)
    c.integer("eval.every_n_steps", minimum=1, optional=True)
    c.integer("eval.batch_size", minimum=1)
    c.integer("eval.max_samples_per_point", minimum=1, optional=True)
    c.integer("eval.max_samples_per_boundary", minimum=1, optional=True)
    windows = _get(cfg, "eval.windows")
    if not isinstance(windows, Sequence) or isinstance(windows, str) or \
            any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in windows):
        c.add("eval.windows", f"must be a list of positive integers (training iterations), got {windows!r}")

    c.choice("model.dtype", DTYPES)
    c.choice("base.kind", BASE_KINDS)
    if _get(cfg, "base.kind") == "pretrain":
        if _get(cfg, "model.name_or_path"):
            c.add("base.kind", "'pretrain' builds the embedded tiny model; with model.name_or_path set use base=none")
        c.integer("base.steps", minimum=1)
        c.integer("base.batch_size", minimum=1)
        c.number("base.lr", lo=0.0, strict_lo=True)
        for group in ("general", "exposure"):
            mix = _get(cfg, f"base.{group}") or {}
            for name, w in mix.items():
                if name not in TASK_NAMES:
                    c.add(f"base.{group}.{name}", f"unknown task; allowed: {', '.join(TASK_NAMES)}")
                if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
                    c.add(f"base.{group}.{name}", f"weight must be a positive number, got {w!r}")
        cover = _get(cfg, "base.cover")
        if cover is not None and (not isinstance(cover, Sequence) or isinstance(cover, str) or not cover
                                  or any(isinstance(d, bool) or d not in range(10) for d in cover)):
            c.add("base.cover", f"must be null or a non-empty list of digits 0-9, got {cover!r}")
        for name, level in (_get(cfg, "base.expected") or {}).items():
            if name not in (_get(cfg, "base.exposure") or {}):
                c.add(f"base.expected.{name}", "an expected level needs the task in base.exposure")
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= level <= 1.0:
                c.add(f"base.expected.{name}", f"must be a greedy accuracy in [0, 1], got {level!r}")
        from dataclasses import fields

        from cl.base_stage import BaseRecipe

        known = {f.name for f in fields(BaseRecipe)} | {"kind"}
        for key in _get(cfg, "base") or {}:
            if key not in known:
                c.add(f"base.{key}", f"unknown base-stage setting; known: {', '.join(sorted(known))}")
        c.integer("base.min_steps", minimum=0)
        c.integer("base.anneal_steps", minimum=0)
        c.integer("base.check_every", minimum=1)
        c.integer("base.general_check_every", minimum=1)
        c.integer("base.plateau_window", minimum=1)
        c.integer("base.val_n", minimum=1)
        for key in ("plateau_delta", "general_min", "general_health", "health_band", "min_lr_ratio"):
            c.number(f"base.{key}", lo=0.0, hi=1.0)
        c.number("base.general_floor", lo=0.0, hi=1.0, strict_lo=True)
        if _get(cfg, "base.cover_min") is not None:
            c.number("base.cover_min", lo=0.0, hi=1.0)
        steps, min_steps, anneal = _get(cfg, "base.steps"), _get(cfg, "base.min_steps"), _get(cfg, "base.anneal_steps")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in (steps, min_steps, anneal)) and steps >= 1 \
                and min_steps + anneal > steps:
            c.add("base.min_steps", f"min_steps + anneal_steps ({min_steps} + {anneal}) must be <= base.steps ({steps})")
        if cover is not None:
            for name in _get(cfg, "base.exposure") or {}:
                if name not in TASK_NAMES:
                    continue
                row = build_task(name, 4, 2, 0).train[0]
                if "key" not in row and row["prompt"].split(":", 1)[-1][:1] not in "0123456789":
                    c.add(f"base.exposure.{name}", "base.cover keeps rows by their first operand's leading digit "
                                                   "(or a visual task's key); this task's prompts have neither")
    elif not _get(cfg, "model.name_or_path") and not _get(cfg, "model.arch"):
        c.add("model", "base=none needs model.name_or_path (hub id or local directory) or model.arch")

    _validate_components(c, cfg)
    _validate_adapter(c, cfg)
    _validate_checkpoint(c, cfg)
    _validate_trainer(c, cfg)
    _validate_modality(c, cfg)
    c.choice("logger.kind", LOGGER_KINDS)
    if _get(cfg, "logger.kind") == "wandb":
        c.choice("logger.mode", MODES)

    target = _get(cfg, "objective._target_")
    if isinstance(target, str) and target.startswith(ALLOWED_TARGET_PREFIXES):
        from cl.components import locate

        try:
            cls = locate(target)
        except (ImportError, AttributeError) as e:
            c.add("objective._target_", f"cannot import '{target}': {e}")
        else:
            if hasattr(cls, "check_config"):  # the objective's own rules (e.g. GRPO's ranges and backends)
                cls.check_config(c, "objective")
    for field, target in _targets(cfg):  # everything instantiated must come from the allowlisted packages
        if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
            c.add(field, f"'{target}' is outside the allowed packages {', '.join(ALLOWED_TARGET_PREFIXES)}")
    for field in ("objective._target_", "optimizer._target_"):
        if _get(cfg, field) is None:
            c.add(field, "missing")
    if c.problems:
        raise ConfigError(c.problems)


def _validate_components(c: _Checker, cfg: Mapping) -> None:
    """Each configured method checks its own settings (``check_config``); refused under FSDP when it reads
    or writes parameters inside the training step (where FSDP holds only shards)."""
    from cl.components import GROUPS, configured, locate

    for group in GROUPS:  # every entry under a group is a method: a mapping with its _target_
        node = _get(cfg, group)
        if node is not None and not isinstance(node, Mapping):
            c.add(group, f"must be a method of conf/{group}/ (e.g. {group}=<name>), got {node!r}")
            continue
        for name, sub in (node or {}).items():
            if not isinstance(sub, Mapping) or not sub.get("_target_"):
                c.add(f"{group}.{name}", f"is not a method (conf/{group}/{name}.yaml selected by {group}={name}); "
                                         f"a setting goes under its method: {group}.<method>.{name}=...")
    fsdp = is_fsdp(dict(_get(cfg, "trainer") or {}))
    keys: dict[str, str] = {}  # results.json key -> the method recording under it
    mixers: list[str] = []
    for at, node in configured(cfg):
        target = node["_target_"]
        if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
            continue  # reported with the other targets
        try:
            cls = locate(target)
        except (ImportError, AttributeError) as e:
            c.add(f"{at}._target_", f"cannot import '{target}': {e}")
            continue
        if hasattr(cls, "check_config"):
            cls.check_config(c, at)
        key = getattr(cls, "key", None)
        if key is not None and key in keys:  # e.g. two averaging methods, or two replay buffers
            c.add(at, f"{at} and {keys[key]} are alternatives (both act and record as '{key}'); choose one")
            continue
        if key is not None:
            keys[key] = at
        if getattr(cls, "batch_mixer", None) is not getattr(Component, "batch_mixer"):
            if mixers:
                c.add(at, f"{at} and {mixers[0]} both mix rows into every batch; choose one")
            mixers.append(at)
        if fsdp and getattr(cls, "in_step", lambda _: False)(node):
            c.add(at, f"{at} reads or writes parameters inside the training step, where trainer=fsdp holds only "
                      "shards; use trainer=ddp for it")


def _validate_trainer(c: _Checker, cfg: Mapping) -> None:
    from cl.dist import world_size

    trainer = _get(cfg, "trainer") or {}
    try:
        world = world_size(dict(trainer))
    except (TypeError, ValueError):
        c.add("trainer.devices", f"must be an integer, a list of device ids, 'auto' or -1, got {trainer.get('devices')!r}")
        return
    b = _get(cfg, "stream.batch_size")
    if world > 1 and isinstance(b, int) and b % world:
        c.add("stream.batch_size", f"must be divisible by the {world} processes of trainer.strategy="
                                   f"{trainer.get('strategy')} (each rank takes an equal share of every batch), got {b}")
    c.choice("trainer.precision", ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true"))
    if _get(cfg, "eval.backend") not in ("hf", None):
        c.choice("eval.backend", ("hf", "vllm"))
    if _get(cfg, "eval.backend") == "vllm":
        from cl.rollouts import RolloutBackendError, VLLMRollouts

        try:
            VLLMRollouts.check_available("eval.backend")
        except RolloutBackendError as e:
            c.add("eval.backend", str(e).split(": ", 1)[1])
    if world > 1 and _get(cfg, "objective.length_reward") not in (None, "none"):
        c.add("objective.length_reward", f"length rewards keep per-problem records and rank a batch's groups "
                                         f"in one process; trainer.strategy={trainer.get('strategy')} runs {world}")
    if _get(cfg, "general_eval.kind") == "lm_eval":
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            c.add("general_eval", 'general_eval=lm_eval needs lm-evaluation-harness: pip install -e ".[real]"')
    if _get(cfg, "general_eval.kind") == "lmms_eval":
        import importlib.util

        from cl.harness import LMMS_INSTALL

        if importlib.util.find_spec("lmms_eval") is None:
            c.add("general_eval", f"general_eval=lmms_eval needs lmms-eval: {LMMS_INSTALL}")
        if not is_vision_model(cfg):
            c.add("general_eval", f"general_eval=lmms_eval scores vision-language models; model="
                                  f"{_get(cfg, 'model.name')} reads text only (use general_eval=lm_eval)")
    if world > 1 and _get(cfg, "general_eval.kind") in ("lm_eval", "lmms_eval"):
        kind = _get(cfg, "general_eval.kind")
        c.add("general_eval", f"general_eval={kind} scores in one process; trainer.strategy="
                              f"{trainer.get('strategy')} runs {world} (use one device, or score saved models)")
    if is_fsdp(dict(trainer)):
        import torch
        import torch.distributed.fsdp as fsdp

        if not hasattr(fsdp, "fully_shard"):
            c.add("trainer.strategy", f"fsdp2 needs torch >= 2.6 (FSDP2's fully_shard), this is {torch.__version__}")
        if _get(cfg, "train.compile") is True:
            c.add("train.compile", "torch.compile of the sharded training copy is not supported under trainer=fsdp; "
                                   "use train.compile=false or trainer=ddp")
        if _get(cfg, "adapter.name") == "reglora":  # its penalty reads parameters inside the training step
            c.add("adapter.name", "adapter.name=reglora reads or writes parameters inside the training step, where "
                                  "trainer=fsdp holds only shards; use trainer=ddp for it")


def is_vision_model(cfg: Mapping) -> bool:
    """A vision-language model: ``model.modality: vision`` (hub presets) or the embedded VLM's ``arch``."""
    arch = _get(cfg, "model.arch")
    return _get(cfg, "model.modality") == "vision" or (isinstance(arch, Mapping) and "image_size" in arch)


def _validate_modality(c: _Checker, cfg: Mapping) -> None:
    """What a vision-language model cannot do here, and image tasks on a text model: one line each."""
    from tasks.visual import VISUAL_FAMILIES

    if _get(cfg, "model.modality") is not None:
        c.choice("model.modality", ("text", "vision"))
    entries = [t for f in ("stream.tasks", "stream.general") for t in (_get(cfg, f) or [])]
    named = [t for t in entries if isinstance(t, str)]
    if _get(cfg, "base.kind") == "pretrain":
        named += [t for f in ("base.general", "base.exposure") for t in (_get(cfg, f) or {})]
    if not is_vision_model(cfg):
        visual = sorted({t for t in named if t in VISUAL_FAMILIES} |
                        {str(t.get("name")) for t in entries if isinstance(t, Mapping) and t.get("image_column")})
        if visual:
            c.add("model", f"the visual tasks {', '.join(visual)} need a vision-language model (model=tiny_vlm, "
                           f"or a model preset with modality: vision); model={_get(cfg, 'model.name')} reads text only")
        return
    if _get(cfg, "objective.rollout_backend") == "vllm":
        c.add("objective.rollout_backend", "the vLLM rollouts send token ids only, not images; use "
                                           "rollout_backend=hf with a vision-language model")
    if _get(cfg, "eval.backend") == "vllm":
        c.add("eval.backend", "vLLM evaluation sends token ids only, not images; use eval.backend=hf with a "
                              "vision-language model")
    if _get(cfg, "general_eval.kind") == "lm_eval":
        c.add("general_eval", "general_eval=lm_eval scores text-only language models; use general_eval=lmms_eval "
                              "(or toy: the visual general tasks) with a vision-language model")
    if is_fsdp(dict(_get(cfg, "trainer") or {})):
        c.add("trainer.strategy", "trainer=fsdp shards text decoder layers only; use trainer=ddp (or one device) "
                                  "with a vision-language model")
    if "derpp" in (_get(cfg, "replay") or {}):
        c.add("replay", "replay=derpp stores SFT examples rebuilt from token tensors, which carry no images; "
                        "use replay=er with a vision-language model")


def _validate_checkpoint(c: _Checker, cfg: Mapping) -> None:
    c.choice("resume", ("auto", "never"))
    c.choice("train.nonfinite", ("stop", "skip"))
    if _get(cfg, "checkpoint") is None:
        return
    if not isinstance(_get(cfg, "checkpoint.enabled"), bool):
        c.add("checkpoint.enabled", "must be true or false")
    c.integer("checkpoint.every_n_steps", minimum=0)
    if not isinstance(_get(cfg, "checkpoint.keep_after_completion"), bool):
        c.add("checkpoint.keep_after_completion", "must be true or false")


def _validate_adapter(c: _Checker, cfg: Mapping) -> None:
    from cl.adapters import ADAPTERS, DEFAULT_TARGETS

    known_linear = (*DEFAULT_TARGETS, "lm_head")  # Llama / Qwen2 projection names

    if _get(cfg, "adapter") is None:
        return
    c.choice("adapter.name", ADAPTERS)
    name = _get(cfg, "adapter.name")
    if name in (None, "full"):
        return
    if _get(cfg, "train.reset_optimizer_per_task") is False and name != "lora":
        c.add("train.reset_optimizer_per_task", f"must be true with adapter {name} (its trainable set changes per task)")
    if name == "hft":
        return
    c.integer("adapter.r", minimum=1)
    c.number("adapter.alpha", lo=0.0, strict_lo=True)
    targets = _get(cfg, "adapter.target_modules")
    if not isinstance(targets, Sequence) or isinstance(targets, str) or not targets:
        c.add("adapter.target_modules", f"must be a non-empty list of module names, got {targets!r}")
    else:
        # Llama/Qwen2 names are checked here; other architectures are checked against the loaded model
        llama_like = _get(cfg, "model.arch") is not None or any(
            k in str(_get(cfg, "model.name_or_path", "")).lower() for k in ("qwen", "llama"))
        bad = [t for t in targets if t not in known_linear]
        if llama_like and bad:
            c.add("adapter.target_modules", f"unknown module {', '.join(map(repr, bad))}; allowed: {', '.join(known_linear)}")
    if name == "mora":
        k, r = _get(cfg, "adapter.top_k"), _get(cfg, "adapter.r")
        n_tasks = len(_get(cfg, "stream.tasks") or [])
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                c.add("adapter.top_k", f"must be an integer >= 1 or null (all experts), got {k!r}")
            elif isinstance(r, int) and k > r * max(1, n_tasks):
                c.add("adapter.top_k", f"{k} is larger than the number of experts ({r} per task x {n_tasks} tasks "
                                       f"= {r * n_tasks})")
        c.number("adapter.tau", lo=0.0, strict_lo=True)
        d = _get(cfg, "adapter.delta")
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not -1 <= d <= 1):
            c.add("adapter.delta", f"must be null or a number in [-1, 1] (activations are normalised), got {d!r}")
    if name == "reglora":
        c.number("adapter.key_fraction", lo=0.0, hi=1.0, strict_lo=True)
        c.number("adapter.coef", lo=0.0)
