"""Replay buffers, schedules, mixing, GeRe losses, regularizers and meta-replay: invariants."""

import copy
from functools import partial

import pytest
import torch

from cl.continual_eval import ContinualEvaluator
from cl.core.data import PromptFormat
from cl.evaluation import EvalSet, Scorer
from cl.loop import TaskContext, run_stream
from cl.model import load_model_and_tokenizer
from cl.module import ContinualLM
from cl.objectives.sft import SFTObjective
from cl.run import task_loader
from replay.buffers import ReservoirBuffer, TaskBalancedBuffer
from replay.gere import GeneralReplay, tm_loss
from replay.meta import KFPF, ReptileInterpolation
from replay.mixing import ExperienceReplay, MixedBatchSampler
from replay.regularizers import EWC, KLDistill, L2Anchor
from replay.schedules import item_weights, replay_fraction, task_weight
from tasks.registry import build_task

TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "gradient_clip_val": 1.0}


def _rows(task, n):
    return [{"prompt": f"{task}{i}", "answer": str(i), "task": task} for i in range(n)]


# -- buffers -----------------------------------------------------------------------------------------------
def test_reservoir_never_exceeds_capacity_and_is_a_uniform_sample():
    n, k, trials = 100, 10, 3000
    counts = [0] * n
    for s in range(trials):
        buf = ReservoirBuffer(k, seed=s)
        for i, r in enumerate(_rows("a", n)):
            buf.add(r)
            assert len(buf) == min(i + 1, k)
        for r in buf.items:
            counts[int(r["answer"])] += 1
    expected = trials * k / n
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    # 99 degrees of freedom: the 0.999 quantile is 148.2; a biased sampler (e.g. keep-first) gives ~27000
    assert chi2 < 148.2, chi2
    early, late = sum(counts[:50]), sum(counts[50:])
    assert abs(early - late) / (early + late) < 0.03


def test_task_balanced_quotas_hold():
    buf = TaskBalancedBuffer(10, seed=0)
    buf.extend(_rows("a", 50))
    assert buf.tasks().count("a") == 10
    buf.extend(_rows("b", 50))
    assert buf.tasks().count("a") == 5 and buf.tasks().count("b") == 5
    buf.extend(_rows("c", 2))  # a small task keeps all it has; quotas are 4/3/3
    counts = {t: buf.tasks().count(t) for t in "abc"}
    assert counts == {"a": 4, "b": 3, "c": 2} and len(buf) <= 10
    assert buf.quotas() == {"a": 4, "b": 3, "c": 3}


