"""Parameter-efficient and rank-expert fine-tuning: full, LoRA, per-task LoRA, MoRA, HFT, RegLoRA.

An adapter is a stream component: ``setup(model) -> model`` runs once after loading (wrapping or
freezing), ``on_task_start`` / ``on_task_end`` add, freeze or merge per task, and RegLoRA's penalty is a
loss term. The optimizer is rebuilt at every task start from the parameters that then require grad
(``train.reset_optimizer_per_task`` must stay true for adapters that change the trainable set).

- ``full``: every parameter trains (the default).
- ``lora`` (peft): LoRA on ``target_modules``; with ``merge_after_task`` the adapter is merged into the
  base after each task (``merge_and_unload``) and a fresh one (B = 0) starts the next task.
- ``task_lora`` (peft, one named adapter per task): earlier adapters are frozen and stay active, so the
  model is the base plus the sum of all task adapters ("task-agnostic"). At each task end the suite also
  scores each seen task with only its own adapter active ("task-aware", task id known) and records that
  matrix separately.
- ``mora``: a mixture of rank-1 experts (``MoRALinear``, see its docstring) applied to the attention and
  MLP projections; each task appends ``r`` new experts and freezes the old ones.
- ``hft`` (half fine-tuning): per task, a seeded random half of the matrices is frozen (per layer 2 of
  q/k/v/o; in a random half of the layers 2 of gate/up/down, in the other half 1); embeddings (and a tied
  LM head) frozen; norms train unless ``freeze_norms``.
- ``reglora`` (SEFE): LoRA merged after each task; before the merge the top ``key_fraction`` (2%) of
  ``|B A|`` entries per matrix become key elements (union over tasks), and the next tasks' LoRA pays
  ``coef * mean over matrices of mean |scale * (B A)_ij| over the key elements`` (coef 2.5e3; ``scale =
  alpha / r``, the LoRA delta as peft applies it).

Merging and averaging: for ``lora`` with ``merge_after_task`` and ``reglora`` the task-end hook merges
first, so averaging (which runs after the adapter's hook) acts on the merged weights; for ``task_lora``
and unmerged ``lora`` it acts on the adapter matrices A and B themselves (so the effective update is not
a linear interpolation of ``B A``); for ``mora`` on the expert matrices.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
from pathlib import Path

import torch
import torch.nn as nn
from cl.core.components import Component

ADAPTERS = ("full", "lora", "task_lora", "mora", "hft", "reglora")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


class AdapterError(ValueError):
    """An adapter setting that does not fit the model; the message is one line naming the setting."""


# the vision encoder of a vision-language model (LLaVA: vision_tower, Qwen2-VL: visual): adapters act on the
# language model (and the projector, when target_modules name its layers), never on the image encoder
VISION_ENCODER = re.compile(r"(^|\.)(vision_tower|visual|vision_model)\.")


def in_scope(name: str) -> bool:
    """Whether an adapter may wrap the module named ``name`` (it is not inside a vision encoder)."""
    return VISION_ENCODER.search(name) is None


def peft_targets(targets: list[str]):
    """``target_modules`` for peft: the names themselves, as a pattern that leaves vision encoders out."""
    return rf"^(?!(.*\.)?(vision_tower|visual|vision_model)\.)(.*\.)?({'|'.join(map(re.escape, targets))})$"


def _linear_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and in_scope(n)}


def check_targets(model: nn.Module, targets) -> None:
    have = _linear_names(model)
    bad = [t for t in targets if t not in have]
    if bad:
        raise AdapterError(f"adapter.target_modules: {', '.join(map(repr, bad))} match no linear layer of the model; "
                           f"available: {', '.join(sorted(have))}")


def trainable_count(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# -- full and HFT ---------------------------------------------------------------------------------------------
class FullFineTuning(Component):
    name = "full"
    key = "adapter"
    ckpt_attrs = ()

    def setup(self, model):
        return model

    def record(self) -> dict:
        return {"name": self.name}


class HalfFineTuning(Component):
    """Half fine-tuning (HFT): a random half of the matrices frozen per task (docs/methods.md section 5, Adapters)."""

    name = "hft"
    key = "adapter"
    ckpt_attrs = ("frozen",)

    def __init__(self, seed: int = 0, freeze_norms: bool = False):
        self.seed, self.freeze_norms = seed, freeze_norms
        self.frozen: list[list[str]] = []

    def setup(self, model):
        return model

    def draw(self, model: nn.Module, task_idx: int) -> list[str]:
        """Names of the weight matrices frozen for ``task_idx`` (seeded, re-drawn per task): the language model's
        layers only (a vision-language model's image encoder trains in full, as under full fine-tuning)."""
        rng = random.Random(f"{self.seed}/hft/{task_idx}")
        names = {n: p for n, p in model.named_parameters() if in_scope(n)}
        layers = sorted({int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)\.", n))})
        two_mlp = set(rng.sample(layers, len(layers) // 2))
        frozen = []
        for layer in layers:
            picks = rng.sample(ATTN, 2) + rng.sample(MLP, 2 if layer in two_mlp else 1)
            for proj in picks:
                frozen += [n for n in names if re.search(rf"layers\.{layer}\..*{proj}\.weight$", n)]
        return frozen

    def _freeze(self, ctx) -> list[str]:
        model = ctx.module.model
        frozen = set(self.draw(model, ctx.task_idx))
        emb = model.get_input_embeddings().weight
        for n, p in model.named_parameters():
            is_norm = "norm" in n
            p.requires_grad_(not (n in frozen or p is emb or (self.freeze_norms and is_norm)))
        return sorted(frozen)

    def on_task_start(self, ctx) -> None:
        self.frozen.append(self._freeze(ctx))

    def on_resume(self, ctx) -> None:
        """Resumed inside a task: the task's frozen half again (the draw is seeded by the task index)."""
        self._freeze(ctx)

    def record(self) -> dict:
        return {"name": self.name, "frozen_per_task": self.frozen}


# -- LoRA family (peft) ---------------------------------------------------------------------------------------
class LoRA(Component):
    """LoRA through peft, optionally merged into the base after each task (then a fresh LoRA per task)."""

    name = "lora"
    key = "adapter"
    ckpt_attrs = ("merges",)

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules=DEFAULT_TARGETS,
                 merge_after_task: bool = False, seed: int = 0):
        if r < 1:
            raise AdapterError(f"adapter.r: must be >= 1, got {r}")
        self.r, self.alpha, self.dropout, self.targets = r, alpha, dropout, list(target_modules)
        self.merge_after_task, self.seed = merge_after_task, seed
        self.merges = 0

    def config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=peft_targets(self.targets), bias="none")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def setup(self, model):
        from peft import get_peft_model

        check_targets(model, self.targets)
        torch.manual_seed(self.seed)
        return get_peft_model(model, self.config())

    def _fresh(self, base, task_idx: int):
        from peft import get_peft_model

        torch.manual_seed(self.seed * 1000 + task_idx + 1)
        return get_peft_model(base, self.config())

    def merge_into_base(self, ctx) -> None:
        base = ctx.module.model.merge_and_unload()
        ctx.module.model = self._fresh(base, ctx.task_idx)
        self.merges += 1

    def on_task_end(self, ctx) -> None:
        if self.merge_after_task:
            self.merge_into_base(ctx)

    def record(self) -> dict:
        return {"name": self.name, "r": self.r, "alpha": self.alpha, "merges": self.merges}


def lora_delta(layer, adapter: str = "default") -> torch.Tensor:
    """``scale * B A`` of one peft LoRA layer (``[out, in]``)."""
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return layer.scaling[adapter] * (b @ a)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


class TaskLoRA(LoRA):
    """One peft adapter per task (``task0``, ``task1``, ...); older ones frozen and kept active."""

    name = "task_lora"
    ckpt_attrs = None  # adds a named adapter per task: not resumable

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules=DEFAULT_TARGETS,
                 seed: int = 0, evaluator=None):
        super().__init__(r, alpha, dropout, target_modules, seed=seed)
        self.evaluator = evaluator
        self.task_aware: list[dict] = []

    def setup(self, model):
        from peft import get_peft_model

        check_targets(model, self.targets)
        torch.manual_seed(self.seed)
        return get_peft_model(model, self.config(), adapter_name="task0")

    def names(self, upto: int) -> list[str]:
        return [f"task{i}" for i in range(upto + 1)]

    def activate(self, model, names: list[str], trainable: str | None) -> None:
        model.base_model.set_adapter(names)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(trainable is not None and f".{trainable}." in n)

    def on_task_start(self, ctx) -> None:
        model, t = ctx.module.model, ctx.task_idx
        if t > 0:
            torch.manual_seed(self.seed * 1000 + t)
            model.add_adapter(f"task{t}", self.config())
        self.activate(model, self.names(t), f"task{t}")

    def on_task_end(self, ctx) -> None:
        model, t = ctx.module.model, ctx.task_idx
        if self.evaluator is not None:
            row = {}
            for j, es in enumerate(self.evaluator.stream):
                if j <= t:  # the task id is known and its adapter exists: only that adapter
                    self.activate(model, [f"task{j}"], None)
                    row[es.name] = self.evaluator.scorer.accuracy(model, es)
            self.activate(model, self.names(t), None)
            self.task_aware.append(row)

    def record(self) -> dict:
        return {**super().record(), "routing": "task-agnostic (all adapters summed) in acc_matrix",
                "task_aware_rows": self.task_aware}


class RegLoRA(LoRA):
    """SEFE's RegLoRA: key-element masks of ``|B A|`` (union over tasks), merge, fresh LoRA, penalty."""

    name = "reglora"
    ckpt_attrs = ("merges", "masks")

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules=DEFAULT_TARGETS,
                 key_fraction: float = 0.02, coef: float = 2.5e3, seed: int = 0):
        super().__init__(r, alpha, dropout, target_modules, merge_after_task=True, seed=seed)
        self.key_fraction, self.coef = key_fraction, coef
        self.masks: dict[str, torch.Tensor] = {}

    def update_masks(self, model) -> None:
        for name, layer in lora_layers(model).items():
            d = lora_delta(layer).detach().abs()
            k = max(1, int(round(self.key_fraction * d.numel())))
            thresh = d.flatten().topk(k).values[-1]
            m = d >= thresh
            key = name.replace("base_model.model.", "")
            self.masks[key] = m | self.masks[key] if key in self.masks else m

    def on_task_end(self, ctx) -> None:
        self.update_masks(ctx.module.model)
        self.merge_into_base(ctx)

    def penalty(self, model) -> torch.Tensor:
        terms = []
        for name, layer in lora_layers(model).items():
            m = self.masks.get(name.replace("base_model.model.", ""))
            if m is not None and m.any():
                terms.append(lora_delta(layer).abs()[m].mean())
        if not terms:
            return torch.zeros((), device=next(model.parameters()).device)
        return torch.stack(terms).mean()

    def extra_loss(self, module, batch, loss=None):
        pen = self.penalty(module.model)
        return self.coef * pen, {"reglora/penalty": pen.detach()}

    def record(self) -> dict:
        return {**super().record(), "key_elements": int(sum(m.sum() for m in self.masks.values()))}


