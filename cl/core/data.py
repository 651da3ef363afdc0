"""Turning (prompt, answer) rows into token ids and padded batches.

A training sequence is ``prompt_ids + answer_ids + [eos]``; the loss sees only the answer and eos
(labels are -100 on the prompt and on padding). ``prompt_ids`` come either from the raw prompt (with
the tokenizer's bos, the toy world) or from the tokenizer's chat template (instruct models).
Training batches are right-padded; generation batches are left-padded. Prompt ids of vision-language
models are :class:`VisualIds` (``cl.vision``), whose image tensors every batch carries along.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset as TorchDataset

IGNORE = -100


@dataclass(frozen=True)
class PromptFormat:
    """How prompts and answers become ids for one tokenizer.

    Attributes:
        tokenizer: a transformers tokenizer with ``eos_token_id`` and ``pad_token_id``.
        use_chat_template: wrap the prompt as one user turn and add the generation prompt.
        system_prompt: optional system turn for chat templates.
    """

    tokenizer: object
    use_chat_template: bool = False
    system_prompt: str | None = None

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def suppress_ids(self) -> tuple[int, ...]:
        """Tokens generation never emits (a vision-language model's image token: a sampled one would ask the
        model for an image that is not there)."""
        return ()

    def prompt_texts(self, prompts: list[str]) -> list[str]:
        if not self.use_chat_template:
            return list(prompts)
        out = []
        for p in prompts:
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            msgs.append({"role": "user", "content": p})
            out.append(self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        return out

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(self.prompt_texts(prompts), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if not self.use_chat_template and bos is not None:
            ids = [[bos] + x for x in ids]
        return ids

    def answer_ids(self, answers: list[str]) -> list[list[int]]:
        ids = self.tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        return [x + [self.eos_id] for x in ids]

    def encode(self, prompts: list[str], answers: list[str]) -> list[tuple[list[int], list[int]]]:
        return list(zip(self.prompt_ids(prompts), self.answer_ids(answers), strict=True))

    def decode(self, ids: list[int]) -> str:
        """Decode completion ids up to (not including) the first eos."""
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class VisualIds(list):
    """Token ids (a plain ``list[int]`` to every reader) with the image tensors of the images they show in
    ``visual`` (``{}`` when none). ``visual`` may be given as a dict or as a zero-argument callable that
    returns one when read (pixels produced on demand rather than held by every prompt). ``ids + other``
    keeps ``visual``; pickling and copying hand over the tensors themselves."""

    def __init__(self, ids=(), visual=None):
        super().__init__(ids)
        self._visual = visual or {}

    @property
    def visual(self) -> dict:
        return self._visual() if callable(self._visual) else self._visual

    @property
    def has_images(self) -> bool:
        """Whether these ids carry image tensors (without producing them when they come on demand)."""
        return callable(self._visual) or bool(self._visual)

    def __add__(self, other):
        return VisualIds(list.__add__(self, list(other)), self._visual)

    def __reduce__(self):
        return (VisualIds, (list(self), self.visual))


def visual_inputs(seqs, repeat: int = 1) -> dict[str, torch.Tensor]:
    """The image tensors of a batch of ids, each key concatenated along dim 0 in row order, every row's tensors
    ``repeat`` times (a row expanded into ``repeat`` sequences); ``{}`` when no row has an image."""
    parts: dict[str, list[torch.Tensor]] = {}
    for s in seqs:
        for k, v in getattr(s, "visual", {}).items():
            parts.setdefault(k, []).extend([v] * repeat)
    return {k: torch.cat(v, 0) for k, v in parts.items()}


def model_inputs(batch: dict, device=None) -> dict:
    """A collated batch's forward inputs: ``input_ids``, ``attention_mask`` and any image tensors (not the
    labels or other bookkeeping), moved to ``device`` when given."""
    out = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


class TaskExamples(TorchDataset):
    """Training rows with their token ids: items are ``(prompt_ids, answer_ids, row)`` (row ``None`` when
    no rows are given: SFT needs only the ids)."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], rows: list[dict] | None = None):
        if rows is not None and len(pairs) != len(rows):
            raise ValueError("pairs and rows differ in length")
        self.pairs, self.rows = pairs, rows if rows is not None else [None] * len(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        return (*self.pairs[i], self.rows[i])


class PromptRowsCollator:
    """Batches for RL objectives: prompt ids (unpadded; rollouts pad them) and the rows for the verifier."""

    def __call__(self, items) -> dict:
        return {"prompt_ids": [it[0] for it in items], "rows": [it[2] for it in items]}




def collate_sft(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``prompt + answer`` sequences.

    Returns:
        ``input_ids`` [B, L], ``attention_mask`` [B, L], ``labels`` [B, L] (-100 outside answers), and the
        prompts' image tensors (:func:`visual_inputs`) when they carry images.
    """
    length = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **visual_inputs([p for p, _ in pairs])}


class SFTCollator:
    """Picklable collate function for DataLoaders."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        return collate_sft([(it[0], it[1]) for it in items], self.pad_id)


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation: ``input_ids`` [B, L], ``attention_mask`` [B, L] (and the prompts' image
    tensors, :func:`visual_inputs`)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask, **visual_inputs(prompts)}
