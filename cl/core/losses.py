"""Loss terms shared by objectives and methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl.core.data import IGNORE


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