# -- MoRA -----------------------------------------------------------------------------------------------------
class MoRALinear(nn.Module):
    """A linear layer plus a mixture of rank-1 experts ("Little by Little", 2025).

    Implemented as a small module rather than a peft custom tuner: its routing needs all experts' ``A_i x``
    together and its expert set grows per task, which peft's per-adapter layer abstraction does not model;
    it keeps the behaviour peft users rely on: the base weight frozen, ``adapter_state`` /
    ``load_adapter_state`` (safetensors via ``save_mora`` / ``load_mora``), and ``merge`` where exact.

    Forward: ``z_i = A_i x`` (one scalar per expert and token), self-activation
    ``s_i = z_i / sqrt(sum_j z_j^2)``, ``w = softmax(s / tau)``, keep the ``top_k`` largest, drop experts
    with ``s_i < delta``, output ``W0 x + scale * K * sum_i w_i B_i z_i`` with ``K`` the number of experts
    kept by top-k. The factor ``K`` (left open by the source) makes top-k = all, ``tau -> inf``, no pruning
    equal to a plain LoRA ``W0 x + scale * B A x`` of the same total rank. Merging is exact only in that
    input-independent limit, so ``merge`` requires it.
    """

    def __init__(self, base: nn.Linear, scale: float = 1.0, top_k: int | None = None, tau: float = 1.0,
                 delta: float | None = None):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.scale, self.top_k, self.tau, self.delta = scale, top_k, tau, delta
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.active_sum, self.active_n = 0.0, 0

    @property
    def n_experts(self) -> int:
        return sum(a.size(0) for a in self.A)

    def add_experts(self, r: int) -> None:
        for a, b in zip(self.A, self.B):
            a.requires_grad_(False)
            b.requires_grad_(False)
        w = self.base.weight
        a = torch.empty(r, w.size(1), device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A.append(nn.Parameter(a))
        self.B.append(nn.Parameter(torch.zeros(w.size(0), r, device=w.device, dtype=w.dtype)))

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        s = z / z.pow(2).sum(-1, keepdim=True).clamp_min(1e-12).sqrt()
        w = torch.softmax(s / self.tau, -1)
        R = z.size(-1)
        k = R if self.top_k is None else min(self.top_k, R)
        keep = torch.ones_like(w, dtype=torch.bool)
        if k < R:
            keep = torch.zeros_like(keep).scatter(-1, w.topk(k, -1).indices, True)
        w = w * keep * k
        if self.delta is not None:
            w = w * (s >= self.delta)
        self.active_sum = self.active_sum + (w > 0).float().mean().detach()
        self.active_n += 1
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not len(self.A):
            return out
        A = torch.cat(list(self.A), 0)
        B = torch.cat(list(self.B), 1)
        z = x @ A.t()
        return out + self.scale * (self.weights(z) * z) @ B.t()

    @torch.no_grad()
    def merge(self) -> None:
        routed = (self.top_k is not None and self.top_k < self.n_experts) or self.delta is not None or self.tau < 1e6
        if routed:
            raise AdapterError("adapter.merge: MoRA's routing depends on the input; merging is exact only with "
                               "top_k >= experts, no pruning (delta null) and tau >= 1e6")
        A, B = torch.cat(list(self.A), 0), torch.cat(list(self.B), 1)
        self.base.weight += self.scale * B @ A
        for p in list(self.A) + list(self.B):
            p.zero_()

    def take_active_fraction(self) -> float | None:
        f = float(self.active_sum) / self.active_n if self.active_n else None
        self.active_sum, self.active_n = 0.0, 0
        return f


class MoRA(Component):
    """Apply ``MoRALinear`` to ``target_modules``; ``r`` new rank-1 experts per task, old ones frozen."""

    name = "mora"
    key = "adapter"
    ckpt_attrs = None  # appends experts per task: not resumable

    def __init__(self, r: int = 8, alpha: float = 16, target_modules=DEFAULT_TARGETS, top_k: int | None = None,
                 tau: float = 0.5, delta: float | None = None, seed: int = 0):
        if r < 1:
            raise AdapterError(f"adapter.r: must be >= 1, got {r}")
        self.r, self.scale, self.targets = r, alpha / r, list(target_modules)
        self.top_k, self.tau, self.delta, self.seed = top_k, tau, delta, seed
        self.active: list[dict] = []

    def setup(self, model):
        check_targets(model, self.targets)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, mod in list(model.named_modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, nn.Linear) and child_name in self.targets and in_scope(f"{name}.{child_name}"):
                    setattr(mod, child_name, MoRALinear(child, self.scale, self.top_k, self.tau, self.delta))
        return model

    def modules(self, model) -> dict[str, MoRALinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, MoRALinear)}

    def on_task_start(self, ctx) -> None:
        torch.manual_seed(self.seed * 1000 + ctx.task_idx)
        for m in self.modules(ctx.module.model).values():
            m.add_experts(self.r)
            m.take_active_fraction()

    def on_task_end(self, ctx) -> None:
        fr = {n: m.take_active_fraction() for n, m in self.modules(ctx.module.model).items()}
        per_layer: dict[str, list[float]] = {}
        for n, f in fr.items():
            if f is not None:
                layer = re.search(r"layers\.(\d+)\.", n)
                per_layer.setdefault(layer.group(1) if layer else n, []).append(f)
        self.active.append({"task": ctx.task.name,
                            "active_fraction_per_layer": {k: sum(v) / len(v) for k, v in per_layer.items()}})

    def record(self) -> dict:
        return {"name": self.name, "r_per_task": self.r, "top_k": self.top_k, "tau": self.tau, "delta": self.delta,
                "experts_active": self.active}


