"""The base stage: cached by a hash of what determines it, trained once when runs start together."""

import json
import multiprocessing as mp
from dataclasses import replace
from pathlib import Path

import pytest

from cl.base_stage import BaseRecipe, base_key, ensure_base
from tasks.registry import build_task

ARCH = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}
DATA = {"seed": 0, "n_train": 100, "n_eval": 20}
RECIPE = BaseRecipe(steps=3, batch_size=8, warmup_steps=1, general={"copy6": 0.5}, exposure={"add3": 0.5},
                    report_n=8, report_pass_k=2)
TRAINER = {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 1}


def _tasks():
    return {n: build_task(n, DATA["n_train"], DATA["n_eval"], DATA["seed"]) for n in ("copy6", "add3")}


def _build(cache: str, log: str) -> str:
    import cl.base_stage as bs

    original = bs._train_base

    def counted(*a, **k):
        with open(log, "a") as f:
            f.write("trained\n")
        return original(*a, **k)

    bs._train_base = counted
    return str(ensure_base(cache, ARCH, RECIPE, DATA, _tasks(), TRAINER))


def test_key_depends_on_arch_recipe_and_data():
    k = base_key(ARCH, RECIPE, DATA)
    assert k == base_key(dict(ARCH), replace(RECIPE), dict(DATA))
    assert k != base_key({**ARCH, "hidden_size": 64}, RECIPE, DATA)
    assert k != base_key(ARCH, replace(RECIPE, steps=4), DATA)
    assert k != base_key(ARCH, RECIPE, {**DATA, "seed": 1})
    assert k == base_key(ARCH, replace(RECIPE, expected={"add3": 0.5}, health_band=0.2), DATA)  # judged, not built


def test_concurrent_runs_train_once_and_share_the_checkpoint(tmp_path):
    log = tmp_path / "log"
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_build, [(str(tmp_path / "cache"), str(log))] * 2)
    assert paths[0] == paths[1]
    assert log.read_text().count("trained") == 1
    final = Path(paths[0])
    report = json.loads((final / "base_report.json").read_text())
    assert report["key"] == base_key(ARCH, RECIPE, DATA)
    assert (final / "config.json").exists() and (final / "tokenizer.json").exists()
    assert not list((tmp_path / "cache").glob("*.tmp-*"))
    # a later call reuses it without training
    assert _build(str(tmp_path / "cache"), str(log)) == paths[0]
    assert log.read_text().count("trained") == 1


@pytest.mark.slow
def test_default_base_stage_meets_the_recipe_targets(tmp_path):
    """The default base stops by its measured criteria (not its step cap) and is healthy: general tasks >=
    general_health, stream tasks within the health band of their expected levels, stream pass@8 above 0.2."""
    from omegaconf import OmegaConf

    from cl.base_stage import BaseRecipe, base_health
    from tests.conftest import base_model, compose_cfg

    cfg = compose_cfg(f"cache_dir={tmp_path}")
    info = base_model(cfg, tmp_path)
    report = json.loads((Path(info["path"]) / "base_report.json").read_text())
    recipe = BaseRecipe(**{k: v for k, v in OmegaConf.to_container(cfg.base).items() if k != "kind"})
    assert report["stopped_by"] == "criteria", report["steps"]
    assert base_health(report, recipe) == {"ok": True, "problems": []}
    for name in cfg.stream.tasks:
        assert report["pass@8"][name] >= 0.2, report


def test_cover_and_schedule_and_health():
    from cl.base_stage import AnnealFrom, _leading_digit, base_health

    assert [_leading_digit(p) for p in ("A3:123+456=", "S2:07-03=", "M:99*4=", "C:abcdef=")] == [1, 0, 9, None]
    lr = AnnealFrom(warmup_steps=10, anneal_start=100, anneal_steps=50, min_lr_ratio=0.2).lr_lambda(0)
    assert lr(0) < lr(9) < 1.0 == lr(10) == lr(100)
    assert lr(125) == pytest.approx(0.6) and lr(150) == pytest.approx(0.2) == lr(1000)
    recipe = BaseRecipe(general={"copy6": 1.0}, exposure={"add3": 1.0}, expected={"add3": 0.5},
                        general_health=0.95, health_band=0.1)
    good = {"greedy": {"copy6": 0.99, "add3": 0.55}, "stopped_by": "criteria"}
    assert base_health(good, recipe) == {"ok": True, "problems": []}
    bad = {"greedy": {"copy6": 0.14, "add3": 0.005}, "stopped_by": "cap"}
    problems = base_health(bad, recipe)["problems"]
    assert len(problems) == 3
    assert problems[0] == "general task copy6: greedy accuracy 0.140 < 0.95"
    assert problems[1].startswith("stream task add3: greedy accuracy 0.005 outside its expected level 0.50")


def test_covered_exposure_rows_only(tmp_path):
    """The stage trains stream tasks only on rows whose first operand's leading digit is covered."""
    import cl.base_stage as bs

    seen = []
    original = bs.TaskExamples

    class Spy(original):
        def __init__(self, pairs, rows=None):
            seen.extend(pairs)
            super().__init__(pairs, rows)

    bs.TaskExamples = Spy
    try:
        recipe = replace(RECIPE, cover=(0, 1), steps=2, report_n=4, report_pass_k=1)
        bs._train_base(tmp_path / "b", ARCH, recipe, _tasks(), TRAINER)
    finally:
        bs.TaskExamples = original
    from cl.model import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(tmp_path / "b")
    prompts = [tok.decode(p, skip_special_tokens=True) for p, _ in seen]
    add3 = [p for p in prompts if p.startswith("A3:")]
    assert add3 and all(p[3] in "01" for p in add3)
    assert any(p.startswith("C:") for p in prompts)  # general rows are not filtered
