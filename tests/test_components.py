"""The component protocol and the method config groups: one way to add a method, one default per key,
layers that point one way."""

import ast
import re
import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cl.components import RUN_CONTEXT, SCHEMA_GROUPS, configured, locate, preset_files, schema_for
from cl.core.components import Component
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ("cl.run", "cl.loop", "cl.module", "cl.trainer", "cl.objectives", "cl.checkpoint", "cl.components",
          "cl.base_stage", "cl.continual_eval", "cl.evaluation", "cl.validate")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("package", ["tasks", "replay", "analysis", "cl/core"])
def test_method_and_data_packages_do_not_import_the_engine(package):
    for f in sorted((ROOT / package).rglob("*.py")):
        bad = sorted(m for m in _imports(f) if m.startswith("cl.") and not m.startswith("cl.core")
                     and any(m == e or m.startswith(e + ".") for e in ENGINE))
        assert not bad, f"{f.relative_to(ROOT)} imports the engine: {bad}"


def test_scripts_and_tests_use_no_private_name_of_the_run_module():
    for d in ("scripts", "tests"):
        for f in sorted((ROOT / d).rglob("*.py")):
            private = [m for m in _imports(f) if m.startswith("cl.run.") and m.rsplit(".", 1)[1].startswith("_")]
            assert not private, f"{f.relative_to(ROOT)}: {private}"


def test_every_method_file_names_a_component_and_sets_only_what_differs_from_its_constructor():
    files = list(preset_files(ROOT / "conf"))
    assert {g for g, _, _ in files} == set(SCHEMA_GROUPS) and len(files) >= 15
    for group, name, target in files:
        cls = locate(target)
        assert group == "objective" or issubclass(cls, Component), target
        params = inspect.signature(cls.__init__).parameters
        data = yaml.safe_load((ROOT / "conf" / group / f"{name}.yaml").read_text())
        for key, value in data.items():
            if key in ("_target_", "defaults"):
                continue
            assert key in params and key not in RUN_CONTEXT, f"{group}/{name}: '{key}' is not a setting of {target}"
            default = params[key].default
            if dataclasses.is_dataclass(default):
                default = dataclasses.asdict(default)
                value = {**default, **value}
            assert value != default, f"{group}/{name}: '{key}: {value}' restates the default written in {target}"


def test_adapter_files_set_only_what_differs_from_their_constructors():
    from cl.adapters import ADAPTERS, adapter_classes, make_adapter

    for name in ADAPTERS:
        params = inspect.signature(adapter_classes()[name].__init__).parameters
        data = yaml.safe_load((ROOT / "conf" / "adapter" / f"{name}.yaml").read_text())
        assert data["name"] == name
        for key, value in data.items():
            if key not in ("defaults", "name"):
                assert key in params and value != params[key].default, f"adapter/{name}: '{key}: {value}'"
        composed = OmegaConf.to_container(compose_cfg(f"adapter={name}").adapter, resolve=True)
        settings = {k for k, p in params.items() if k not in ("self", "seed", "evaluator") and p.kind == p.POSITIONAL_OR_KEYWORD}
        assert set(composed) == settings | {"name"}
        assert type(make_adapter(composed)) is adapter_classes()[name]


@pytest.mark.parametrize("preset", ["tiny", "smoke"])
def test_base_presets_set_only_what_differs_from_the_recipe_and_compose_to_it(preset):
    from cl.base_stage import BaseRecipe

    defaults = dataclasses.asdict(BaseRecipe())
    data = yaml.safe_load((ROOT / "conf" / "base" / f"{preset}.yaml").read_text())
    for key, value in data.items():
        if key != "defaults":
            assert key in defaults, f"base/{preset}: '{key}' is not a BaseRecipe setting"
            default = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
            assert value != default, f"base/{preset}: '{key}: {value}' restates BaseRecipe's default"
    composed = OmegaConf.to_container(compose_cfg(f"base={preset}").base, resolve=True)
    assert composed.pop("kind") == "pretrain"
    assert dataclasses.asdict(BaseRecipe(**composed)) == {**defaults, **composed}
    assert set(composed) == set(defaults)


def test_a_composed_method_carries_its_constructors_defaults():
    cfg = OmegaConf.to_container(compose_cfg("regularizer=[l2,ewc]", "replay=derpp"), resolve=True)
    assert [at for at, _ in configured(cfg)] == ["replay.derpp", "regularizer.l2", "regularizer.ewc", "shift.kl"]
    from replay.regularizers import EWC

    defaults = {k: p.default for k, p in inspect.signature(EWC.__init__).parameters.items()}
    assert cfg["regularizer"]["ewc"]["gamma"] == defaults["gamma"]
    assert cfg["regularizer"]["ewc"]["fisher_batches"] == defaults["fisher_batches"]
    assert "fmt" not in cfg["regularizer"]["ewc"] and "seed" not in cfg["regularizer"]["ewc"]