@pytest.mark.parametrize("cls", [ReservoirBuffer, TaskBalancedBuffer])
def test_buffer_state_round_trip_continues_identically(cls):
    import json

    a = cls(8, seed=3)
    a.extend(_rows("a", 30))
    b = cls(8, seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # survives a JSON round trip
    assert b.items == a.items
    a.extend(_rows("b", 30))
    b.extend(_rows("b", 30))
    assert b.items == a.items
    with pytest.raises(ValueError, match="capacity"):
        cls(9).load_state_dict(a.state_dict())


def test_zero_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(0)
    with pytest.raises(ValueError, match="fraction"):
        ExperienceReplay(fraction=1.0)


# -- schedules and mixing ----------------------------------------------------------------------------------
def test_schedules():
    assert task_weight(1, "power_law", 0.5) == pytest.approx(2 ** -0.5)
    assert task_weight(3, "exponential", rate=1.0) == pytest.approx(torch.exp(torch.tensor(-3.0)).item())
    order = {"a": 0, "b": 1}
    # 9 items of a, 1 of b: uniform over tasks gives each task half the mass whatever the buffer holds
    w = item_weights(["a"] * 9 + ["b"], order, current=2, schedule="uniform")
    assert sum(w[:9]) == pytest.approx(0.5) and w[9] == pytest.approx(0.5)
    w = item_weights(["a", "b"], order, current=2, schedule="power_law", exponent=1.0)
    assert w[0] / w[1] == pytest.approx((2 + 1) ** -1 / (1 + 1) ** -1)  # a is older: less replay
    assert replay_fraction(0, 100, 0.2, "warmup", 10) == pytest.approx(0.02)
    assert replay_fraction(50, 100, 0.2, "decay") == pytest.approx(0.1)
    assert replay_fraction(7, 100, 0.2) == 0.2


def test_mixed_batches_have_the_fraction_and_only_past_rows():
    s = MixedBatchSampler(100, [0.5, 0.5, 0, 0], steps=20, batch_size=16, fraction_at=lambda _: 0.25, seed=0)
    batches = list(s)
    assert len(batches) == 20 and all(len(b) == 16 for b in batches)
    for b in batches:
        assert sum(i >= 100 for i in b) == 4 and all(i in (100, 101) for i in b if i >= 100)


def _stream_setup(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    model.train()
    fmt = PromptFormat(tok)
    tasks = [build_task(n, 200, 20, 0) for n in ("add2", "sub2")]
    ev = ContinualEvaluator(Scorer(fmt), [EvalSet.build(t, fmt, 10, 0) for t in tasks], [],
                            tiny_model_dir.parent / "curves.jsonl")
    return model, fmt, tasks, ev


def _train(model, fmt, tasks, ev, components, steps=6, objective=None, replay=None):
    pl_logging = __import__("logging").getLogger("pytorch_lightning")
    pl_logging.setLevel(40)
    objective = objective or SFTObjective()
    module = ContinualLM(model, objective, partial(torch.optim.AdamW, lr=1e-3),
                         loss_components=components)
    torch.manual_seed(0)
    run_stream(module, tasks, tasks, task_loader(fmt, 8, steps, 0, objective.collate_fn(fmt.pad_id), replay), ev,
               TRAINER, steps, components=components)
    return module


def test_replay_fraction_zero_is_bit_identical_to_no_replay(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    plain = _train(copy.deepcopy(model), fmt, tasks, ev, [])
    er = ExperienceReplay(fraction=0.0, capacity=50)
    with_zero = _train(copy.deepcopy(model), fmt, tasks, ev, [er], replay=er)
    assert len(er.buffer) == 50  # the buffer was filled, and still nothing changed
    for (n, a), (_, b) in zip(plain.model.state_dict().items(), with_zero.model.state_dict().items()):
        assert torch.equal(a, b), n
    er = ExperienceReplay(fraction=0.25, capacity=50)
    with_replay = _train(copy.deepcopy(model), fmt, tasks, ev, [er], replay=er)
    assert er.replayed == 6 * 2  # task 2 only: 6 steps x round(0.25 * 8)
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                     with_replay.model.state_dict().values()))


def test_grpo_replayed_prompts_are_rolled_out_and_rewarded_with_their_own_verifier(tiny_model_dir):
    from cl.objectives.grpo import GRPOObjective

    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    er = ExperienceReplay(fraction=0.5, capacity=50)
    er.on_task_end(TaskContext(0, tasks[0], None, tasks))
    obj = GRPOObjective(group_size=2, max_new_tokens=4, kl_coef=0.0)
    obj.bind(fmt, {t.name: t for t in tasks})
    batch = next(iter(task_loader(fmt, 8, 1, 0, obj.collate_fn(fmt.pad_id), er)(tasks[1], 1)))
    assert [r["task"] for r in batch["rows"]].count("add2") == 4
    ro = obj.rollout(type("M", (), {"model": model})(), batch)
    assert "add2/reward" in ro.logs and "sub2/reward" in ro.logs and ro.input_ids.size(0) == 16


# -- GeRe --------------------------------------------------------------------------------------------------
def test_tm_loss_is_zero_at_the_recorded_states_and_positive_across_a_threshold():
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(2, 5, 8, generator=g)
    mask = torch.ones(2, 5)
    mu, sigma = h0.reshape(-1, 8).mean(0), h0.reshape(-1, 8).std(0)
    pos, neg = mu + sigma, mu - sigma
    assert tm_loss(h0, h0, pos, neg, mask).item() == 0.0
    i = (h0 >= pos).nonzero()[0]  # a positive element pushed below its threshold
    h = h0.clone()
    h[tuple(i)] = pos[i[-1]] - 1.0
    assert tm_loss(h, h0, pos, neg, mask).item() == pytest.approx(1.0)
    mask[tuple(i[:2])] = 0  # ... unless it is padding
    assert tm_loss(h, h0, pos, neg, mask).item() == 0.0


@pytest.mark.parametrize("loss", ["ce", "kl", "l1", "l2", "tm"])
def test_gere_terms(tiny_model_dir, loss):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    rows = build_task("copy6", 50, 10, 0).train.to_list()
    gere = GeneralReplay(fmt, rows, loss=loss, batch_size=4)
    module = type("M", (), {"model": model})()
    gere.on_task_start(type("C", (), {"module": module})())
    term, logs = gere.extra_loss(module, {}, torch.tensor(2.0))
    if loss in ("kl", "l1", "l2"):  # the model has not moved from the recorded one
        assert term.item() == pytest.approx(0.0, abs=1e-6)
    else:
        assert term.item() > 0
    term.backward()
    if loss in ("l1", "l2", "kl"):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        moved, _ = gere.extra_loss(module, {}, torch.tensor(2.0))
        assert moved.item() > 1e-6


def _moved(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_gere_tm_weight_is_never_negative_and_can_be_fixed(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    rows = build_task("copy6", 50, 10, 0).train.to_list()
    module = type("M", (), {"model": model})()
    gere = GeneralReplay(fmt, rows, loss="tm", batch_size=4, seed=3)
    gere.on_task_start(type("C", (), {"module": module})())
    _moved(model, 0.2)
    # an RL objective's loss can be negative: CE + loss < 0 must not flip the TM term into a reward
    term, logs = gere.extra_loss(module, {}, torch.tensor(-50.0))
    assert logs["gere/tm"].item() > 0 and logs["gere/tm_weight"].item() == 0.0
    assert term.item() == pytest.approx(logs["gere/ce"].item(), rel=1e-6)
    fixed = GeneralReplay(fmt, rows, loss="tm", batch_size=4, tm_weight=100.0, seed=3)
    fixed.h0, fixed.pos, fixed.neg = gere.h0, gere.pos, gere.neg
    term, logs = fixed.extra_loss(module, {}, torch.tensor(-50.0))
    assert logs["gere/tm_weight"].item() == 100.0
    assert term.item() == pytest.approx(logs["gere/ce"].item() + 100.0 * logs["gere/tm"].item(), rel=1e-5)


def test_gere_tm_loss_against_an_elementwise_computation():
    g = torch.Generator().manual_seed(1)
    h0, h = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    pos, neg = torch.tensor([0.5, 0.2, 0.8]), torch.tensor([-0.5, -0.3, -0.1])
    total, nonzero = 0.0, 0
    for b in range(2):
        for t in range(4):
            for d in range(3):
                if not mask[b, t]:
                    continue
                x, x0, p, n = h[b, t, d].item(), h0[b, t, d].item(), pos[d].item(), neg[d].item()
                v = max(0, p - x) if x0 >= p else (max(0, x - n) if x0 <= n else max(0, x - p) + max(0, n - x))
                total, nonzero = total + v, nonzero + (v > 0)
    assert tm_loss(h, h0, pos, neg, mask).item() == pytest.approx(total / nonzero, rel=1e-6)


def test_gere_kl_is_the_teachers_forward_kl_with_the_t_squared_factor(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    rows = build_task("copy6", 50, 10, 0).train.to_list()
    module = type("M", (), {"model": model})()
    gere = GeneralReplay(fmt, rows, loss="kl", batch_size=3, temperature=3.0, weight=2.0, seed=5)
    gere.on_task_start(type("C", (), {"module": module})())
    _moved(model)
    idx = torch.randint(len(gere.pairs), (3,), generator=torch.Generator().manual_seed(5))
    term, _ = gere.extra_loss(module, {}, None)
    # independently: KL(teacher || student) per answer position with torch's kl_div, times T^2, times weight
    from cl.core.data import collate_sft

    b = collate_sft([gere.pairs[i] for i in idx.tolist()], fmt.pad_id)
    with torch.no_grad():
        s = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        t = gere.teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    sel = b["labels"][:, 1:] != -100
    kl = torch.nn.functional.kl_div(torch.log_softmax(s[sel] / 3.0, -1), torch.log_softmax(t[sel] / 3.0, -1),
                                    log_target=True, reduction="batchmean")
    assert term.item() == pytest.approx(2.0 * 9.0 * kl.item(), rel=1e-4)
    reverse = torch.nn.functional.kl_div(torch.log_softmax(t[sel] / 3.0, -1), torch.log_softmax(s[sel] / 3.0, -1),
                                         log_target=True, reduction="batchmean")
    assert abs(reverse.item() - kl.item()) > 1e-4 * kl.item()  # the direction is tested, not assumed


def test_gere_replays_only_the_chosen_general_tasks(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    general = [build_task(n, 40, 10, 0) for n in ("copy6", "reverse6")]
    gere = GeneralReplay(fmt, general, n_samples=20, tasks=["copy6"])
    assert gere.replays_general == ("copy6",) and gere.n_rows == 20
    assert gere.record()["replayed_general_tasks"] == ["copy6"]


# -- regularizers and meta-replay --------------------------------------------------------------------------
def test_l2_and_ewc_are_zero_at_the_anchor_and_positive_away(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    ctx = TaskContext(0, tasks[0], type("M", (), {"model": model})(), tasks)
    l2, ewc = L2Anchor(1.0), EWC(1.0, fmt, fisher_batches=2, stream_batch_size=4)
    l2.on_task_start(ctx)
    assert ewc.penalty(model).item() == 0.0  # no Fisher before the first task ends
    ewc.on_task_end(ctx)
    assert l2.penalty(model).item() == 0.0 and ewc.penalty(model).item() == 0.0
    assert all(p.grad is None for p in model.parameters())  # the Fisher pass leaves no gradients behind
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert l2.penalty(model).item() > 0 and ewc.penalty(model).item() > 0


def test_ewc_fisher_is_the_mean_of_per_row_squared_gradients(tiny_model_dir):
    import random

    from cl.core.data import collate_sft
    from cl.core.losses import answer_cross_entropy

    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    rows = tasks[0].train.to_list()
    ewc = EWC(1.0, fmt, fisher_batches=2, stream_batch_size=3, seed=7)
    fisher = ewc.estimate_fisher(model, rows)
    # independently: each sampled row alone (no padding), its own backward, squared, averaged
    pairs = fmt.encode([r["prompt"] for r in rows], [r["answer"] for r in rows])
    rng = random.Random(7)
    picks = [rng.randrange(len(pairs)) for _ in range(6)]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    mean_grad = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for i in picks:
        b = collate_sft([pairs[i]], fmt.pad_id)
        model.zero_grad()
        answer_cross_entropy(model(input_ids=b["input_ids"]).logits, b["labels"]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] += p.grad ** 2 / 6
                mean_grad[n] += p.grad / 6
    model.zero_grad(set_to_none=True)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(fisher[name], expected[name], rtol=1e-4, atol=1e-10)
    assert all(torch.allclose(fisher[n], expected[n], rtol=1e-3, atol=1e-9) for n in fisher)
    # not the square of the mean gradient (biased low: Jensen)
    assert fisher[name].sum() > 1.5 * (mean_grad[name] ** 2).sum()


def test_kl_distill_is_zero_at_task_start(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    module = type("M", (), {"model": model})()
    kl = KLDistill(1.0, fmt)
    kl.on_task_start(type("C", (), {"module": module})())
    batch = next(iter(task_loader(fmt, 4, 1, 0)(tasks[0], 0)))
    assert kl.extra_loss(module, batch)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_kl_distill_is_the_teachers_forward_kl_times_t_squared_on_every_token(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    module = type("M", (), {"model": model})()
    kl = KLDistill(3.0, fmt, temperature=2.0)
    kl.on_task_start(type("C", (), {"module": module})())
    _moved(model)
    batch = next(iter(task_loader(fmt, 4, 1, 0)(tasks[0], 0)))
    term, _ = kl.extra_loss(module, batch)
    with torch.no_grad():  # independently: torch's kl_div(student, teacher) = KL(teacher || student)
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = kl.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sel = batch["attention_mask"].bool()
    ref = torch.nn.functional.kl_div(torch.log_softmax(s[sel] / 2.0, -1), torch.log_softmax(t[sel] / 2.0, -1),
                                     log_target=True, reduction="batchmean")
    assert term.item() == pytest.approx(3.0 * 4.0 * ref.item(), rel=1e-4)


def test_reptile_with_eps_one_is_the_identity_and_half_goes_halfway(tiny_model_dir):
    model, *_ = _stream_setup(tiny_model_dir)
    ctx = type("C", (), {"module": type("M", (), {"model": model})()})()
    for eps in (1.0, 0.5):
        r = ReptileInterpolation(eps=eps, every=1)
        r.on_task_start(ctx)
        start = copy.deepcopy(model.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        moved = copy.deepcopy(model.state_dict())
        r.interpolate(model)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), start[n] + eps * (moved[n] - start[n]))


def test_components_run_inside_a_stream(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    rows = build_task("copy6", 50, 10, 0).train.to_list()
    er = ExperienceReplay(fraction=0.25, capacity=50, schedule="power_law")
    kf = KFPF(fmt, every=3, steps=2, batch_size=4, capacity=50)
    comps = [er, GeneralReplay(fmt, rows, loss="tm", batch_size=2), L2Anchor(0.1), EWC(0.1, fmt, fisher_batches=1, stream_batch_size=4),
             KLDistill(0.1, fmt), ReptileInterpolation(0.5, every=4), kf]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, fmt, tasks, ev, comps, replay=er)
    assert kf.updates == 4  # rounds every 3 steps from task 1 on (the buffer holds the current task): 3, 6, 9, 12
    assert comps[5].applied == 3 and er.replayed > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_kfpf_only_touches_the_selected_modules(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    kf = KFPF(fmt, steps=3, batch_size=4, lr=0.1, modules=("norm",), top_blocks=1)
    kf.on_task_start(TaskContext(0, tasks[0], None, tasks))
    sel = set(kf.selected(model))
    assert any("layers.1." in n for n in sel) and not any("layers.0.self_attn" in n for n in sel)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kf.fine_tune(model)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != (n in sel), n
    assert all(p.requires_grad for p in model.parameters())


def test_kfpf_tunes_a_tied_output_layer_and_has_the_current_task_from_the_start(tiny_model_dir):
    model, fmt, tasks, ev = _stream_setup(tiny_model_dir)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # the tiny model is tied
    kf = KFPF(fmt, steps=2, batch_size=4, lr=0.5, capacity=50)  # modules: norm, lm_head
    kf.on_task_start(TaskContext(0, tasks[0], None, tasks))
    assert len(kf.buffer) == 50 and {r["task"] for r in kf.buffer.items} == {tasks[0].name}
    sel = kf.selected(model)
    assert "model.embed_tokens.weight" in sel and all("norm" in n or n == "model.embed_tokens.weight" for n in sel)
    head = model.get_output_embeddings().weight.detach().clone()
    kf.fine_tune(model)
    assert not torch.equal(head, model.get_output_embeddings().weight)


def test_per_task_rewarm_and_the_infinite_schedule():
    from cl.schedule import LRSchedule

    rewarm = LRSchedule(warmup_steps=5, decay="cosine", min_lr_ratio=0.1)
    for task in (0, 1):  # every task warms up again and decays to 0.1
        f = rewarm.lr_lambda(100, task)
        assert f(0) < 0.2 and f(5) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    inf = LRSchedule(warmup_steps=5, decay="infinite", min_lr_ratio=0.1, decay_fraction=0.1, const_ratio=0.5,
                     cooldown_steps=20)
    first, later = inf.lr_lambda(100, 0), inf.lr_lambda(100, 3)
    assert first(0) < 0.2 and first(5) == pytest.approx(1.0) and first(25) == pytest.approx(0.5)
    assert first(60) == 0.5 and later(0) == 0.5 and later(60) == 0.5  # no re-warming after the first task
    assert later(99) == pytest.approx(0.1) and 0.1 < later(95) < 0.5  # each task ends annealed
