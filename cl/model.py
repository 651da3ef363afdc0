"""Building and loading causal LMs and their tokenizers.

The embedded default builds a small Llama-architecture model from a config plus the character-level
tokenizer, writes both with ``save_pretrained`` and loads them back with ``from_pretrained`` -- the
same call that loads a real checkpoint from a hub id or a local directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig,
                          LlamaConfig, LlamaForCausalLM)

from cl.tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded; the message names the path or hub id."""


def tiny_llama_config(tokenizer, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                      intermediate_size: int, max_position_embeddings: int) -> LlamaConfig:
    """The embedded language model's config for ``tokenizer`` (tied embeddings, full multi-head attention)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 64,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised tiny Llama and the char tokenizer to ``out_dir``; return it."""
    tokenizer = build_char_tokenizer()
    config = tiny_llama_config(tokenizer, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
                               max_position_embeddings)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_model_and_tokenizer(
    name_or_path: str | Path, trust_remote_code: bool = False, dtype: str = "float32"
):
    """Load ``(model, tokenizer)`` from a local directory or a hub id (a vision-language checkpoint through
    ``AutoModelForImageTextToText``; its processor: :func:`cl.vision.make_format`).

    The tokenizer gets a pad token (eos) when it has none, and the model's generation config is reset
    to a neutral one so that decoding settings come only from this suite's config (a checkpoint's own
    sampling defaults, e.g. a repetition penalty, would otherwise leak into greedy evaluation).
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    src = str(name_or_path)
    looks_local = src.startswith((".", "/", "~")) or Path(src).expanduser().exists()
    if looks_local and not Path(src).expanduser().is_dir():
        raise ModelLoadError(f"model.name_or_path: local directory '{src}' does not exist")
    src = str(Path(src).expanduser()) if looks_local else src
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
        # a vision-language checkpoint (LLaVA, Qwen2-VL, ...) loads through the image-text-to-text class
        auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
        model = auto.from_pretrained(src, trust_remote_code=trust_remote_code, dtype=DTYPES[dtype])
    except OSError as e:
        raise ModelLoadError(f"model.name_or_path: cannot load '{src}': {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(config, "vision_config", None) is not None:
        from cl.vision import add_token_types

        add_token_types(model)  # Qwen2(.5)-VL: the token types its image positions need, on every forward
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, tokenizer


def build_tiny(out_dir: str | Path, seed: int = 0, **arch) -> Path:
    """The embedded model of ``arch``: a tiny LLaVA (:func:`cl.vision.build_tiny_llava`) when it has vision
    settings (``image_size``), else the tiny Llama (:func:`build_tiny_llama`)."""
    if "image_size" in arch:
        from cl.vision import build_tiny_llava

        return build_tiny_llava(out_dir, seed=seed, **arch)
    return build_tiny_llama(out_dir, seed=seed, **arch)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters, counting tied weights once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
