"""Batched generation with the KV cache, returning completion ids: transformers' ``generate``
(``generate_ids``) and a minimal decode loop over the model's own cache (``decode_ids``, GRPO's
``rollout_backend=hf_fast``).

Used for greedy evaluation of non-exact verifiers, for pass@k of the base stage and for RL rollouts.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from cl.core.data import PromptFormat, collate_prompts, visual_inputs
from cl.vision import generation_inputs, hf_fast_refusal
from cl.fastdecode import kernel_for
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


def cut_after_eos(rows: list[list[int]], eos_id: int) -> list[list[int]]:
    """Each completion up to and including its first end-of-sequence token (whole if it has none)."""
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


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
    if fmt.suppress_ids:
        sampling["suppress_tokens"] = list(fmt.suppress_ids)
    if synced_generation(model):  # sharded: every rank steps until all ranks' completions have ended
        sampling["synced_gpus"] = True
    with eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            batch = collate_prompts(prompt_ids[start : start + batch_size], fmt.pad_id)
            batch = generation_inputs(model, {k: v.to(device) for k, v in batch.items()})
            seqs = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                num_return_sequences=num_return_sequences,
                pad_token_id=fmt.pad_id,
                eos_token_id=fmt.eos_id,
                **sampling,
            )
            out += cut_after_eos(seqs[:, batch["input_ids"].size(1) :].tolist(), fmt.eos_id)
    return out


def _forward_keywords(model: torch.nn.Module) -> tuple[str, bool]:
    """The KV-cache keyword of the model's forward (``cache`` in transformers >= 5.x, ``past_key_values``
    before) and whether it takes ``logits_to_keep`` and ``position_ids``. PEFT wrappers are looked through."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params, "position_ids" in params


# generation-config settings that make generate add a logits processor or change decoding; decode_ids applies
# none of them, so a model whose config sets one (to other than transformers' default) is refused
_PROCESSOR_SETTINGS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "encoder_repetition_penalty",
                       "encoder_no_repeat_ngram_size", "suppress_tokens", "begin_suppress_tokens",
                       "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "min_length", "min_p",
                       "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "renormalize_logits",
                       "remove_invalid_values", "exponential_decay_length_penalty", "guidance_scale",
                       "watermarking_config", "cache_implementation", "num_beams", "penalty_alpha")


COMPILE_BUCKET = 32  # decode_ids(compile_step=True): buffer lengths are rounded up to a multiple of this