def save_mora(model: nn.Module, path: str | Path) -> None:
    """Expert weights as safetensors plus the expert layout (ranks per task per module) as JSON."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, MoRALinear)}
    tensors = {f"{n}.A.{i}": a.detach().contiguous() for n, m in mods.items() for i, a in enumerate(m.A)}
    tensors.update({f"{n}.B.{i}": b.detach().contiguous() for n, m in mods.items() for i, b in enumerate(m.B)})
    save_file(tensors, str(path / "mora.safetensors"))
    (path / "mora.json").write_text(json.dumps({n: [a.size(0) for a in m.A] for n, m in mods.items()}))


def load_mora(model: nn.Module, path: str | Path) -> None:
    """Load experts saved by ``save_mora`` into a model already set up with ``MoRA.setup``."""
    from safetensors.torch import load_file

    path = Path(path)
    layout = json.loads((path / "mora.json").read_text())
    tensors = load_file(str(path / "mora.safetensors"))
    mods = {n: m for n, m in model.named_modules() if isinstance(m, MoRALinear)}
    if set(layout) != set(mods):
        raise AdapterError(f"adapter: {path} holds MoRA experts for other modules than this model's")
    for n, ranks in layout.items():
        m = mods[n]
        while len(m.A) < len(ranks):
            m.add_experts(ranks[len(m.A)])
        with torch.no_grad():
            for i in range(len(ranks)):
                m.A[i].copy_(tensors[f"{n}.A.{i}"])
                m.B[i].copy_(tensors[f"{n}.B.{i}"])


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def save_adapted(model: nn.Module, path: str | Path, tokenizer=None) -> None:
    """Save a model with its adapters so that ``load_adapted`` rebuilds identical logits.

    peft models: the base (earlier merges included, current adapters removed with ``unload``) under
    ``base/`` and the adapters under ``adapters/`` (peft's own format, one subdirectory per named
    adapter); MoRA: the base (expert wrappers removed) and ``mora/`` (``save_mora``); otherwise
    ``save_pretrained``. All weights are safetensors; ``adapted.json`` records the layout.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"kind": "plain"}
    if _is_peft(model):
        names = list(model.peft_config)
        model.save_pretrained(path / "adapters")
        copy.deepcopy(model).unload().save_pretrained(path / "base")
        manifest = {"kind": "peft", "adapters": names, "active": list(model.base_model.active_adapters)}
    elif any(isinstance(m, MoRALinear) for m in model.modules()):
        save_mora(model, path / "mora")
        some = next(m for m in model.modules() if isinstance(m, MoRALinear))
        base = copy.deepcopy(model)
        for mod in list(base.modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, MoRALinear):
                    setattr(mod, child_name, child.base)
        base.save_pretrained(path / "base")
        manifest = {"kind": "mora", "scale": some.scale, "top_k": some.top_k, "tau": some.tau, "delta": some.delta,
                    "targets": sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, MoRALinear)})}
    else:
        model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / "adapted.json").write_text(json.dumps(manifest))


