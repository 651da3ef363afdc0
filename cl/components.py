"""Methods as config groups: ``replay=er``, ``regularizer=ewc``, ``averaging=wise``, ``meta=kfpf``.

Each method is one class (a :class:`cl.core.components.Component`) and one file ``conf/<group>/<name>.yaml``::

    # @package regularizer.ewc
    defaults:
      - /schema/regularizer/ewc@_here_    # types and defaults: the constructor's signature
      - _self_
    _target_: replay.regularizers.EWC
    coef: 100.0                           # what this preset sets

The schema ``schema/<group>/<name>`` is generated from the class's constructor (its annotations and
defaults: the one place a default is written) for every file of the groups below, before Hydra composes;
a value of the wrong type or a key the constructor does not take fails at composition, naming the key.
Several methods of a group combine (``regularizer=[l2,ewc]``); ``<group>=none`` selects nothing.
Constructor arguments named in :data:`RUN_CONTEXT` are not configuration: the run passes them (the prompt
format, the evaluator, the seed, ...). Ranges and rules a class knows are checked by its
``check_config`` before any work (``cl.validate``); the run builds the components with
``hydra.utils.instantiate``, in the groups' order (:data:`GROUPS`), within the allowlisted packages.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import yaml

# hook order: averaging first (its task end replaces the model, every later hook should see the stream's
# model), then data and loss components, then per-step meta-learning, then the probes (the distribution
# shift at task ends) and the data filters (RIF before a task)
GROUPS = ("averaging", "replay", "regularizer", "meta", "shift", "rif")
# groups whose files take their types and defaults from their ``_target_``'s constructor: the methods and
# the objective (one per run, its settings directly under ``objective``)
SCHEMA_GROUPS = ("objective", *GROUPS)
# constructor arguments the run supplies: never configuration
RUN_CONTEXT = ("fmt", "evaluator", "seed", "log", "general", "stream_batch_size", "data_seed", "objective",
               "steps_per_task")


def locate(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _config_type(tp):
    """An annotation as OmegaConf can enforce it (containers loosely, unknown classes as Any)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _config_type(args[0]) if len(args) == 1 else Any
        return Optional[inner] if inner is not Any else Any
    if tp in (int, float, str, bool) or dataclasses.is_dataclass(tp):
        return tp
    if origin in (list, tuple) or tp in (list, tuple):
        return typing.List[Any]
    if origin is dict or tp is dict:
        return typing.Dict[str, Any]
    return Any


def schema_for(cls, target: str | None, **extra):
    """A dataclass with the constructor's configurable arguments (their types and defaults) and ``_target_``.

    A class's ``nested_settings`` (argument -> dotted class name) makes that argument a node holding the
    named class's constructor settings (e.g. GRPO's ``vllm``: the vLLM engine's), defaults included."""
    fn = cls.__init__ if inspect.isclass(cls) else cls  # a class's constructor, or a builder function
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    nested = getattr(cls, "nested_settings", {})
    fields = [("_target_", str, dataclasses.field(default=target))] if target else []
    fields += [(name, type(v), dataclasses.field(default=v)) for name, v in extra.items()]
    for name, p in sig.parameters.items():
        if name in ("self", "out_dir") or name in RUN_CONTEXT or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in nested:
            sub = schema_for(locate(nested[name]), None)
            fields.append((name, sub, dataclasses.field(default_factory=sub)))
            continue
        tp = _config_type(hints.get(name, Any))
        if p.default is inspect.Parameter.empty:
            fields.append((name, tp, dataclasses.field(default="???")))
        elif dataclasses.is_dataclass(p.default) or isinstance(p.default, (list, dict, tuple)):  # mutable: a copy each
            value = list(p.default) if isinstance(p.default, tuple) else p.default
            fields.append((name, tp, dataclasses.field(default_factory=lambda v=value: copy.deepcopy(v))))
        else:
            fields.append((name, tp, dataclasses.field(default=p.default)))
    return dataclasses.make_dataclass(f"{cls.__name__.title().replace('_', '')}Config", fields)