@torch.no_grad()
def decode_ids(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    fmt: PromptFormat,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 256,
    use_kernel: bool = True,
    static_step: bool | None = None,
    compile_step: bool = False,
) -> list[list[int]]:
    """``generate_ids`` as a minimal decode loop: over ``cl.fastdecode``'s kernel for the Llama family
    (Llama, Mistral, Qwen2, Qwen3, with plain peft LoRA layers), else over the model's own KV cache
    (``DynamicCache``; also with ``use_kernel=False``).

    What ``generate`` does for this case, without its per-step machinery: one prefill, then one
    single-token forward per new token with the left-padded attention mask and position ids extended by
    one; the next-token scores pass through transformers' own logits processors in ``generate``'s order
    (``min_new_tokens`` from the model's generation config, the format's suppressed tokens, then temperature
    and top-p, top-k off), and
    tokens are drawn with ``torch.multinomial`` on their softmax (greedy: argmax); finished rows get the pad
    token; the loop stops when every row has ended. So greedy tokens are those of ``generate``, and a
    sampled run consumes the RNG as ``generate`` does (same draws on the same logits).

    On a CUDA device the kernel's single-token step has fixed shapes and is replayed as a CUDA graph
    (``static_step``; ``None``: on CUDA, ``True`` on any device, where it runs eagerly off CUDA): keys and
    values span the whole buffer with the unfilled part masked, so the logits match the step's to float
    rounding (the attention sums over more, all-zero-weighted, positions). Off CUDA, ``compile_step`` runs
    that static step through ``torch.compile`` (``cl.fastdecode.compiled_step``; the first batch of each shape
    pays the compilation: 8 s with Inductor's on-disk cache warm, 25 s cold, measured on the tiny model),
    with the buffer rounded up to a multiple of ``COMPILE_BUCKET`` positions so that prompts of nearby
    lengths share one compiled step; on CUDA the step is a CUDA graph either way.

    One difference, for speed: with ``num_return_sequences = n > 1`` each distinct prompt is prefilled once
    and its cache repeated ``n`` times (``generate`` prefills all ``n`` copies). The logits are the same
    up to the matrix-product blocking of a smaller batch (last-bit differences at most), so the sampling
    distribution is the same.

    Generation-config processors other than ``min_new_tokens`` (repetition penalty, bad words, min-p, ...)
    are not applied: ``ValueError`` if the model's generation config sets one. Models whose cache holds
    linear-attention states prefill every copy (their states are not repeated). On Apple MPS ``generate``
    defers its stop check by one step, so its draws there can differ from these after the first batch.
    """
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                        SuppressTokensLogitsProcessor)

    from transformers import GenerationConfig

    gc, neutral = model.generation_config, GenerationConfig()
    extra = [k for k in _PROCESSOR_SETTINGS if getattr(gc, k, None) != getattr(neutral, k, None)]
    if extra:
        raise ValueError(f"rollout_backend=hf_fast does not apply the model's generation-config setting(s) "
                         f"{', '.join(extra)}; use rollout_backend=hf")
    config = getattr(model, "config", None)
    why = hf_fast_refusal(getattr(config, "model_type", None), vision=getattr(config, "vision_config", None) is not None)
    if why:
        raise ValueError(f"rollout_backend={why}")
    device = next(model.parameters()).device
    n = num_return_sequences
    out: list[list[int]] = []
    with eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):  # batches as generate_ids: same RNG draws
            chunk = prompt_ids[start : start + batch_size]
            batch = collate_prompts(chunk, fmt.pad_id)
            ids0, mask0 = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            pos0 = (mask0.cumsum(-1) - 1).masked_fill(mask0 == 0, 0)
            length = ids0.size(1)
            procs = []
            if gc.min_new_tokens:
                procs.append(MinNewTokensLengthLogitsProcessor(length, gc.min_new_tokens, fmt.eos_id, device=device))
            if fmt.suppress_ids:  # generate's place for suppress_tokens: before the sampling warpers
                procs.append(SuppressTokensLogitsProcessor(list(fmt.suppress_ids), device=device))
            if do_sample and temperature != 1.0:
                procs.append(TemperatureLogitsWarper(temperature))
            if do_sample and top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p))
            kernel = kernel_for(model)[0] if use_kernel else None
            total = length + max_new_tokens
            compiled = compile_step and not ids0.is_cuda
            bucketed = -(-total // COMPILE_BUCKET) * COMPILE_BUCKET  # one compiled step for nearby lengths
            if compiled and kernel is not None and kernel.fits(bucketed):
                total = bucketed
            if kernel is not None and kernel.fits(total):
                logits = kernel.prefill(ids0, mask0, pos0, total, repeat=n)
                static = compiled or (ids0.is_cuda if static_step is None else static_step)
                step = kernel.static_step(compiled=compiled) if static else kernel.step
            else:
                logits, step = _hf_prefill(model, chunk, ids0, mask0, pos0, n, device)
            seq, mask = ids0.repeat_interleave(n, 0), mask0.repeat_interleave(n, 0)
            pos = pos0[:, -1:].repeat_interleave(n, 0)
            unfinished = torch.ones(seq.size(0), dtype=torch.long, device=device)
            for t in range(max_new_tokens):
                scores = logits
                for proc in procs:  # LogitsProcessorList's order, without its per-call signature inspection
                    scores = proc(seq, scores)
                if do_sample:
                    nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    nxt = torch.argmax(scores, dim=-1)
                nxt = nxt * unfinished + fmt.pad_id * (1 - unfinished)
                seq = torch.cat([seq, nxt[:, None]], dim=-1)
                unfinished = unfinished & (nxt != fmt.eos_id).long()
                if t + 1 == max_new_tokens or not bool(unfinished.any()):
                    break
                mask = torch.cat([mask, mask.new_ones((mask.size(0), 1))], dim=-1)
                pos = pos + 1
                logits = step(nxt[:, None], mask, pos)
            out += cut_after_eos(seq[:, length:].tolist(), fmt.eos_id)
    return out


def _hf_prefill(model, chunk, ids0, mask0, pos0, n: int, device):
    """The model's own forward over a ``DynamicCache``: the prompts' next-token logits (float32, each row
    repeated ``n`` times) and the single-token step ``(ids, mask, pos) -> logits``."""
    from transformers import DynamicCache

    cache_kw, keep_kw, pos_kw = _forward_keywords(model)
    keep = {"logits_to_keep": 1} if keep_kw else {}
    cache = DynamicCache(config=getattr(model, "config", None))
    share = n > 1 and not any(getattr(cache, "is_linear", None) or [])  # linear-attention states do not repeat
    first_ids, first_mask, first_pos = (ids0, mask0, pos0) if share or n == 1 else (
        ids0.repeat_interleave(n, 0), mask0.repeat_interleave(n, 0), pos0.repeat_interleave(n, 0))
    images = {k: v.to(device) for k, v in visual_inputs(chunk, 1 if share else n).items()}  # prefill only
    logits = model(input_ids=first_ids, attention_mask=first_mask, use_cache=True, **{cache_kw: cache}, **keep,
                   **images, **({"position_ids": first_pos} if pos_kw else {})
                   ).logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
    if share:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)

    def step(ids, mask, pos):
        return model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kw: cache}, **keep,
                     **({"position_ids": pos} if pos_kw else {})
                     ).logits[:, -1].to(copy=True, dtype=torch.float32, device=device)

    return logits, step
