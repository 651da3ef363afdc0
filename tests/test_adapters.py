"""Adapters: merge algebra, zero-init invariance, MoRA = LoRA in its limit, frozen parts stay frozen,
RegLoRA's penalty, save/reload, and a short stream with every adapter on tiny Llama and tiny Qwen2."""

import copy
from functools import partial

import pytest
import torch

from cl.adapters import (AdapterError, MoRALinear, RegLoRA, load_adapted, lora_delta, lora_layers, make_adapter,
                         save_adapted)
from cl.continual_eval import ContinualEvaluator
from cl.core.data import PromptFormat
from cl.evaluation import EvalSet, Scorer
from cl.loop import TaskContext, run_stream
from cl.model import load_model_and_tokenizer
from cl.module import ContinualLM
from cl.objectives.sft import SFTObjective
from cl.run import task_loader
from tasks.registry import build_task
from cl.core.components import Component

TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "gradient_clip_val": 1.0}
CFG = {"lora": {"name": "lora", "r": 4, "alpha": 8}, "lora_merge": {"name": "lora", "r": 4, "alpha": 8,
                                                                     "merge_after_task": True},
       "task_lora": {"name": "task_lora", "r": 4, "alpha": 8}, "mora": {"name": "mora", "r": 4, "alpha": 8, "top_k": 4},
       "hft": {"name": "hft"}, "reglora": {"name": "reglora", "r": 4, "alpha": 8}, "full": {"name": "full"}}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 20, 30, 40, 12, 13, 14]])


def _module(model):
    return type("M", (), {"model": model, "global_iter": 0})()


def _stream(model_dir, cfg, steps=4, evaluator_too=False):
    model, tok = load_model_and_tokenizer(model_dir)
    fmt = PromptFormat(tok)
    tasks = [build_task(n, 100, 20, 0) for n in ("add2", "sub2")]
    ev = ContinualEvaluator(Scorer(fmt), [EvalSet.build(t, fmt, 8, 0) for t in tasks], [],
                            model_dir.parent / "curves.jsonl")
    adapter = make_adapter(cfg, seed=0, evaluator=ev)
    model = adapter.setup(model)
    model.train()
    module = ContinualLM(model, SFTObjective(), partial(torch.optim.AdamW, lr=1e-2),
                         loss_components=[adapter])
    snaps = []

    class Snap(Component):
        def on_task_end(self, ctx):
            snaps.append({n: p.detach().clone() for n, p in ctx.module.model.named_parameters()})

    run_stream(module, tasks, tasks, task_loader(fmt, 4, steps, 0), ev, TRAINER, steps, components=[adapter, Snap()])
    return module, adapter, snaps


