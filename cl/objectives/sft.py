"""Supervised fine-tuning: token-mean cross-entropy on answer tokens (and eos), prompts masked."""

from __future__ import annotations

import torch

from cl.core.data import SFTCollator, model_inputs
from cl.core.losses import answer_cross_entropy  # noqa: F401  (also its public name here)


def training_forward(module):
    """What a training step calls for the model's forward: ``module.forward_train`` (``ContinualLM``: compiled
    under ``train.compile``) or, for any other holder of a ``model``, the model itself."""
    return getattr(module, "forward_train", None) or module.model


class SFTObjective:
    """Teacher forcing on reference answers."""

    name = "sft"

    def collate_fn(self, pad_id: int):
        return SFTCollator(pad_id)

    def step(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = training_forward(module)(**model_inputs(batch)).logits
        loss = answer_cross_entropy(logits, batch["labels"])
        return loss, {"loss": loss.detach()}
