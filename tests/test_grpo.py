"""GRPO: the loss and its gradient against a from-the-formula reference, and its invariants."""

import itertools
import math

import pytest
import torch

from cl.core.data import PromptFormat, PromptRowsCollator, TaskExamples
from cl.model import load_model_and_tokenizer
from cl.objectives.grpo import GRPOObjective, token_logprobs
from cl.objectives.grpo_loss import aggregate, group_advantages, grpo_loss, k3_kl
from tasks.base import Task


def reference_loss(logp, old, adv, mask, eps_low, eps_high, beta, ref, mode, max_len):
    """Element-by-element transcription of docs/methods.md section 2, GRPO (no vectorised code shared)."""
    B, T = logp.shape
    per_seq, total, n_tok = [], 0.0, 0.0
    for i in range(B):
        s, n = 0.0, 0.0
        for t in range(T):
            if mask[i][t] == 0:
                continue
            rho = torch.exp(logp[i, t] - old[i, t])
            clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
            obj = torch.minimum(rho * adv[i], clipped * adv[i])
            if beta:
                x = ref[i, t] - logp[i, t]
                obj = obj - beta * (torch.exp(x) - x - 1)
            s = s + (-obj)
            n += 1
        per_seq.append((s, n))
        total = total + s
        n_tok += n
    if mode == "token_mean":
        return total / n_tok
    if mode == "seq_mean_token_mean":
        return sum(s / max(n, 1) for s, n in per_seq) / B
    return sum(s / max_len for s, _ in per_seq) / B


@pytest.mark.parametrize("mode, beta", itertools.product(
    ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"], [0.0, 0.04]))
def test_loss_and_gradient_match_the_formula(mode, beta):
    g = torch.Generator().manual_seed(0)
    B, T, V = 6, 5, 11
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
    old = (logp + 0.3 * torch.randn(B, T, generator=g)).detach()  # ratios away from 1: clipping is exercised
    ref = (logp + 0.5 * torch.randn(B, T, generator=g)).detach()
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    ours, _ = grpo_loss(logp, old, adv, mask, 0.2, 0.3, beta, ref, mode, max_len=T)
    (g_ours,) = torch.autograd.grad(ours, logits, retain_graph=True)
    theirs = reference_loss(logp, old, adv, mask, 0.2, 0.3, beta, ref, mode, T)
    (g_ref,) = torch.autograd.grad(theirs, logits)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4, "grpo")
    first = r[:4]
    expected = (first - first.mean()) / (first.std() + 1e-6)
    torch.testing.assert_close(a[:4], expected)
    assert (a[4:] == 0).all(), "an all-equal group has zero advantage"
    torch.testing.assert_close(group_advantages(r, 4, "dr_grpo")[:4], first - first.mean())
    rloo = group_advantages(r, 4, "rloo")[:4]
    loo = torch.tensor([first[i] - (first.sum() - first[i]) / 3 for i in range(4)])
    torch.testing.assert_close(rloo, loo)
    assert (group_advantages(torch.tensor([1.0, 0.0]), 1, "grpo") == 0).all()


def test_k3_is_nonnegative_and_zero_at_equal_policies():
    x = torch.linspace(-3, 3, 13)
    assert (k3_kl(x, x) == 0).all()
    assert (k3_kl(x, x.flip(0)) >= 0).all()


def test_one_epoch_without_kl_is_the_plain_policy_gradient():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 6, generator=g).log_softmax(-1).requires_grad_(True)
    adv, mask = torch.randn(4, generator=g), torch.ones(4, 6)
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, kl_coef=0.0, loss_agg="token_mean")
    (grad,) = torch.autograd.grad(loss, logp)
    pg = aggregate(-adv.unsqueeze(-1) * logp, mask, "token_mean")
    (grad_pg,) = torch.autograd.grad(pg, logp)
    torch.testing.assert_close(grad, grad_pg)


def _objective(tiny_model_dir, score, **kw):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    model.train()
    fmt = PromptFormat(tok)
    task = Task("t", train=None, eval=None, verifier=score)
    obj = GRPOObjective(group_size=4, max_new_tokens=4, **kw)
    obj.bind(fmt, {"t": task})
    rows = [{"prompt": p, "answer": "1", "task": "t"} for p in ("A:1=", "A:22=")]
    pairs = fmt.encode([r["prompt"] for r in rows], [r["answer"] for r in rows])
    batch = PromptRowsCollator()([TaskExamples(pairs, rows)[i] for i in range(2)])
    module = type("M", (), {"model": model})()
    return obj, module, batch, model


