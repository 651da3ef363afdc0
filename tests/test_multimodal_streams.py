"""Real multimodal streams from local copies in each dataset's schema (tests/mm_fixtures.py): stream=rft_cpt
(ScienceQA, TextVQA, VizWiz, GQA, Geometry3K, PathVQA, CLEVR) and stream=ctbench (MLLM-CTBench's seven
tasks), and the verifiers that score them as the benchmarks do."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, compose_cfg
from tests.mm_fixtures import CTBENCH, TEXT_ONLY, TEXTVQA_ANSWERS, ctbench_solution, write_ctbench, write_rft_cpt
from tasks.user_data import DataError, fill_template, load_user_task
from tasks.verifiers import (choice_match, label_match, last_number_match, loose_text_match, make_verifier,
                             vqa_accuracy, vqa_normalize)

RFT_CPT_ORDER = ["scienceqa", "textvqa", "vizwiz", "gqa", "geometry", "pathvqa", "clevr"]
TAG = r"<image:[^>]+>"


def _tasks(*overrides):
    from tasks.stream import build_tasks

    cfg = compose_cfg("model=tiny_vlm", *overrides)
    return {t.name: t for t in build_tasks(list(cfg.stream.tasks), 10, 10, cfg.data.seed)}


def _score(task, completions, split="eval"):
    rows = task.eval if split == "eval" else task.train
    cols = {c: list(rows[c]) for c in rows.column_names}
    return task.score(completions, **cols)


@pytest.fixture(scope="module")
def rft_dir(tmp_path_factory):
    return write_rft_cpt(tmp_path_factory.mktemp("rft_cpt"))


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory):
    return write_ctbench(tmp_path_factory.mktemp("ctbench"))


# --- verifiers ---

def test_choice_follows_llavas_rule():
    comps = ["B", "b", " B. the moon", "B) moon", "The answer is B", "A", "b. moon", "moon"]
    assert choice_match(comps, ["B"] * len(comps)) == [1, 1, 1, 0, 0, 0, 0, 0]


def test_vqa_normalisation_matches_lmms_evals_answer_processor():
    metric = pytest.importorskip("lmms_eval.tasks._task_utils.vqa_eval_metric")
    ref = metric.EvalAIAnswerProcessor()
    cases = ["Two dogs.", "the  Cat!", "1,000", "dont know", "A red-car", "3.5", "hello.world", "(none)",
             "It's a sign; stop", "whats up?", "\tUnanswerable\n", "an apple, pear"]
    assert [vqa_normalize(c) for c in cases] == [ref(c) for c in cases]


def test_vqa_normalisation_and_accuracy_by_hand():
    assert vqa_normalize("Two dogs.") == "2 dogs"
    assert vqa_normalize("An Apple, pear!") == "apple pear"
    assert vqa_normalize("dont") == "don't"
    assert vqa_normalize("1,000") == "1000" and vqa_normalize("3.5") == "3.5"
    ten = ["stop"] * 2 + ["go"] * 8
    # "stop" twice in 10: leaving out one of the two leaves 1 match (1/3), any other leaves 2 (2/3)
    assert vqa_accuracy(["Stop."], [""], answers=[ten]) == [pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)]
    assert vqa_accuracy(["go"], [""], answers=[ten]) == [1.0]  # >= 3 others agree in every leave-one-out
    assert vqa_accuracy(["yield"], [""], answers=[ten]) == [0.0]
    assert vqa_accuracy(["The Red."], ["red"]) == [1.0] and vqa_accuracy(["reddish"], ["red"]) == [0.0]


def test_ctbench_scorers_strip_reasoning_and_follow_the_benchmark():
    gt = "<think>long reasoning</think> The Mona Lisa"
    assert loose_text_match(["I think it is the mona lisa!", "a landscape"], [gt, gt]) == [1.0, 0.0]
    long = "<think>x</think> adenocarcinoma of the colon"
    assert loose_text_match(["adenocarcinoma of colon"], [long]) == [1.0]  # similarity ratio >= 0.6
    assert loose_text_match(["<think>the mona lisa</think> no idea"], [gt]) == [0.0]  # reasoning does not count
    assert last_number_match(["so 1,250.0 in total", "<think>7</think> 8"], ["<think>3</think> 1250", "7"]) == [1.0, 0.0]
    fomc = make_verifier("label", labels=["hawkish", "dovish", "neutral"])
    assert fomc(["<think>hawkish?</think> Dovish.", "neutral", "no label"], ["<think>neutral</think> dovish"] * 3) == \
        [1.0, 0.0, 0.0]
    assert label_match(["hawkish then dovish"], ["hawkish"], labels=("dovish", "hawkish")) == [1.0]  # first in text
    with pytest.raises(ValueError, match="labels"):
        make_verifier("label")


def test_templates_fill_columns_and_leave_out_empty_lines():
    t = "Context: {hint}\n{prompt}\n{choices}\nPut it in \\boxed{}."
    assert fill_template(t, {"hint": "", "prompt": "Q?", "choices": "A. x"}) == "Q?\nA. x\nPut it in \\boxed{}."
    assert fill_template(t, {"hint": "H", "prompt": "Q?", "choices": "A. x"}).startswith("Context: H\nQ?")


# --- the streams ---

def test_rft_cpt_stream_reads_every_datasets_schema(rft_dir):
    from cl.vision import image_refs, open_image

    tasks = _tasks("stream=rft_cpt", f"stream.data_dir={rft_dir}")
    assert list(tasks) == RFT_CPT_ORDER
    for t in tasks.values():  # every prompt has one image that opens, and its reference scores 1
        for p in list(t.train["prompt"]) + list(t.eval["prompt"]):
            refs = image_refs(p)
            assert len(refs) == 1 and open_image(refs[0]).size == (8, 8), (t.name, p)
        assert _score(t, list(t.eval["answer"])) == [1.0] * len(t.eval), t.name
    sqa = tasks["scienceqa"]
    assert len(sqa.train) == 3 and len(sqa.eval) == 2  # the rows without an image are dropped (ScienceQA-IMG)
    p0, p1 = list(sqa.eval["prompt"])
    assert "Context: Look at picture 0.\nWhich is a test thing 0?\nA. rock\nB. tree\nAnswer with" in p0
    assert "Context" not in p1 and "Which is a test thing 1?\nA. rock\nB. tree\nC. cloud\nAnswer with" in p1
    assert list(sqa.eval["answer"]) == ["A", "B"]  # the hub's answer index as the option's letter
    assert _score(sqa, ["A", "B. tree"]) == [1.0, 1.0] and _score(sqa, ["B", "tree"]) == [0.0, 0.0]
    tv = tasks["textvqa"]
    assert set(tv.train["answer"]) == {"stop"} and list(tv.eval["answers"][0]) == TEXTVQA_ANSWERS
    # 8 of the 10 humans wrote "stop" (normalised), 2 "stop sign": their VQA accuracies
    assert _score(tv, ["stop", "Stop sign", "a stop sign"]) == [1.0, pytest.approx(0.6), pytest.approx(0.6)]
    geo = tasks["geometry"]
    assert all(p.startswith("<image:") and "Find x" in p and "<image>" not in p for p in geo.eval["prompt"])
    assert _score(geo, ["so x = \\boxed{3}", "\\boxed{5}", "4"])[:2] == [1.0, 0.0]
    assert _score(tasks["clevr"], ["one", "2", "3 cubes"]) == [1.0, 1.0, 0.0]


def test_ctbench_stream_reads_the_release_layout_in_order3(ct_dir):
    tasks = _tasks("stream=ctbench", f"stream.data_dir={ct_dir}")
    assert list(tasks) == list(CTBENCH)
    for name, t in tasks.items():
        has_image = all(p.startswith("<image:") for p in t.eval["prompt"])
        assert has_image == (name not in TEXT_ONLY), name
        gold = [ctbench_solution(name, k) for k in range(3)]
        assert list(t.eval["answer"]) == gold  # SFT trains on the whole solution, reasoning included
        finals = [g.split("</think>")[1] for g in gold]
        assert _score(t, finals) == [1.0, 1.0, 1.0], name
        assert _score(t, [f"<think>{f}</think> something else" for f in finals]) == [0.0, 0.0, 0.0], name


def test_user_data_options_fail_in_one_line(tmp_path):
    rows = [{"q": "Pick one?", "opts": ["x", "y"], "a": "z", "img": None}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 3))
    f = str(tmp_path / "d.jsonl")
    with pytest.raises(DataError, match="neither an option's index, letter nor text"):
        load_user_task("t", f, f, prompt_column="q", answer_column="a", choices_column="opts")
    with pytest.raises(DataError, match="has no image in column 'img'"):
        load_user_task("t", f, f, prompt_column="q", answer_column="a", image_column="img")
    with pytest.raises(DataError, match="must be a non-empty list of answer strings"):
        load_user_task("t", f, f, prompt_column="q", answer_column="a", answers_column="a")
    with pytest.raises(DataError, match="missing_image must be"):
        load_user_task("t", f, f, prompt_column="q", answer_column="a", image_column="img", missing_image="skip")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "i.png")
    (tmp_path / "e.jsonl").write_text(json.dumps({"q": "<image><image>Same?", "a": "yes", "img": "i.png"}))
    with pytest.raises(DataError, match="marks 2 image place"):
        load_user_task("t", str(tmp_path / "e.jsonl"), str(tmp_path / "e.jsonl"), prompt_column="q",
                       answer_column="a", image_column="img")


def test_vision_streams_need_a_vision_model_and_a_data_dir():
    from cl.validate import ConfigError, validate_config

    with pytest.raises(ConfigError, match="need a vision-language model"):
        validate_config(compose_cfg("stream=rft_cpt", "stream.data_dir=/d"))
    with pytest.raises(Exception, match="set stream.data_dir"):
        compose_cfg("model=tiny_vlm", "stream=rft_cpt").stream.tasks[2]["train"]


@pytest.mark.parametrize("stream,objective", [("rft_cpt", "sft"), ("ctbench", "grpo")])
def test_streams_run_end_to_end_on_a_random_tiny_vlm(stream, objective, rft_dir, ct_dir, tmp_path):
    """The full stream on a random tiny LLaVA with the byte-level tokenizer (real text needs it): every
    task trained and evaluated, results in the contract; CTBench mixes text-only and image tasks."""
    data = rft_dir if stream == "rft_cpt" else ct_dir
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cl.run", "model=tiny_vlm", "base=none", "model.arch.tokenizer=byte",
           "model.arch.max_position_embeddings=320", "model.arch.hidden_size=32", "model.arch.num_hidden_layers=1",
           "model.arch.intermediate_size=64", f"stream={stream}", f"stream.data_dir={data}",
           "stream.steps_per_task=2", "stream.batch_size=2", f"objective={objective}", "logger=none",
           f"hydra.run.dir={out}"]
    if objective == "grpo":
        cmd += ["objective.group_size=2", "objective.max_new_tokens=8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    names = RFT_CPT_ORDER if stream == "rft_cpt" else list(CTBENCH)
    assert res["tasks"] == names
    assert len(res["acc_matrix"]) == len(names) and all(len(r) == len(names) for r in res["acc_matrix"])


def test_choice_answers_templates_and_missing_images(tmp_path):
    """Integer answers are option indices and digit strings option text; a template without {choices} gets the
    options after the prompt; a null cell leaves its line out; an empty image list is a missing image; kept
    text-only rows lose their <image> marks; SFT trains on the most frequent normalised VQA answer."""
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "i.png")
    rows = [{"q": "How many?", "opts": ["1", "2", "3"], "a": 0, "hint": None, "img": "i.png"},
            {"q": "<image>How many now?", "opts": ["1", "2", "3"], "a": "3", "hint": "Look.", "img": []}]
    f, g = tmp_path / "d.jsonl", tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    g.write_text(json.dumps({**rows[0], "q": "Count them?"}))
    t = load_user_task("t", str(g), str(f), prompt_column="q", answer_column="a", choices_column="opts",
                       prompt_template="Context: {hint}\n{prompt}\nAnswer with the letter.", image_column="img",
                       missing_image="keep")
    p0, p1 = t.eval["prompt"]
    assert p0.endswith("How many?\nA. 1\nB. 2\nC. 3\nAnswer with the letter.") and "Context" not in p0
    assert p0.startswith("<image:") and p1.startswith("Context: Look.\nHow many now?\nA. 1")
    assert list(t.eval["answer"]) == ["A", "C"]  # index 0; the option whose text is "3"
    with pytest.raises(DataError, match="has no image in column 'img'"):
        load_user_task("t", str(g), str(f), prompt_column="q", answer_column="a", choices_column="opts",
                       image_column="img")
    v = tmp_path / "v.jsonl"
    v.write_text(json.dumps({"q": "Sign?", "answers": ["Stop", "stop.", "STOP", "yield", "yield"]}))
    w = tmp_path / "w.jsonl"
    w.write_text(json.dumps({"q": "Sign now?", "answers": ["go"]}))
    assert load_user_task("v", str(w), str(v), prompt_column="q", answer_column="a", answers_column="answers",
                          verifier="vqa").eval["answer"] == ["Stop"]
