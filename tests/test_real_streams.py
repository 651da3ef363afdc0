"""Real streams from local copies in the real schema (tests/fixtures): stream=trace (TRACE's eight tasks and
their metrics) and stream=math (GSM8K -> MATH, math-verify answers), scored exactly as the metric libraries
score the same pairs."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, compose_cfg

pytest.importorskip("rouge_score")
pytest.importorskip("math_verify")

FIX = ROOT / "tests" / "fixtures"
TRACE_ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]


def _tasks(*overrides):
    from tasks.stream import build_tasks

    cfg = compose_cfg(*overrides)
    return {t.name: t for t in build_tasks(list(cfg.stream.tasks), 10, 10, cfg.data.seed)}, cfg


def test_trace_loads_its_eight_tasks_and_scores_them_with_the_benchmarks_metrics():
    from rapidfuzz.fuzz import ratio
    from rouge_score.rouge_scorer import RougeScorer

    from tasks.verifiers import sari_sentence

    tasks, cfg = _tasks("stream=trace", f"stream.data_dir={FIX / 'trace'}")
    assert list(tasks) == TRACE_ORDER == [t["name"] for t in cfg.stream.tasks]
    for name, task in tasks.items():
        assert len(task.train) == 2 and len(task.eval) == 1, name
        assert set(task.train["prompt"]).isdisjoint(task.eval["prompt"])
    cols = lambda t: {k: t.eval[k] for k in t.eval.column_names}  # noqa: E731
    for name in ("C-STANCE", "FOMC", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds"):
        t = tasks[name]
        assert t.score([t.eval["answer"][0]], **cols(t)) == [1.0]
        assert t.score(["Z"], **cols(t)) == [0.0]
    t = tasks["MeetingBank"]
    ref, out = t.eval["answer"][0], "Park hours were extended until 10."
    assert t.score([out], **cols(t)) == [pytest.approx(RougeScorer(["rougeL"]).score(ref, out)["rougeL"].fmeasure)]
    t = tasks["Py150"]
    ref, out = t.eval["answer"][0], "print ( i , j )"
    assert t.score([out], **cols(t)) == [pytest.approx(ratio(out, ref) / 100)]
    t = tasks["20Minuten"]
    src, ref, out = t.eval["prompt"][0], t.eval["answer"][0], "Die Schule ist zu."
    assert t.score([out], **cols(t)) == [pytest.approx(sari_sentence(src, out, [ref]))]
    assert 0 < t.score([out], **cols(t))[0] < t.score([ref], **cols(t))[0]


def test_math_stream_extracts_final_answers_and_scores_by_math_verify():
    from math_verify import parse, verify

    tasks, _ = _tasks("stream=math", f"stream.data_dir={FIX / 'math'}")
    assert list(tasks) == ["gsm8k", "math"]
    gsm, mth = tasks["gsm8k"], tasks["math"]
    assert list(gsm.eval["final"]) == ["18", "3"] and list(mth.eval["final"]) == ["8", r"\frac{3}{4}"]
    assert all(p.endswith(r"put your final answer within \boxed{}.") for p in list(gsm.train["prompt"]) + list(mth.eval["prompt"]))
    assert gsm.train["answer"][0].endswith("#### 72")  # SFT trains on the whole reference solution
    cols = lambda t: {k: t.eval[k] for k in t.eval.column_names}  # noqa: E731
    outs = [r"She sells 9 eggs for \$2 each, so she makes \boxed{18} dollars.", "The total is 4 bolts."]
    assert gsm.score(outs, **cols(gsm)) == [1.0, 0.0]
    outs = [r"$7 + 1 = \boxed{8}$", r"so it is \boxed{0.75}"]
    want = [float(verify(parse(f"${f}$"), parse(o))) for f, o in zip(mth.eval["final"], outs)]
    assert mth.score(outs, **cols(mth)) == want == [1.0, 1.0]
    assert mth.score([r"\boxed{\frac{2}{3}}", "no answer"], **cols(mth)) == [0.0, 0.0]


def test_presets_name_the_hub_or_a_local_directory():
    cfg = compose_cfg("stream=math")
    assert [t["train"] for t in cfg.stream.tasks] == ["hub:openai/gsm8k@main", "hub:DigitalLearningGmbH/MATH-lighteval"]
    cfg = compose_cfg("stream=math", "stream.data_dir=/data/m")
    assert cfg.stream.tasks[1]["eval"] == "/data/m/math/test.jsonl"


def test_a_missing_copy_or_a_schema_typo_fails_in_one_line(tmp_path, monkeypatch):
    from tasks.user_data import DataError

    monkeypatch.delenv("TRACE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/TRACE/C-STANCE/train.json: file does not exist"):
        _tasks("stream=trace")
    with pytest.raises(DataError, match=r"row 1 has no column 'problem'"):
        _tasks("stream=math", f"stream.data_dir={FIX / 'math'}", "stream.tasks.1.prompt_column=problem",
               "stream.tasks.0.prompt_column=problem")


@pytest.mark.parametrize("exp", ["real_math_sft", "real_math_grpo", "real_trace_sft", "real_trace_grpo"])
def test_real_presets_compose_and_start_on_a_tiny_model_of_their_architecture(exp, tiny_qwen_bytes, tmp_path):
    """Each real preset with its own hyperparameters, on a tiny random Qwen2 (byte-level tokenizer) and the
    fixture copies of its data, on the CPU: one step per task, the HF rollouts instead of vLLM."""
    from cl.run import run

    data = FIX / ("math" if "math" in exp else "trace")
    rl = ["objective.max_new_tokens=4", "objective.group_size=2", "objective.rollout_backend=hf"] if "grpo" in exp else []
    harness = ["general_eval.tasks=[toy_choice]", f"general_eval.include_path={FIX / 'lm_eval'}",
               "general_eval.limit=3"] if exp == "real_math_sft" else ["general_eval=toy"]
    cfg = compose_cfg(f"experiment={exp}", f"model.name_or_path={tiny_qwen_bytes}", f"stream.data_dir={data}",
                      "trainer=cpu", "logger=none", "shift=none", "stream.steps_per_task=1", "stream.batch_size=2",
                      "train.warmup_steps=0", "eval.n_per_task=2", "eval.every_n_steps=null",
                      "eval.max_new_tokens=4", *rl, *harness)
    assert cfg.optimizer.lr == (1e-6 if "grpo" in exp else 1e-5) and cfg.train.decay == "cosine"
    if "grpo" in exp:
        assert cfg.objective.kl_coef == 0.01 and cfg.objective.reference == "task_start"
    res = run(cfg, tmp_path / exp)
    assert res["status"] == "completed", res.get("status")
    assert res["tasks"] == (["gsm8k", "math"] if "math" in exp else TRACE_ORDER)
    if exp == "real_math_sft":
        assert res["general_tasks"] == ["lm_eval:toy_choice"] and len(res["general_matrix"]) == 2


def test_real_check_runs_the_math_preset_on_a_random_model_and_reports_speed(tmp_path):
    """scripts/real_check.py (gpu_check.sh's real-scale step) on the CPU with the tiny shape: the preset runs
    end to end with the harness probe, and the summary has the numbers it prints."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "scripts/real_check.py", "--size", "tiny", "--device", "cpu", "--steps", "1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["tokens_generated"] > 0 and s["train_tokens_per_s"] > 0 and 0 < s["eval_time_fraction"] < 1
    assert s["general_tasks"] == ["lm_eval:toy_choice"] and len(s["acc_matrix"]) == 2
    assert "train_tokens_per_s:" in proc.stdout
