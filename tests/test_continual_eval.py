"""Continual evaluation: leaves training untouched, respects its budget, feeds metrics, plots, reports."""

import json

import pytest
from safetensors.torch import load_file

from analysis.report import main as report_main
from cl.run import run
from tests.conftest import compose_cfg

SMALL = ("experiment=smoke", "stream.steps_per_task=12", "logger=none", "save_final_model=true")


def _run(tmp_path, name, cache_dir, *extra):
    cfg = compose_cfg(*SMALL, f"cache_dir={cache_dir}", *extra)
    return run(cfg, tmp_path / name), tmp_path / name


def test_evaluating_every_step_does_not_change_training(tmp_path, cache_dir):
    every, d1 = _run(tmp_path, "every", cache_dir, "eval.every_n_steps=1")
    bounds, d2 = _run(tmp_path, "bounds", cache_dir)
    w1 = load_file(d1 / "final_model" / "model.safetensors")
    w2 = load_file(d2 / "final_model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert all((w1[k] == w2[k]).all() for k in w1), "evaluation changed the trained weights"
    assert every["acc_matrix"] == bounds["acc_matrix"]
    lines = [json.loads(x) for x in (d1 / "curves.jsonl").read_text().splitlines()]
    points = sorted({x["global_iter"] for x in lines})
    assert points == list(range(0, 25)), points


def test_every_n_steps_gives_points_per_task_and_curve_metrics(tmp_path, cache_dir):
    res, d = _run(tmp_path, "five", cache_dir, "eval.every_n_steps=5", "stream.steps_per_task=30")
    lines = [json.loads(x) for x in (d / "curves.jsonl").read_text().splitlines()]
    for j, task in enumerate(res["tasks"]):
        seen = {x["global_iter"] for x in lines if x["eval_task"] == task and x["kind"] == "stream"}
        assert len(seen) >= 5, (task, seen)
    # the next unseen task is scored inside task 1; general tasks at every point
    assert any(x["kind"] == "future" and not x["boundary"] for x in lines)
    m = res["metrics"]
    for key in ("min_acc", "wc_acc", "wf_50", "wp_50", "wf_150", "wp_150", "lca", "stability_gap",
                "stability_gaps", "forgetting_curve", "forward_kl_tf_mean", "forward_kl_sampled_mean",
                "kl_base_general_final"):
        assert key in m, key
    assert len(res["shift"]) == 2 and res["shift"][1]["forward_kl_tf"] > 0 and "kl_base_prev" in res["shift"][1]
    assert res["shift"][1]["forward_kl_sampled_se"] > 0 and res["shift"][1]["kl_samples"] == 4 * 50
    assert 0 < m["eval_time_fraction"] < 1
    for png in ("curves.png", "acc_matrix.png", "stability_gap.png"):
        assert (d / "plots" / png).stat().st_size > 1000


def test_sample_cap_bounds_intermediate_points_only(tmp_path, cache_dir):
    res, d = _run(tmp_path, "cap", cache_dir, "eval.every_n_steps=4", "eval.max_samples_per_point=40")
    lines = [json.loads(x) for x in (d / "curves.jsonl").read_text().splitlines()]
    inner = {}
    for x in lines:
        if not x["boundary"]:
            inner.setdefault(x["global_iter"], 0)
            inner[x["global_iter"]] += x["n"]
    assert inner and all(total <= 40 for total in inner.values()), inner
    assert all(x["n"] == 50 for x in lines if x["boundary"])


def test_report_puts_two_runs_side_by_side(tmp_path, cache_dir):
    _, d1 = _run(tmp_path, "a", cache_dir, "eval.every_n_steps=4")
    _, d2 = _run(tmp_path, "b", cache_dir, "optimizer.lr=3e-3", "eval.every_n_steps=4")
    report_main([str(d1), str(d2), "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert "lr=0.001" in header and "lr=0.003" in header
    assert "| avg_acc |" in md and "| forgetting |" in md
    for rel in ("run0/curves.png", "run1/matrix.png", "run1/stability_gap.png", "forgetting_vs_kl.png"):
        assert (tmp_path / "rep" / rel).exists(), rel
        assert rel in md


def test_report_on_a_non_run_directory_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        report_main([str(tmp_path)])


def test_answer_token_kl_is_zero_for_identical_models_and_positive_otherwise(tiny_model_dir):
    import copy

    import torch

    from cl.core.data import PromptFormat
    from cl.model import load_model_and_tokenizer
    from cl.shift import answer_token_kl

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    fmt = PromptFormat(tok)
    pairs = fmt.encode(["A2:12+34=", "C:abcdef="], ["046", "abcdef"])
    assert answer_token_kl(model, model, pairs, fmt.pad_id) == pytest.approx(0.0, abs=1e-7)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert answer_token_kl(model, other, pairs, fmt.pad_id) > 1e-4


def test_boundaries_score_the_inner_points_items_too_so_gaps_compare_like_items(tiny_model_dir, tmp_path):
    from cl.continual_eval import ContinualEvaluator
    from cl.core.data import PromptFormat
    from cl.evaluation import EvalSet, Scorer
    from cl.model import load_model_and_tokenizer
    from tasks.registry import build_task

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    fmt = PromptFormat(tok)
    sets = [EvalSet.build(build_task(n, 20, 60, 0), fmt, 60, 0) for n in ("add2", "sub2", "mul21")]
    class ItemScorer(Scorer):  # a score that is a fixed function of the item: what matters is which items
        def item_scores(self, model, sets):
            return [[float(sum(p) % 2) for p, _ in es.pairs] for es in sets]

    ev = ContinualEvaluator(ItemScorer(fmt), sets, [EvalSet.build(build_task("copy6", 20, 60, 0), fmt, 60, 0)],
                            tmp_path / "curves.jsonl", max_samples_per_point=60)
    assert (ev.inner_items(0), ev.inner_items(1)) == (20, 15)  # 60 items over 2+1 and 3+1 sets
    ev.evaluate(model, 10, 0, "add2", boundary=True)   # the end of task 0
    ev.evaluate(model, 15, 1, "sub2", boundary=False)  # an inner point of task 1, same weights
    lines = [json.loads(x) for x in (tmp_path / "curves.jsonl").read_text().splitlines()]
    b = next(x for x in lines if x["boundary"] and x["eval_task"] == "add2")
    inner = next(x for x in lines if not x["boundary"] and x["eval_task"] == "add2")
    assert b["n"] == 60 and inner["n"] == 15 and set(b["acc_at"]) == {"20", "15"}
    assert b["acc_at"]["15"] == pytest.approx(inner["acc"])  # the same items, the same model: the same value
    assert 0 < inner["acc"] < 1 and b["acc_at"]["20"] != b["acc_at"]["15"]
    assert all("acc_at" not in x for x in lines if x["kind"] == "general")


def test_sampled_forward_kl_estimates_the_exact_kl_over_pi0s_samples(tiny_model_dir):
    import copy

    import torch

    from cl.core.data import PromptFormat
    from cl.evaluation import EvalSet
    from cl.model import load_model_and_tokenizer
    from cl.shift import DistributionShiftProbe, sequence_logprobs
    from tasks.registry import build_task

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    fmt = PromptFormat(tok)
    es = EvalSet.build(build_task("add2", 20, 10, 0), fmt, 2, 0)
    evaluator = type("E", (), {"stream": [es], "general": []})()
    probe = DistributionShiftProbe(evaluator, fmt, n_items=2, samples=3000,
                                   objective=type("O", (), {"max_new_tokens": 1})(), seed=3)
    module = type("M", (), {"model": model, "global_iter": 0})()
    ctx = type("C", (), {"module": module, "task_idx": 0})()
    probe.on_task_start(ctx)
    with torch.no_grad():  # training moves the model away from pi_0
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    pi0 = probe.task_samples
    probe.on_task_end(ctx)
    rec = probe.records[0]
    # sequence log-probs against a token-by-token computation without padding
    ref = copy.deepcopy(model)
    (p0, c0), = pi0["pairs"][:1]
    logits = ref(input_ids=torch.tensor([p0 + c0])).logits[0]
    by_hand = sum(torch.log_softmax(logits[len(p0) - 1 + t], -1)[c].item() for t, c in enumerate(c0))
    assert sequence_logprobs(model, pi0["pairs"][:1], fmt.pad_id).item() == pytest.approx(by_hand, abs=1e-4)
    mixed = fmt.encode(["A2:1+2=", "C:abcdef=", "A2:10+20="], ["3", "abcdef", "30"])  # a padded batch
    alone = torch.cat([sequence_logprobs(model, [p], fmt.pad_id) for p in mixed])
    assert torch.allclose(sequence_logprobs(model, mixed, fmt.pad_id), alone, atol=1e-4)
    # one-token completions: the exact KL(pi_0 || pi) over the first token, per prompt, averaged
    exact = []
    for prompt, _ in es.pairs[:2]:
        model_state = {n: p.clone() for n, p in model.state_dict().items()}
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
            for n, p in model.named_parameters():  # back to pi_0 for its distribution
                p.sub_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            lp0 = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
            model.load_state_dict(model_state)
        exact.append((lp0.exp() * (lp0 - lp)).sum().item())
    expected = sum(exact) / len(exact)
    assert rec["kl_samples"] == 6000 and rec["forward_kl_sampled_se"] > 0
    assert abs(rec["forward_kl_sampled"] - expected) < 4 * rec["forward_kl_sampled_se"], (rec, expected)
    assert rec["forward_kl_sampled"] > 10 * rec["forward_kl_sampled_se"]  # a real shift, clearly measured
