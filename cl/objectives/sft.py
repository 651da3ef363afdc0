"""Supervised fine-tuning: token-mean cross-entropy on answer tokens (and eos), prompts masked."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl.data import IGNORE, SFTCollator


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    Args:
        logits: [B, L, V] model outputs for the full sequence.
        labels: [B, L] token ids, -100 where no loss is taken.
    """
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
    )


class SFTObjective:
    """Teacher forcing on reference answers."""

    name = "sft"

    def collate_fn(self, pad_id: int):
        return SFTCollator(pad_id)

    def step(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = answer_cross_entropy(logits, batch["labels"])
        return loss, {"loss": loss.detach()}
