"""Learning objectives composed into ``ContinualLM``: ``step(module, batch) -> (loss, logs)``."""

from typing import Protocol

import torch


class Objective(Protocol):
    """What ``ContinualLM.training_step`` calls; SFT and RL objectives implement it."""

    name: str

    def step(self, module, batch: dict) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]: ...

    def collate_fn(self, pad_id: int):
        """The DataLoader's collate function for this objective's batches (padded sequences for SFT,
        prompt ids and rows for RL)."""
        ...
