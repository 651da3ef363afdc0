"""DER++ and A-GEM: their loss terms and projection against hand computations, inside a stream."""

import pytest
import torch
import torch.nn.functional as F

from cl.core.data import PromptFormat, collate_sft
from cl.core.losses import answer_cross_entropy
from cl.loop import TaskContext
from cl.model import load_model_and_tokenizer
from cl.run import task_loader
from replay.agem import AGEM, project
from replay.derpp import DERPlusPlus
from tasks.registry import build_task


def _setup(model_dir):
    model, tok = load_model_and_tokenizer(model_dir)
    fmt = PromptFormat(tok)
    tasks = [build_task(n, 60, 10, 0) for n in ("add2", "sub2")]
    return model, fmt, tasks


# -- A-GEM ---------------------------------------------------------------------------------------------------
def test_agem_projection_matches_the_formula_and_leaves_agreeing_gradients_alone():
    g, r = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    out, projected = project(g, r)
    assert projected and torch.allclose(out[0], torch.tensor([0.5, 0.5]))  # g - (g.r / r.r) r
    same, projected = project([torch.tensor([1.0, 1.0])], r)
    assert not projected and torch.equal(same[0], torch.tensor([1.0, 1.0]))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
        r = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
        out, projected = project(g, r)
        dot = lambda a, b: sum((x * y).sum() for x, y in zip(a, b))  # noqa: E731
        if projected:  # the projected gradient no longer conflicts, and only the part along r was removed
            assert dot(g, r) < 0 and abs(float(dot(out, r))) < 1e-5
            diff = [o - x for o, x in zip(out, g)]
            k = float(dot(diff, r) / dot(r, r))
            assert all(torch.allclose(d, k * x, atol=1e-6) for d, x in zip(diff, r))
        else:
            assert dot(g, r) >= 0 and all(torch.equal(o, x) for o, x in zip(out, g))


def test_agem_step_projects_the_gradient_against_the_memory_gradient(tiny_model_dir):
    model, fmt, tasks = _setup(tiny_model_dir)
    agem = AGEM(fmt, per_task=16, batch_size=16)
    agem.step(model)  # empty memory: nothing happens
    assert agem.steps == 0
    agem.on_task_end(TaskContext(0, tasks[0], None, tasks))
    assert len(agem.memory) == 16
    params = [p for p in model.parameters() if p.requires_grad]
    ref = agem.reference_gradient(model, params)  # the whole memory: the same batch step() will draw
    for p, r in zip(params, ref):  # a gradient pointing exactly against the memory's
        p.grad = -r.detach().clone()
    agem.step(model)
    assert agem.steps == 1 and agem.projected == 1
    dot = sum((p.grad * r).sum() for p, r in zip(params, ref))
    assert abs(float(dot)) < 1e-4 * float(sum((r * r).sum() for r in ref))
    for p, r in zip(params, ref):  # -r projected against r is zero
        assert torch.allclose(p.grad, torch.zeros_like(p.grad), atol=1e-6)


# -- DER++ ---------------------------------------------------------------------------------------------------
def test_derpp_stores_the_models_answer_logits_and_its_terms_are_mse_and_answer_ce(tiny_model_dir):
    model, fmt, tasks = _setup(tiny_model_dir)
    der = DERPlusPlus(fmt, alpha=0.3, beta=0.7, capacity=8, batch_size=4)
    module = type("M", (), {"model": model})()
    batch = next(iter(task_loader(fmt, 4, 1, 0)(tasks[0], 0)))
    term, logs = der.extra_loss(module, batch)
    assert term.item() == 0.0 and len(der.pairs) == 4  # empty buffer before: no replay; the batch enters
    pairs = [tuple(p) for p in der.pairs]
    b = collate_sft(pairs, fmt.pad_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    for i, (p, a) in enumerate(pairs):  # the answer positions' logits, as the model gives them
        assert len(a) == der.logits[i].shape[0]
        torch.testing.assert_close(der.logits[i], logits[i, len(p) - 1: len(p) - 1 + len(a)])
    with torch.no_grad():  # move the model: the MSE is then the squared distance to the stored logits
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = der.gen.get_state()
    mse, ce = der.terms(model)
    der.gen.set_state(state)  # the same two minibatches, by hand
    i1 = torch.randint(len(der.pairs), (4,), generator=der.gen).tolist()
    i2 = torch.randint(len(der.pairs), (4,), generator=der.gen).tolist()
    b1 = collate_sft([der.pairs[i] for i in i1], fmt.pad_id)
    l1 = model(input_ids=b1["input_ids"], attention_mask=b1["attention_mask"]).logits
    now = torch.cat([l1[j, len(der.pairs[i][0]) - 1: len(der.pairs[i][0]) - 1 + len(der.pairs[i][1])]
                     for j, i in enumerate(i1)])
    torch.testing.assert_close(mse, F.mse_loss(now, torch.cat([der.logits[i] for i in i1])))
    b2 = collate_sft([der.pairs[i] for i in i2], fmt.pad_id)
    l2 = model(input_ids=b2["input_ids"], attention_mask=b2["attention_mask"]).logits
    torch.testing.assert_close(ce, answer_cross_entropy(l2, b2["labels"]))
    assert mse.item() > 0


def test_derpp_buffer_is_a_reservoir_over_the_stream(tiny_model_dir):
    model, fmt, tasks = _setup(tiny_model_dir)
    der = DERPlusPlus(fmt, capacity=10, batch_size=2)
    pairs = fmt.encode([f"A2:{i:02d}+00=" for i in range(100)], [f"{i:03d}" for i in range(100)])
    der.add(pairs, [torch.zeros(len(a), 3) for _, a in pairs])
    assert der.seen == 100 and len(der.pairs) == 10
    kept = {tuple(p[0]) for p in der.pairs}
    assert len(kept) == 10 and any(tuple(p) in kept for p, _ in pairs[10:])  # later examples replace earlier ones
    with pytest.raises(ValueError, match="capacity"):
        DERPlusPlus(fmt, capacity=0)
