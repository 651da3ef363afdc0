"""``+optimizer.fused=true`` under ``bf16-mixed``: Lightning's mixed-precision plugin refuses to clip a fused
optimizer; ``ContinualLM`` clips it itself (there is no gradient scaler in bf16), so the run trains as the
foreach optimizer does, clipping included."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import transformers

from cl.module import ContinualLM
from cl.objectives.sft import SFTObjective
from cl.schedule import LRSchedule
from cl.trainer import make_trainer


def _fit(model, fused: bool, clip: float | None, algorithm: str = "norm", steps: int = 3) -> torch.nn.Module:
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (steps * 4, 12), generator=g)
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    opt = partial(torch.optim.AdamW, lr=1e-2, **({"fused": True} if fused else {"foreach": True}))
    module = ContinualLM(model, SFTObjective(), opt, LRSchedule(warmup_steps=0))
    kwargs = {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed", "gradient_clip_val": clip,
              "gradient_clip_algorithm": algorithm}
    make_trainer(steps, kwargs, "test", progress_every=10**9).fit(module, loader)
    return module.model


@pytest.mark.parametrize("algorithm,clip", [("norm", 0.01), ("value", 1e-4)])
def test_fused_adamw_trains_and_clips_under_bf16_mixed_as_foreach_does(algorithm, clip):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16))
    fused = _fit(model, True, clip, algorithm)
    foreach = _fit(model, False, clip, algorithm)
    unclipped = _fit(model, True, None)
    for (name, a), b, c, d in zip(fused.named_parameters(), foreach.parameters(), unclipped.parameters(),
                                  model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    moved = lambda m: sum((p - q).abs().sum().item() for p, q in zip(m.parameters(), model.parameters()))  # noqa: E731
    assert moved(fused) > 0  # it trained
    assert max((a - c).abs().max().item() for a, c in zip(fused.parameters(), unclipped.parameters())) > 1e-4  # clipping bound
