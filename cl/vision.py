"""Vision-language models: the embedded tiny VLM, image references in prompts, and image-carrying prompt ids.

**Images in prompts.** A task row's ``prompt`` names its image(s) inline with ``<image:REF>`` tags, where
``REF`` is the 16-hex content hash of a PNG in the image store (``image_dir()``: what the synthetic visual
tasks and the hub loaders write) or a file path. Rows therefore keep images by reference, in datasets,
replay buffers and checkpoints alike; pixels are read only when a prompt is tokenized.

**Prompt ids with pixels.** :class:`VisionFormat` (a :class:`cl.core.data.PromptFormat`) turns a prompt into
ids through the model's processor, which expands each image into the model's image tokens, and returns them
as :class:`VisualIds`: a ``list[int]`` that also carries the processor's image tensors (``pixel_values``, and
``image_grid_thw`` for Qwen2-VL). Collators and generation concatenate those tensors along their first
dimension in batch order (:func:`visual_inputs`), which is the layout LLaVA and Qwen2-VL forwards expect.
Concatenating ids (``prompt + completion``) keeps the images, so SFT sequences, GRPO rollouts and their
log-prob forwards see the same pixels as the prompt.

**The embedded tiny VLM** (:func:`build_tiny_llava`): a LLaVA model (a small CLIP vision tower, a two-layer
projector and the tiny Llama language model) with the character tokenizer plus an ``<image>`` token, saved
with ``save_pretrained`` together with its ``LlavaProcessor`` and loaded through ``AutoModelForImageTextToText``
and ``AutoProcessor``, the calls that load a real Qwen2.5-VL or LLaVA checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from cl.core.data import PromptFormat, VisualIds
from cl.tokenizer import build_byte_tokenizer, build_char_tokenizer

# vision-language models whose positions depend on where the image tokens are (M-RoPE): not supported yet
MROPE_MODELS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v")
IMAGE_TAG = re.compile(r"<image:([^<>]+)>")
IMAGE_TOKEN = "<image>"
_HASH = re.compile(r"[0-9a-f]{16}")


class ImageError(ValueError):
    """An image reference cannot be read; the message names it."""


def image_dir() -> Path:
    """The image store: ``$CL_IMAGE_DIR``, else ``~/.cache/cl-suite/images``."""
    return Path(os.environ.get("CL_IMAGE_DIR", "~/.cache/cl-suite/images")).expanduser()


def store_image(image) -> str:
    """Write a PIL image to the store as PNG (content-addressed: the same pixels, the same file) and return
    its prompt tag ``<image:HASH>``."""
    h = hashlib.sha256(f"{image.mode}/{image.size[0]}x{image.size[1]}/".encode())
    h.update(image.tobytes())  # the pixels name the file, not the encoder's bytes (zlib versions differ)
    ref = h.hexdigest()[:16]
    path = image_dir() / f"{ref}.png"
    if not path.exists():
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return f"<image:{ref}>"


@lru_cache(maxsize=1024)
def open_image(ref: str):
    """The RGB image a tag's ``REF`` names: a store hash or a file path."""
    from PIL import Image

    path = image_dir() / f"{ref}.png" if _HASH.fullmatch(ref) else Path(ref).expanduser()
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"image '{ref}' cannot be read ({path}): {str(e).splitlines()[0]}") from None


def image_refs(prompt: str) -> list[str]:
    return IMAGE_TAG.findall(prompt)


