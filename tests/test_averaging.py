"""Averaging and merging: endpoint, equivalence and normalisation invariants."""

import copy

import pytest
import torch

from cl.averaging import Averaging, ama_alphas, block_of, check_blocks, snapshot
from cl.core.data import PromptFormat
from cl.loop import TaskContext
from cl.model import load_model_and_tokenizer
from cl.objectives.sft import SFTObjective
from tasks.registry import build_task
from cl.core.components import Component


def _setup(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    task = build_task("add2", 100, 10, 0)
    module = type("M", (), {"model": model, "objective": SFTObjective(), "global_iter": 0})()
    return model, PromptFormat(tok), TaskContext(0, task, module, [task])


def _train_a_bit(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _average(model, ctx, **kw):
    avg = Averaging(log_unaveraged=False, **kw)
    avg.on_task_start(ctx)
    start = snapshot(model)
    _train_a_bit(model)
    end = snapshot(model)
    avg.on_task_end(ctx)
    return start, end, snapshot(model), avg


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wise_endpoints_are_bit_exact(tiny_model_dir, alpha):
    model, fmt, ctx = _setup(tiny_model_dir)
    start, end, got, _ = _average(model, ctx, kind="wise", alpha=alpha)
    want = end if alpha == 0 else start
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_wise_interpolates_and_partwise_with_equal_alphas_equals_wise(tiny_model_dir):
    model, fmt, ctx = _setup(tiny_model_dir)
    m2 = copy.deepcopy(model)
    start, end, wise, _ = _average(model, ctx, kind="wise", alpha=0.3)
    for n in start:
        torch.testing.assert_close(wise[n], 0.3 * start[n] + 0.7 * end[n])
    ctx2 = TaskContext(0, ctx.task, type("M", (), {"model": m2, "objective": SFTObjective(), "global_iter": 0})(),
                       ctx.stream)
    _, _, part, _ = _average(m2, ctx2, kind="partwise", alpha=0.3, blocks=[0, 1, 2], block_alphas=[0.3, 0.3])
    assert all(torch.equal(part[n], wise[n]) for n in wise)


def test_partwise_uses_block_alphas_inside_blocks_and_global_alpha_outside(tiny_model_dir):
    model, fmt, ctx = _setup(tiny_model_dir)
    start, end, got, _ = _average(model, ctx, kind="partwise", alpha=0.5, blocks=[0, 1, 2], block_alphas=[0.0, 1.0])
    for n in start:
        k = block_of(n, [0, 1, 2])
        want = {None: 0.5 * start[n] + 0.5 * end[n], 0: end[n], 1: start[n]}[k]
        torch.testing.assert_close(got[n], want)


def test_block_boundaries_must_cover_the_layers():
    check_blocks([0, 1, 2], 2)
    for bad in ([0, 1], [1, 2], [0, 2, 1, 2], [0]):
        with pytest.raises(ValueError, match="blocks"):
            check_blocks(bad, 2)


def test_ama_alphas_keep_their_mean_and_stay_in_range():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = 3 * torch.randn(6, generator=g)
        a = ama_alphas(logits, 0.2, 0.2)
        assert a.mean().item() == pytest.approx(0.2, abs=1e-6)
        assert (a >= 0).all() and (a <= 1).all()


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_ama_learns_and_bakes_per_block_alphas(tiny_model_dir, objective):
    model, fmt, ctx = _setup(tiny_model_dir)
    if objective == "grpo":  # reward-filtered samples: accept everything the model writes
        from tasks.base import Task

        ctx.module.objective = type("O", (), {"name": "grpo", "max_new_tokens": 4})()
        ctx.task = Task("add2", ctx.task.train, ctx.task.eval, lambda c, **_: [1.0] * len(c))
    ama = {"alpha0": 0.3, "eps": 0.2, "lr": 0.5, "reg": 1e-4, "steps": 5, "n_samples": 16, "batch_size": 8}
    start, end, got, avg = _average(model, ctx, kind="ama", fmt=fmt, ama=ama)  # global alpha: 0.2 (default)
    alphas = avg.records[0]["ama_alphas"]
    assert len(alphas) == 2 and sum(alphas) / 2 == pytest.approx(0.3, abs=1e-5) and alphas != [0.3, 0.3]
    for n in start:  # tensors outside the blocks (embeddings, final norm) take alpha0, not the global alpha
        k = block_of(n, [0, 1, 2])
        a = 0.3 if k is None else alphas[k]
        torch.testing.assert_close(got[n], a * start[n] + (1 - a) * end[n])


def test_ema_with_decay_zero_equals_the_current_weights_and_merges(tiny_model_dir):
    model, fmt, ctx = _setup(tiny_model_dir)
    avg = Averaging("ema", ema_decay=0.0, log_unaveraged=False)
    avg.on_task_start(ctx)
    _train_a_bit(model)
    avg.callbacks()[0].on_train_batch_end(None, ctx.module)
    now = snapshot(model)
    _train_a_bit(model, seed=2)  # not followed by an EMA update: the task-end swap restores the EMA
    avg.on_task_end(ctx)
    assert all(torch.equal(snapshot(model)[n], now[n]) for n in now)


@pytest.mark.parametrize("how", ["mean", "magmax"])
def test_task_vector_merges(tiny_model_dir, how):
    model, fmt, ctx = _setup(tiny_model_dir)
    avg = Averaging("merge", merge=how, log_unaveraged=False)
    base = snapshot(model)
    taus = []
    for t in range(2):
        avg.on_task_start(ctx)
        s = snapshot(model)
        _train_a_bit(model, seed=10 + t)
        taus.append({n: w - s[n] for n, w in snapshot(model).items()})
        avg.on_task_end(ctx)
    got = snapshot(model)
    for n in base:
        stack = torch.stack([taus[0][n], taus[1][n]])
        want = stack.mean(0) if how == "mean" else stack.gather(0, stack.abs().argmax(0, keepdim=True))[0]
        torch.testing.assert_close(got[n], base[n] + want)


def _adapted_stream(tiny_model_dir, adapter_cfg, alpha):
    from functools import partial

    from cl.adapters import make_adapter
    from cl.continual_eval import ContinualEvaluator
    from cl.evaluation import EvalSet, Scorer
    from cl.loop import run_stream
    from cl.module import ContinualLM
    from cl.run import task_loader

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    fmt = PromptFormat(tok)
    tasks = [build_task(n, 100, 20, 0) for n in ("add2", "sub2")]
    ev = ContinualEvaluator(Scorer(fmt), [EvalSet.build(t, fmt, 8, 0) for t in tasks], [],
                            tiny_model_dir.parent / "curves.jsonl")
    adapter = make_adapter(adapter_cfg, seed=0)
    model = adapter.setup(model)
    module = ContinualLM(model, SFTObjective(), partial(torch.optim.AdamW, lr=1e-2))
    avg = Averaging("wise", alpha=alpha, log_unaveraged=False)
    seen = []

    class Probe(Component):  # records what averaging saw and produced around each task end
        def on_task_start(self, ctx):
            seen.append(("start", snapshot(ctx.module.model)))

        def on_task_end(self, ctx):
            seen.append(("end", snapshot(ctx.module.model)))

    run_stream(module, tasks, tasks, task_loader(fmt, 4, 3, 0), ev,
               {"accelerator": "cpu", "devices": 1, "precision": "32-true"}, 3, components=[adapter, Probe(), avg])
    return module, seen


def test_with_merged_lora_averaging_acts_on_the_merged_weights(tiny_model_dir):
    # adapter hook first: the task's LoRA is merged into the base, then alpha = 1 undoes the whole task
    module, seen = _adapted_stream(tiny_model_dir, {"name": "lora", "r": 4, "alpha": 8, "merge_after_task": True}, 1.0)
    (_, start), (_, end), (_, next_start) = seen[:3]
    base_keys = [n for n in start if "lora_" not in n]
    assert any(not torch.equal(end[n], start[n]) for n in base_keys)  # the merge changed the base ...
    assert all(torch.equal(next_start[n], start[n]) for n in base_keys)  # ... and alpha = 1 undid it exactly


def test_with_unmerged_lora_averaging_acts_on_the_adapter_matrices(tiny_model_dir):
    module, seen = _adapted_stream(tiny_model_dir, {"name": "lora", "r": 4, "alpha": 8}, 0.5)
    (_, start), (_, end), (_, next_start) = seen[:3]
    lora = [n for n in start if "lora_A" in n or "lora_B" in n]
    assert lora and any(not torch.equal(start[n], end[n]) for n in lora)
    for n in lora:  # A and B are each interpolated (so B A is not a linear interpolation of the updates)
        torch.testing.assert_close(next_start[n], 0.5 * start[n] + 0.5 * end[n])
    assert all(torch.equal(next_start[n], start[n]) for n in start if "lora_" not in n)  # the base never trains