def test_all_equal_rewards_give_zero_policy_gradient(tiny_model_dir):
    obj, module, batch, model = _objective(tiny_model_dir, lambda c, **_: [1.0] * len(c), kl_coef=0.0)
    loss, logs = obj.step(module, batch)
    loss.backward()
    assert logs["zero_adv_frac"] == 1.0
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_rollout_rewards_masks_and_logs(tiny_model_dir):
    score = lambda completions, **_: [float(len(c) % 2) for c in completions]  # noqa: E731
    obj, module, batch, model = _objective(tiny_model_dir, score, kl_coef=0.0)
    torch.manual_seed(0)
    ro = obj.rollout(module, batch)
    assert ro.input_ids.size(0) == 8 and ro.advantages.shape == (8,)
    # the completion mask starts right after the prompt and covers each completion's tokens
    for i in range(8):
        plen = len(batch["prompt_ids"][i // 4])
        n = int(ro.attention_mask[i].sum()) - plen
        assert ro.completion_mask[i].nonzero().flatten().tolist() == list(range(plen - 1, plen - 1 + n))
    assert {"reward", "pass_rate", "completion_len", "zero_adv_frac", "t/reward"} <= set(ro.logs)
    assert obj.tokens_generated > 0


def test_reference_copies_only_with_kl(tiny_model_dir):
    obj, module, batch, model = _objective(tiny_model_dir, lambda c, **_: [0.0] * len(c), kl_coef=0.0)
    ctx = type("C", (), {"module": module, "task_idx": 0})()
    obj.on_task_start(ctx)
    assert obj.ref_model is None
    obj2, module2, _, _ = _objective(tiny_model_dir, lambda c, **_: [0.0] * len(c), kl_coef=0.05)
    obj2.on_task_start(type("C", (), {"module": module2, "task_idx": 0})())
    assert obj2.ref_model is not None and not any(p.requires_grad for p in obj2.ref_model.parameters())


def test_ppo_epochs_reuse_one_rollout_and_dynamic_sampling_drops_equal_groups(tiny_model_dir):
    calls = []
    score = lambda completions, **_: calls.append(1) or [1.0] * len(completions)  # noqa: E731
    obj, module, batch, _ = _objective(tiny_model_dir, score, kl_coef=0.0, ppo_epochs=2, dynamic_sampling=True)
    for _ in range(4):
        loss, logs = obj.step(module, batch)
        assert loss.item() == 0.0
    assert len(calls) == 2  # 4 optimizer steps, 2 rollout batches


def test_token_logprobs_match_log_softmax(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    lp = token_logprobs(model, ids, torch.ones_like(ids))
    full = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    for t in range(4):
        assert lp[0, t].item() == pytest.approx(full[t, ids[0, t + 1]].item(), abs=1e-5)
    assert not math.isnan(lp.sum().item())


def test_rif_drops_instances_without_a_correct_rollout(tiny_model_dir):
    from datasets import Dataset

    from cl.rif import RolloutInstanceFilter

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    fmt = PromptFormat(tok)
    rows = [{"prompt": f"A:{i}=", "answer": "1", "task": "t", "learnable": i % 3 == 0} for i in range(12)]
    score = lambda completions, learnable, **_: [float(x) for x in learnable]  # noqa: E731
    task = Task("t", train=Dataset.from_list(rows), eval=None, verifier=score)
    objective = type("O", (), {"max_new_tokens": 3, "group_size": 4})()
    rif = RolloutInstanceFilter(fmt, k=2, max_instances=9, objective=objective, stream_batch_size=5, steps_per_task=2)
    assert (rif.max_new_tokens, rif.group_size, rif.planned_prompts) == (3, 4, 10)
    ctx = type("C", (), {"module": type("M", (), {"model": model, "global_iter": 0})(), "task_idx": 0})()
    kept = rif.prepare_data(ctx, task)
    rec = rif.records[0]
    assert (rec["pool"], rec["screened"]) == (12, 9)
    # a seeded random sample of the pool (not its first rows); the learnable rows of it are kept
    import random

    picked = sorted(random.Random("0/t/rif").sample(range(12), 9))
    assert picked != list(range(9))
    assert list(kept.train["prompt"]) == [rows[i]["prompt"] for i in picked if rows[i]["learnable"]]
    assert rec["kept"] == len(kept.train) == rec["screened"] - rec["dropped"]
    control = RolloutInstanceFilter(fmt, k=2, max_instances=9, control="random", objective=objective, seed=1)
    rows_c = control.prepare_data(ctx, task)
    rc = control.records[0]
    assert len(rows_c.train) == rc["kept"] and rc["control"] == "random"
    assert rc["kept_with_a_correct_rollout"] == sum(r["learnable"] for r in rows_c.train)
    assert rec["rollout_tokens_cost"] > 0 and rec["rollout_tokens_saved_est"] > 0


def test_task_reward_replaces_the_verifier_and_pass_rate_counts_verifier_passes(tiny_model_dir):
    obj, module, batch, model = _objective(tiny_model_dir, lambda c, **_: [1.0] * len(c), kl_coef=0.0)
    obj.tasks["t"] = Task("t", train=None, eval=None, verifier=lambda c, **_: [1.0] * len(c),
                          reward=lambda c, **_: [0.25] * len(c))
    ro = obj.rollout(module, batch)
    assert ro.logs["reward"].item() == pytest.approx(0.25) and ro.logs["pass_rate"].item() == 1.0