@pytest.mark.parametrize("override, key", [("regularizer.ewc.coef=abc", "regularizer.ewc.coef"),
                                           ("regularizer.ewc.typo=1", "regularizer.ewc.typo"),
                                           ("base.steps=abc", "base.steps"), ("base.typo=1", "base.typo"),
                                           ("adapter.r=abc", "adapter.r"), ("adapter.typo=1", "adapter.typo"),
                                           ("train.warmup_steps=abc", "train.warmup_steps"),
                                           ("train.typo=1", "train.typo"),
                                           ("eval.n_per_task=abc", "eval.n_per_task"), ("eval.typo=1", "eval.typo")])
def test_a_wrong_type_or_an_unknown_key_fails_at_composition_naming_the_key(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        compose_cfg("regularizer=ewc", "adapter=lora", override)


def test_schema_types_come_from_the_signature():
    from replay.mixing import ExperienceReplay

    fields = {f.name: f for f in dataclasses.fields(schema_for(ExperienceReplay, "replay.mixing.ExperienceReplay"))}
    assert fields["fraction"].type is float and fields["capacity"].type is int and fields["buffer"].type is str
    assert "seed" not in fields and fields["_target_"].default == "replay.mixing.ExperienceReplay"


def test_hooks_default_to_no_ops_and_state_round_trips_through_ckpt_attrs():
    class Counter(Component):
        key = "counter"
        ckpt_attrs = ("n",)

        def __init__(self):
            self.n = 0

        def on_task_end(self, ctx):
            self.n += 1

        def record(self):
            return {"n": self.n}

    c = Counter()
    c.on_task_start(None), c.on_task_end(None), c.on_resume(None)
    assert c.prepare_data(None, "task") == "task" and c.callbacks() == [] and c.extra_loss(None, {}, None) is None
    assert c.setup("model") == "model" and c.metrics() == {} and c.batch_mixer() is None
    d = Counter()
    d.load_state_dict(c.state_dict())
    assert d.record() == {"n": 1}


def test_train_and_eval_settings_have_one_default_each():
    """``train.*`` and ``eval.*`` take their types and defaults from TrainSettings / EvalSettings; the config
    files set only what differs, and the classes that use the settings name the same defaults."""
    from cl.evaluation import EvalSettings, Scorer
    from cl.module import ContinualLM
    from cl.schedule import TrainSettings

    cfg = OmegaConf.to_container(compose_cfg(), resolve=True)
    train, ev = dataclasses.asdict(TrainSettings()), dataclasses.asdict(EvalSettings())
    assert set(cfg["train"]) == set(train) and set(cfg["eval"]) == set(ev)
    assert {k: v for k, v in cfg["eval"].items() if v != ev[k]} == {}
    assert {k: v for k, v in cfg["train"].items() if v != train[k]} == {"warmup_steps": 10}
    top = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    assert set(top["train"]) == {"warmup_steps"}  # written once: what differs from TrainSettings
    assert set(yaml.safe_load((ROOT / "conf" / "eval" / "default.yaml").read_text())) == {"defaults"}
    # the classes that take these settings name the dataclasses' defaults instead of writing them again
    for fn, names in ((Scorer.__init__, ("method", "max_new_tokens", "batch_size")),
                      (ContinualLM.__init__, ("reset_optimizer_per_task", "compile_train"))):
        src = inspect.getsource(fn).split(")", 1)[0] if fn is Scorer.__init__ else inspect.getsource(fn)
        for name in names:
            assert re.search(rf"{name}: [^=]*= (EvalSettings|TrainSettings)\.", src), (fn.__qualname__, name)
    for experiment in ("lr_infinite", "smoke"):  # presets still reach the fields
        composed = OmegaConf.to_container(compose_cfg(f"experiment={experiment}"), resolve=True)
        TrainSettings(**composed["train"])
        EvalSettings(**composed["eval"])


def test_a_method_file_in_a_searchpath_directory_gets_its_schema(tmp_path):
    """A method file kept outside the project (``hydra.searchpath=[file://DIR]``) takes its types and defaults
    from its class like the project's own files: defaults filled in, a wrong type fails naming the key."""
    from tests.conftest import run_cli

    (tmp_path / "regularizer").mkdir()
    (tmp_path / "regularizer" / "ewc_strong.yaml").write_text(
        "# @package regularizer.ewc_strong\ndefaults:\n  - /schema/regularizer/ewc_strong@_here_\n  - _self_\n"
        "_target_: replay.regularizers.EWC\ncoef: 1000.0\n")
    args = (f"hydra.searchpath=[file://{tmp_path}]", "regularizer=ewc_strong")
    proc = run_cli("--cfg", "job", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    node = yaml.safe_load(proc.stdout)["regularizer"]["ewc_strong"]
    from replay.regularizers import EWC

    assert node["coef"] == 1000.0 and node["gamma"] == inspect.signature(EWC.__init__).parameters["gamma"].default
    proc = run_cli("--cfg", "job", *args, "regularizer.ewc_strong.coef=abc")
    assert proc.returncode != 0 and "regularizer.ewc_strong.coef" in proc.stderr