@dataclass(frozen=True)
class VisionFormat(PromptFormat):
    """:class:`PromptFormat` for vision-language models: ``<image:REF>`` tags become the processor's image
    tokens, and prompt ids are :class:`VisualIds` carrying the image tensors.

    Without a chat template the prompt's text, with one image token where each tag stood, is tokenized
    (after the tokenizer's bos); with one the images lead the user turn (``{"type": "image"}`` parts, then
    the text), as the Qwen2-VL and LLaVA chat templates lay them out.
    """

    processor: object = None

    def _text(self, prompt: str) -> str:
        if not self.use_chat_template:
            return IMAGE_TAG.sub(self.processor.image_token, prompt)
        n = len(image_refs(prompt))
        content = [{"type": "image"}] * n + [{"type": "text", "text": IMAGE_TAG.sub("", prompt)}]
        msgs = ([{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}]
                if self.system_prompt else [])
        msgs.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return [self._one(p) for p in prompts]

    @property
    def suppress_ids(self) -> tuple[int, ...]:
        return (self.tokenizer.convert_tokens_to_ids(self.processor.image_token),)

    def check_images(self, ids_list) -> None:
        """Raise if some prompt ids hold image tokens but no image tensors (they lost them on the way: the model
        would read the image tokens as plain text, silently)."""
        image_id = self.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        for ids in ids_list:
            if image_id in ids and not getattr(ids, "visual", None):
                raise RuntimeError("prompt ids with image tokens arrived without their pixel tensors "
                                   f"({type(ids).__name__}); the batch path dropped them")

    @lru_cache(maxsize=16384)  # noqa: B019  (a format lives as long as its run; prompts repeat across epochs)
    def _one(self, prompt: str) -> VisualIds:
        refs = image_refs(prompt)
        images = [open_image(r) for r in refs] or None
        out = self.processor(text=[self._text(prompt)], images=images, return_tensors="pt", add_special_tokens=False)
        ids = out["input_ids"][0].tolist()
        bos = self.tokenizer.bos_token_id
        if not self.use_chat_template and bos is not None:
            ids = [bos] + ids
        visual = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids",
                                                            "mm_token_type_ids")} if images else {}
        return VisualIds(ids, visual)


def is_vision_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def make_format(model_or_path, tokenizer, use_chat_template: bool = False, system_prompt: str | None = None,
                path: str | Path | None = None, trust_remote_code: bool = False) -> PromptFormat:
    """The prompt format for a loaded model: :class:`VisionFormat` with the checkpoint's processor for a
    vision-language model (``path``: where it was loaded from), :class:`PromptFormat` otherwise."""
    config = getattr(model_or_path, "config", None)
    if config is None or not is_vision_config(config):
        return PromptFormat(tokenizer, use_chat_template, system_prompt)
    if config.model_type in MROPE_MODELS:
        from cl.model import ModelLoadError

        raise ModelLoadError(f"model: '{config.model_type}' places image tokens with multimodal rotary positions, whose "
                         "inputs (mm_token_type_ids) this suite does not build yet; LLaVA-style models run")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return VisionFormat(processor.tokenizer, use_chat_template, system_prompt, processor=processor)


def build_tiny_llava(
    out_dir: str | Path,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    tokenizer: str = "char",
    seed: int = 0,
) -> Path:
    """Write a randomly initialised tiny LLaVA (CLIP vision tower, projector, Llama language model), its
    tokenizer with an ``<image>`` token and its ``LlavaProcessor`` to ``out_dir``; return it. Each image
    becomes ``(image_size / patch_size)^2`` image tokens (the CLS position is dropped). ``tokenizer``:
    ``char`` (the toy world's characters) or ``byte`` (byte-level: any text, e.g. real benchmarks' rows on a
    random model)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    from cl.model import tiny_llama_config

    if image_size % patch_size:
        raise ValueError(f"model.arch.image_size {image_size} is not a multiple of patch_size {patch_size}")
    if tokenizer not in ("char", "byte"):
        raise ValueError(f"model.arch.tokenizer must be char or byte, got {tokenizer!r}")
    tokenizer = build_char_tokenizer() if tokenizer == "char" else build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = tiny_llama_config(tokenizer, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
                             max_position_embeddings)
    vision = CLIPVisionConfig(hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden_size)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                do_resize=True, do_center_crop=True)
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