def load_adapted(path: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_adapted``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    manifest = json.loads((path / "adapted.json").read_text())
    if manifest["kind"] == "plain":
        return AutoModelForCausalLM.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path / "base")
    if manifest["kind"] == "peft":
        from peft import PeftModel

        names = manifest["adapters"]
        sub = (lambda n: path / "adapters") if names == ["default"] else (lambda n: path / "adapters" / n)
        model = PeftModel.from_pretrained(base, sub(names[0]), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(sub(n), adapter_name=n)
        model.base_model.set_adapter(manifest["active"])
        return model
    mora = MoRA(r=1, target_modules=manifest["targets"], top_k=manifest["top_k"], tau=manifest["tau"],
                delta=manifest["delta"])
    mora.scale = manifest["scale"]
    model = mora.setup(base)
    load_mora(model, path / "mora")
    return model


def adapter_classes() -> dict[str, type]:
    """``adapter.name`` -> its class; the class's constructor holds the settings' types and defaults."""
    return {"full": FullFineTuning, "lora": LoRA, "task_lora": TaskLoRA, "mora": MoRA, "hft": HalfFineTuning,
            "reglora": RegLoRA}


def make_adapter(cfg: dict, seed: int = 0, evaluator=None):
    """Build the adapter named by ``cfg['name']`` from the ``adapter`` config block: the settings its
    constructor takes (the rest of its arguments keep the constructor's defaults), the run's seed and
    evaluator where it takes them."""
    import inspect

    name = cfg.get("name", "full")
    if name not in ADAPTERS:
        raise AdapterError(f"adapter.name: '{name}' is not one of {', '.join(ADAPTERS)}")
    cls = adapter_classes()[name]
    params = inspect.signature(cls.__init__).parameters
    run = {"seed": seed, "evaluator": evaluator}
    kwargs = {k: cfg[k] for k in params if k in cfg and k not in run}
    unknown = sorted(set(cfg) - set(params) - {"name"})
    if unknown:
        raise AdapterError(f"adapter.{unknown[0]}: not a setting of adapter {name}")
    if "target_modules" in kwargs:
        kwargs["target_modules"] = list(kwargs["target_modules"])
    return cls(**kwargs, **{k: v for k, v in run.items() if k in params})