def test_lora_merge_is_w_plus_scale_ba_and_merging_twice_changes_nothing(tiny_model_dir):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = make_adapter(CFG["lora_merge"])
    peft_model = lora.setup(model)
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            layer.lora_B["default"].weight.normal_()
    deltas = {n.replace("base_model.model.", ""): lora_delta(l).detach().clone()
              for n, l in lora_layers(peft_model).items()}
    module = _module(peft_model)
    ctx = TaskContext(0, None, module, [])
    lora.merge_into_base(ctx)
    merged = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
              for n, p in module.model.named_parameters() if "lora_" not in n}
    for name, d in deltas.items():
        torch.testing.assert_close(merged[f"{name}.weight"], w0[f"{name}.weight"] + d)
    before = _logits(module.model, IDS)
    lora.merge_into_base(ctx)  # the fresh LoRA has B = 0: a second merge changes nothing
    torch.testing.assert_close(_logits(module.model, IDS), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lora", "task_lora", "mora", "reglora"])
def test_fresh_adapter_leaves_logits_unchanged(tiny_model_dir, name):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    before = _logits(model, IDS)
    adapter = make_adapter(CFG[name])
    model = adapter.setup(model)
    if name in ("mora", "task_lora"):
        adapter.on_task_start(TaskContext(0, None, _module(model), []))
    torch.testing.assert_close(_logits(model, IDS), before, rtol=0, atol=0)


def test_mora_with_all_experts_and_flat_routing_equals_lora_of_the_same_rank():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=False)
    mora = MoRALinear(copy.deepcopy(base), scale=2.0, top_k=None, tau=1e9, delta=None)
    mora.add_experts(3)
    mora.add_experts(2)  # 5 experts over two "tasks"
    with torch.no_grad():
        for b in mora.B:
            b.normal_()
    A, B = torch.cat(list(mora.A)), torch.cat(list(mora.B), 1)
    x = torch.randn(7, 16)
    from peft import LoraConfig, inject_adapter_in_model  # a plain peft LoRA of rank 5 with the same A, B

    holder = inject_adapter_in_model(LoraConfig(r=5, lora_alpha=10, target_modules=["lin"]),
                                     torch.nn.ModuleDict({"lin": copy.deepcopy(base)}))
    with torch.no_grad():
        holder["lin"].lora_A["default"].weight.copy_(A)
        holder["lin"].lora_B["default"].weight.copy_(B)
    torch.testing.assert_close(mora(x), holder["lin"](x), rtol=1e-5, atol=1e-5)
    mora_k = MoRALinear(copy.deepcopy(base), scale=2.0, top_k=2, tau=0.5)
    mora_k.add_experts(5)
    mora_k(x)
    assert mora_k.take_active_fraction() == pytest.approx(2 / 5)
    with pytest.raises(AdapterError, match="merge"):
        mora_k.merge()
    before = mora(x)
    mora.merge()
    torch.testing.assert_close(mora(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mora", "hft"])
def test_old_experts_and_frozen_matrices_are_bit_identical_after_the_next_task(tiny_model_dir, name):
    module, adapter, snaps = _stream(tiny_model_dir, CFG[name])
    after1, after2 = snaps
    if name == "mora":
        old = [n for n in after1 if ".A.0" in n or ".B.0" in n]
        new = [n for n in after2 if ".A.1" in n or ".B.1" in n]
        assert old and all(torch.equal(after1[n], after2[n]) for n in old)
        assert any(not torch.equal(after2[n], torch.zeros_like(after2[n])) for n in new if ".B." in n)
        assert len(adapter.record()["experts_active"]) == 2
    else:
        frozen = adapter.frozen[1]
        assert len(frozen) == 2 * (2 + 1) + 2 * 1 or len(frozen) == 2 * 2 + 3  # 2 layers: 2 attn each, 2+1 mlp
        assert all(torch.equal(after1[n], after2[n]) for n in frozen)
        emb = [n for n in after1 if "embed_tokens" in n]
        assert all(torch.equal(after1[n], after2[n]) for n in emb)
        trained = [n for n in after1 if n not in frozen and "embed" not in n and "proj" in n]
        assert any(not torch.equal(after1[n], after2[n]) for n in trained)
        assert adapter.frozen[0] != adapter.frozen[1]  # re-drawn per task


def test_reglora_penalty_is_zero_on_zero_key_entries_and_positive_otherwise(tiny_model_dir):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    reg = make_adapter(CFG["reglora"])
    assert isinstance(reg, RegLoRA)
    model = reg.setup(model)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_()
    reg.update_masks(model)
    n_keys = sum(m.sum().item() for m in reg.masks.values())
    total = sum(m.numel() for m in reg.masks.values())
    assert n_keys == pytest.approx(0.02 * total, rel=0.2)
    module = _module(model)
    reg.merge_into_base(TaskContext(0, None, module, []))
    assert reg.penalty(module.model).item() == 0.0  # fresh LoRA: B A = 0 everywhere, masked entries too
    with torch.no_grad():
        for layer in lora_layers(module.model).values():
            layer.lora_B["default"].weight.normal_()
    assert reg.penalty(module.model).item() > 0


@pytest.mark.parametrize("name", ["lora", "task_lora", "reglora", "mora", "hft", "full"])
def test_save_and_reload_reproduces_the_logits(tiny_model_dir, tmp_path, name):
    module, adapter, _ = _stream(tiny_model_dir, CFG[name], steps=2)
    model = module.model
    want = _logits(model, IDS)
    save_adapted(model, tmp_path / "saved")
    fresh = load_adapted(tmp_path / "saved")
    assert not list((tmp_path / "saved").rglob("*.bin")) and list((tmp_path / "saved").rglob("*.safetensors"))
    torch.testing.assert_close(_logits(fresh, IDS), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lora", "lora_merge", "task_lora", "mora", "hft", "reglora"])
def test_every_adapter_trains_on_tiny_llama_and_tiny_qwen2(tiny_model_dir, tiny_qwen, name):
    for d in (tiny_model_dir, tiny_qwen):
        module, adapter, snaps = _stream(d, CFG[name], steps=3)
        assert all(0 < n < sum(p.numel() for p in module.model.parameters()) for n in module.trainable_per_task)
        if name in ("task_lora", "mora"):  # task 2 trains only its new parameters; task 1's stay as they were
            assert all(torch.equal(a, snaps[1][n]) for n, a in snaps[0].items())
            new = "lora_B.task1" if name == "task_lora" else ".B.1"
            assert any(p.abs().sum() > 0 for n, p in snaps[1].items() if new in n)
        else:
            assert any(not torch.equal(a, snaps[1][n]) for n, a in snaps[0].items() if n in snaps[1])
        if name == "task_lora":
            rows = adapter.record()["task_aware_rows"]
            assert [len(r) for r in rows] == [1, 2]


def test_unknown_target_module_fails_with_one_line(tiny_model_dir):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    with pytest.raises(AdapterError, match=r"adapter.target_modules: 'qkv' match no linear layer"):
        make_adapter({"name": "lora", "target_modules": ["qkv"]}).setup(model)
    with pytest.raises(AdapterError, match="adapter.r"):
        make_adapter({"name": "mora", "r": 0})
