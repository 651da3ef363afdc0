"""Batched generation with the KV cache (``transformers`` ``generate``), returning completion ids.

Used for greedy evaluation of non-exact verifiers, for pass@k of the base stage and for RL rollouts.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from cl.core.data import PromptFormat, collate_prompts
from cl.fsdp import synced_generation


@contextmanager
def eval_mode(model: torch.nn.Module):
    """``model.eval()`` inside the block, the previous train/eval mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    fmt: PromptFormat,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 256,
) -> list[list[int]]:
    """Generate completions for every prompt.

    Returns:
        ``len(prompt_ids) * num_return_sequences`` completion id lists (prompt removed, cut after the
        first eos, eos kept), grouped by prompt: rows ``i*n .. i*n+n-1`` belong to prompt ``i``.
    """
    out: list[list[int]] = []
    device = next(model.parameters()).device
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    if synced_generation(model):  # sharded: every rank steps until all ranks' completions have ended
        sampling["synced_gpus"] = True
    with eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            batch = collate_prompts(prompt_ids[start : start + batch_size], fmt.pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            seqs = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                num_return_sequences=num_return_sequences,
                pad_token_id=fmt.pad_id,
                eos_token_id=fmt.eos_id,
                **sampling,
            )
            for row in seqs[:, batch["input_ids"].size(1) :].tolist():
                if fmt.eos_id in row:
                    row = row[: row.index(fmt.eos_id) + 1]
                out.append(row)
    return out