def dataclass_schema(cls, **extra):
    """A copy of dataclass ``cls`` with types OmegaConf can enforce and ``extra`` fields (name -> default)."""
    fields = [(name, type(v), dataclasses.field(default=v)) for name, v in extra.items()]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = list(default) if isinstance(default, tuple) else default
        kw = ({"default_factory": lambda v=value: copy.deepcopy(v)} if isinstance(value, (list, dict))
              else {"default": value})
        fields.append((f.name, _config_type(hints[f.name]), dataclasses.field(**kw)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def preset_files(conf_dir: str | Path):
    """``(group, name, target)`` of every file with a ``_target_`` under :data:`SCHEMA_GROUPS`."""
    for group in SCHEMA_GROUPS:
        for f in sorted((Path(conf_dir) / group).glob("*.yaml")):
            data = yaml.safe_load(f.read_text()) or {}
            if data.get("_target_"):
                yield group, f.stem, data["_target_"]


def searchpath_dirs(argv) -> list[Path]:
    """The local directories a command line adds with ``hydra.searchpath=[file://...]`` (Hydra's own
    override parser): their method files get schemas like the project's. ``pkg://`` entries are left to
    Hydra (their files name their schema themselves, or have none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    wanted = [a for a in argv if a.lstrip("+~").startswith("hydra.searchpath=")][:1]  # Hydra reads the first
    if not wanted:
        return []
    out = []
    for override in OverridesParser.create().parse_overrides([w.lstrip("~") for w in wanted]):
        value = override.value()
        for entry in value if isinstance(value, list) else [value]:
            entry = str(entry)
            if entry.startswith("file://"):
                entry = entry[len("file://"):]
            if "://" not in entry and Path(entry).is_dir():
                out.append(Path(entry))
    return out


def register_schemas(conf_dir: str | Path, *extra_dirs: str | Path) -> None:
    """Store ``schema/<group>/<name>`` in Hydra's ConfigStore for every method file, ``schema/adapter/<name>``
    for every adapter, ``schema/eval/settings`` and ``schema/train/settings`` (:class:`cl.evaluation.EvalSettings`,
    :class:`cl.schedule.TrainSettings`), ``schema/general_eval/lm_eval`` and ``lmms_eval`` (:class:`cl.harness.HarnessSettings`, :class:`cl.harness.LmmsSettings`), ``schema/base/recipe`` (the base stage's settings: :class:`cl.base_stage.BaseRecipe`) and
    ``schema/model/tiny_arch`` (the embedded model's shape: :func:`cl.model.build_tiny_llama`) and
    ``schema/model/tiny_vlm_arch`` (the embedded vision-language model's: :func:`cl.vision.build_tiny_llava`)
    (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from cl.base_stage import BaseRecipe

    cs = ConfigStore.instance()
    from cl.model import build_tiny_llama

    cs.store(group="schema/base", name="recipe", node=dataclass_schema(BaseRecipe, kind="pretrain"))
    from cl.evaluation import EvalSettings
    from cl.schedule import TrainSettings

    cs.store(group="schema/eval", name="settings", node=dataclass_schema(EvalSettings))
    cs.store(group="schema/train", name="settings", node=dataclass_schema(TrainSettings))
    from cl.harness import HarnessSettings, LmmsSettings

    cs.store(group="schema/general_eval", name="lm_eval", node=dataclass_schema(HarnessSettings))
    cs.store(group="schema/general_eval", name="lmms_eval", node=dataclass_schema(LmmsSettings))
    cs.store(group="schema/model", name="tiny_arch", node=schema_for(build_tiny_llama, None))
    from cl.vision import build_tiny_llava

    cs.store(group="schema/model", name="tiny_vlm_arch", node=schema_for(build_tiny_llava, None))
    from cl.adapters import adapter_classes

    for name, cls in adapter_classes().items():  # adapter.name picks the class; its settings sit under adapter
        cs.store(group="schema/adapter", name=name, node=schema_for(cls, None, name=name))
    own = set()
    for d in (conf_dir, *extra_dirs):  # a method file in a searchpath directory: the same schema (the project's
        for group, name, target in preset_files(d):  # file wins a name both have, as it does in Hydra's search)
            if (group, name) not in own:
                own.add((group, name))
                cs.store(group=f"schema/{group}", name=name, node=schema_for(locate(target), target))


def configured(cfg: Mapping) -> list[tuple[str, Mapping]]:
    """``(dotted path, node)`` of every configured method, in hook order."""
    out = []
    for group in GROUPS:
        node = cfg.get(group) if isinstance(cfg, Mapping) else None
        if not isinstance(node, Mapping):
            continue
        for name, sub in node.items():
            if isinstance(sub, Mapping) and sub.get("_target_"):
                out.append((f"{group}.{name}", sub))
    return out


def build(cfg, context: Mapping[str, Any]) -> list:
    """Instantiate every configured method; each gets the run-context arguments its constructor names."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    out = []
    for at, node in configured(cfg):
        cls = locate(node["_target_"])
        wants = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in context.items() if k in wants}
        try:
            node = node if OmegaConf.is_config(node) else OmegaConf.create(dict(node))
            factory = instantiate(node, _partial_=True, _convert_="all")  # the settings, as plain values...
            out.append(factory(**kwargs))  # ...then the run's objects, untouched by Hydra's conversion
        except Exception as e:  # Hydra wraps the constructor's error; report the constructor's own line
            cause = e.__cause__ or e
            raise ValueError(f"{at}: {cause}".splitlines()[0]) from e
    return out
