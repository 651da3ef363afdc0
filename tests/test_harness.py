"""General capability through lm-evaluation-harness on the model in memory (``general_eval=lm_eval``),
offline: a custom harness task whose data is a JSONL file in tests/fixtures, on a tiny random Qwen2."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, run_cli

pytest.importorskip("lm_eval")

FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"


def _loglik(model, tok, context: str, continuation: str) -> float:
    """sum log p(continuation | context), tokenized as one string (the char tokenizer splits exactly)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0]
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_harness_scores_the_model_in_memory_as_it_is_now(tiny_qwen, monkeypatch):
    """The harness's per-choice log-likelihoods equal the model's own (computed directly) before and after
    the weights change in place, its accuracy is the argmax over them, and the same items are scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cl.harness import HarnessSettings, LmEvalGeneral

    monkeypatch.chdir(ROOT)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen).train()
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    harness = LmEvalGeneral(HarnessSettings(tasks=["toy_choice"], include_path=str(FIXTURES), limit=10,
                                            batch_size=4), tok)
    assert harness.names == ["lm_eval:toy_choice"]
    seen = []
    for _ in range(2):
        point = harness.evaluate(model)
        assert model.training  # mode restored
        assert point.items == {"lm_eval:toy_choice": 10} and point.metric["lm_eval:toy_choice"] == "acc_norm,none"
        samples = sorted(point.samples["toy_choice"], key=lambda s: s["doc_id"])
        seen.append([s["doc_id"] for s in samples])
        model.eval()
        for s in samples:
            got = [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in s["resps"]]
            want = [_loglik(model, tok, *a.args if hasattr(a, "args") else a) for a in s["arguments"]]
            assert got == pytest.approx(want, abs=1e-4)
            assert s["acc"] == float(max(range(len(got)), key=got.__getitem__) == s["target"])
        acc = sum(s["acc"] for s in samples) / len(samples)
        assert point.scores["lm_eval:toy_choice"] == pytest.approx(
            sum(s["acc_norm"] for s in samples) / len(samples)) and 0 <= acc <= 1
        model.train()
        with torch.no_grad():  # "training" between two points: the next point must see these weights
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
    assert seen[0] == seen[1] == list(range(10))


def test_unknown_harness_task_is_one_line():
    from transformers import AutoTokenizer  # noqa: F401

    from cl.harness import HarnessSettings, LmEvalGeneral

    with pytest.raises(ValueError, match="unknown harness task.*no_such_task"):
        LmEvalGeneral(HarnessSettings(tasks=["no_such_task"], include_path=str(FIXTURES)), None)


def test_a_run_scores_harness_tasks_as_general_columns_at_every_boundary(cache_dir, tmp_path):
    """`experiment=smoke general_eval=lm_eval` with the fixture task, offline on the embedded model: the
    harness task is a general column next to the probes (base row and one row per task), in the curves at
    the boundaries only, and in general retention."""
    out = tmp_path / "run"
    proc = run_cli("experiment=smoke", "stream.steps_per_task=4", "eval.every_n_steps=2", "general_eval=lm_eval",
                   "general_eval.tasks=[toy_choice]", f"general_eval.include_path={FIXTURES}", "general_eval.limit=6",
                   f"hydra.run.dir={out}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed"
    assert res["general_tasks"] == ["copy6", "add2", "lm_eval:toy_choice"]
    assert len(res["general_base"]) == 3 and len(res["general_matrix"]) == 2
    assert all(len(row) == 3 and all(0.0 <= x <= 1.0 for x in row) for row in res["general_matrix"])
    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    harness = [c for c in curves if c["eval_task"] == "lm_eval:toy_choice"]
    assert [c["global_iter"] for c in harness] == [0, 4, 8] and all(c["boundary"] for c in harness)
    assert all(c["kind"] == "general" and c["n"] == 6 and c["metric"] == "acc_norm,none" for c in harness)
    assert any(not c["boundary"] for c in curves)  # inner points happened, without the harness
    assert "general_retention" in res["metrics"]


def test_harness_with_several_processes_is_refused_in_one_line():
    from cl.validate import ConfigError, validate_config
    from omegaconf import OmegaConf

    from tests.conftest import compose_cfg

    cfg = compose_cfg("general_eval=lm_eval", "trainer=ddp_cpu")
    with pytest.raises(ConfigError, match="general_eval=lm_eval scores in one process"):
        validate_config(OmegaConf.to_container(cfg, resolve=False))


def test_few_shot_prompts_are_the_same_at_every_point(tiny_qwen, monkeypatch):
    """With few-shot examples the harness draws them again at each point; the draw restarts from
    fewshot_seed every time, so every point scores the same prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cl.harness import HarnessSettings, LmEvalGeneral

    monkeypatch.chdir(ROOT)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    harness = LmEvalGeneral(HarnessSettings(tasks=["toy_choice"], include_path=str(FIXTURES), limit=4,
                                            num_fewshot=2), tok)
    contexts = []
    for _ in range(3):
        samples = sorted(harness.evaluate(model).samples["toy_choice"], key=lambda s: s["doc_id"])
        contexts.append([s["arguments"][0][0] for s in samples])
    assert contexts[0] == contexts[1] == contexts[2]
    docs = [json.loads(line) for line in (FIXTURES / "toy_choice.jsonl").read_text().splitlines()]
    assert all(ctx.count("=") == 3 for ctx in contexts[0])  # two solved examples before each question
    assert [ctx.endswith(d["question"]) for ctx, d in zip(contexts[0], docs)] == [True] * 4
