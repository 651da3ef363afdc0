"""General multimodal capability through lmms-eval on the vision-language model in memory
(``general_eval=lmms_eval``), offline: custom lmms-eval tasks over a JSONL file in tests/fixtures whose
images are drawn with Pillow, on a tiny random LLaVA."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, run_cli
from tests.test_vision import TINY_VLM

pytest.importorskip("lmms_eval")

FIXTURES = ROOT / "tests" / "fixtures" / "lmms_eval"


@pytest.fixture(autouse=True)
def _image_store(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CL_IMAGE_DIR", str(tmp_path_factory.getbasetemp() / "images"))
    monkeypatch.chdir(ROOT)  # the fixture tasks name their data relative to the repository root


@pytest.fixture()
def vlm(tmp_path):
    from cl.model import build_tiny, load_model_and_tokenizer
    from cl.vision import make_format

    path = build_tiny(tmp_path / "vlm", seed=0, **TINY_VLM)
    model, tok = load_model_and_tokenizer(path)
    return model.train(), make_format(model, tok, path=path)


def _docs() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "toy_colour.jsonl").read_text().splitlines()]


def _image(doc):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lmms_fixture_utils", FIXTURES / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.doc_to_visual(doc)[0]


def _harness(fmt, tasks, limit=4):
    from cl.harness import LmmsEvalGeneral, LmmsSettings

    return LmmsEvalGeneral(LmmsSettings(tasks=tasks, include_path=str(FIXTURES), limit=limit, batch_size=3), fmt)


def test_generation_tasks_are_answered_by_the_runs_own_format_and_decoding(vlm):
    """Each answer lmms-eval scores is the suite's own greedy generation for the image and question (through
    the run's prompt format), cut at the task's stop string; the score is the task's exact match over the
    first ``limit`` documents; the model's mode is restored; the next point sees weights changed in place."""
    from cl.generation import generate_ids
    from cl.vision import store_image

    model, fmt = vlm
    harness = _harness(fmt, ["toy_colour"])
    assert harness.names == ["lmms_eval:toy_colour"]
    docs = _docs()[:4]
    answers = []
    for _ in range(2):
        point = harness.evaluate(model)
        assert model.training
        assert point.items == {"lmms_eval:toy_colour": 4} and point.metric == {"lmms_eval:toy_colour": "exact_match,none"}
        samples = sorted(point.samples["toy_colour"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == [0, 1, 2, 3]
        prompts = [store_image(_image(d)) + d["question"] for d in docs]
        ids = generate_ids(model, fmt.prompt_ids(prompts), fmt, max_new_tokens=6, batch_size=3)  # the harness's batches
        want = [fmt.decode(x).split("\n")[0] for x in ids]
        got = [s["filtered_resps"][0] for s in samples]
        assert got == want
        assert point.scores["lmms_eval:toy_colour"] == sum(a.strip().lower() == d["answer"] for a, d in zip(got, docs)) / 4
        answers.append(got)
        with torch.no_grad():  # "training" between two points
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
    assert answers[0] != answers[1]  # the second point scored the changed weights


def test_multiple_choice_uses_the_models_own_loss_on_each_choice(vlm):
    """Each choice's value is the model's own loss (mean negative log-likelihood per token, from its forward
    with ``labels``) on the choice after the image and question, one unpadded sequence at a time; the
    task's accuracy is the argmin over choices against the label (lmms-eval's rule)."""
    from cl.core.data import model_inputs
    from cl.vision import store_image

    model, fmt = vlm
    point = _harness(fmt, ["toy_colour_choice"], limit=6).evaluate(model)
    samples = sorted(point.samples["toy_colour_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == 6
    model.eval()
    hits = []
    for s, doc in zip(samples, _docs()):
        got = [r[0] for r in s["filtered_resps"]]
        prompt = fmt.prompt_ids([store_image(_image(doc)) + doc["question"]])[0]
        want = []
        for choice in doc["choices"]:
            cont = fmt.tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([list(prompt) + cont])
            labels = torch.full_like(ids, -100)
            labels[0, len(prompt):] = ids[0, len(prompt):]
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **prompt.visual}
            with torch.no_grad():
                want.append(float(model(**model_inputs(batch), labels=labels).loss))
        assert got == pytest.approx(want, abs=1e-4)
        hits.append(float(min(range(3), key=got.__getitem__) == doc["label"]))
        assert s["acc"] == hits[-1]
    assert point.scores["lmms_eval:toy_colour_choice"] == pytest.approx(sum(hits) / len(hits))


def test_generation_stops_at_the_tasks_stop_strings(vlm):
    """The task's ``until`` strings cut each answer (the fixture's newline never comes from the tiny model)."""
    from lmms_eval.api.instance import Instance

    from cl.generation import generate_ids
    from cl.harness import _suite_lmms
    from cl.vision import store_image

    model, fmt = vlm
    docs = _docs()[:2]
    prompts = [store_image(_image(d)) + d["question"] for d in docs]
    full = [fmt.decode(x) for x in generate_ids(model, fmt.prompt_ids(prompts), fmt, max_new_tokens=6, batch_size=3)]
    assert all(len(f) >= 4 for f in full)
    stops = [f[2:4] for f in full]  # each answer holds its stop string at character 2 (or earlier)
    lm = _suite_lmms()(model, fmt, 3)
    lm.task_dict["t"] = {"test": docs}
    requests = [Instance("generate_until", (d["question"], {"max_new_tokens": 6, "until": [stop]},
                                            lambda doc: [_image(doc)], i, "t", "test"),
                         idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
                for i, (d, stop) in enumerate(zip(docs, stops))]
    got = lm.generate_until(requests)
    assert got == [f.split(stop, 1)[0] for f, stop in zip(full, stops)] and all(len(g) <= 2 for g in got)


def test_unknown_lmms_task_and_a_text_model_are_one_line(vlm, tiny_qwen):
    from transformers import AutoTokenizer

    from cl.core.data import PromptFormat

    _, fmt = vlm
    with pytest.raises(ValueError, match="unknown lmms-eval task.*no_such_task"):
        _harness(fmt, ["no_such_task"])
    with pytest.raises(ValueError, match="scores vision-language models"):
        _harness(PromptFormat(AutoTokenizer.from_pretrained(tiny_qwen)), ["toy_colour"])


def test_text_model_with_lmms_eval_is_refused_before_any_work():
    from omegaconf import OmegaConf

    from cl.validate import ConfigError, validate_config
    from tests.conftest import compose_cfg

    cfg = compose_cfg("experiment=smoke", "general_eval=lmms_eval")
    with pytest.raises(ConfigError, match="general_eval=lmms_eval scores vision-language models"):
        validate_config(OmegaConf.to_container(cfg, resolve=False))


def test_a_vlm_run_scores_lmms_tasks_as_general_columns_at_every_boundary(cache_dir, tmp_path):
    """`experiment=vlm_smoke general_eval=lmms_eval` with the fixture tasks, offline: each task is a general
    column next to the visual probes (base row and one row per task), at the boundaries only, and counts in
    general retention."""
    out = tmp_path / "run"
    proc = run_cli("experiment=vlm_smoke", "base.steps=80", "base.min_steps=30", "base.anneal_steps=40",
                   "stream.steps_per_task=4", "eval.n_per_task=12", "eval.every_n_steps=2", "general_eval=lmms_eval",
                   "general_eval.tasks=[toy_colour,toy_colour_choice]", f"general_eval.include_path={FIXTURES}",
                   "general_eval.limit=6", f"hydra.run.dir={out}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed"
    assert res["general_tasks"] == ["vcolor", "vcount", "lmms_eval:toy_colour", "lmms_eval:toy_colour_choice"]
    assert len(res["general_base"]) == 4 and len(res["general_matrix"]) == 2
    assert all(len(row) == 4 and all(0.0 <= x <= 1.0 for x in row) for row in res["general_matrix"])
    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    for name, metric in (("toy_colour", "exact_match,none"), ("toy_colour_choice", "acc,none")):
        rows = [c for c in curves if c["eval_task"] == f"lmms_eval:{name}"]
        assert [c["global_iter"] for c in rows] == [0, 4, 8] and all(c["boundary"] for c in rows)
        assert all(c["kind"] == "general" and c["n"] == 6 and c["metric"] == metric for c in rows)
    assert any(not c["boundary"] for c in curves)
    assert "general_retention" in res["metrics"]


def test_answers_stop_at_the_first_stop_string():
    from cl.harness import _cut

    assert _cut("red\nblue", ["\n"]) == "red"
    assert _cut("red. blue\n", [".", "\n"]) == "red"
    assert _cut("red blue", "blue") == "red "
    assert _cut("red", None) == "red" and _cut("red", [""]) == "red"
