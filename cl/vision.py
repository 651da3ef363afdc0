"""Vision-language models: the embedded tiny VLM, image references in prompts, and image-carrying prompt ids.

**Images in prompts.** A task row's ``prompt`` names its image(s) inline with ``<image:REF>`` tags, where
``REF`` is the 16-hex content hash of a PNG in the image store (``image_dir()``: what the synthetic visual
tasks and the hub loaders write) or a file path. Rows therefore keep images by reference, in datasets,
replay buffers and checkpoints alike; pixels are read when a prompt is tokenized and kept in a bounded
cache (:class:`PixelCache`), read again when a batch needs them after they were dropped.

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
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch

from cl.core.data import PromptFormat, VisualIds
from cl.tokenizer import build_byte_tokenizer, build_char_tokenizer

# Qwen2-VL and Qwen2.5-VL: multimodal rotary positions (M-RoPE) from the token types (image tokens 1, text 0),
# which :func:`add_token_types` derives from the ids for every forward and :func:`generation_inputs` for
# ``generate``; images are written <|vision_start|><|image_pad|><|vision_end|>
QWEN_VL_MODELS = ("qwen2_vl", "qwen2_5_vl")
QWEN_VISION_START, QWEN_IMAGE_PAD, QWEN_VISION_END, QWEN_VIDEO_PAD = \
    "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
# other M-RoPE families: not supported yet
MROPE_MODELS = ("qwen3_vl", "qwen3_vl_moe", "glm4v")


def hf_fast_refusal(model_type: str | None, vision: bool = False) -> str | None:
    """Why ``rollout_backend=hf_fast`` cannot decode a model of this type (``None``: it can); ``vision``: the
    model is known to be a vision-language model (then only LLaVA-style ones pass)."""
    if model_type in QWEN_VL_MODELS + MROPE_MODELS or (vision and model_type != "llava"):
        return (f"hf_fast decodes text models and LLaVA-style models (1-D positions); '{model_type}' computes "
                "its own multimodal positions: use rollout_backend=hf")
    return None


def declared_model_type(model_cfg) -> str | None:
    """The ``model_type`` a ``model`` config will load, as far as it can be told before loading: the tiny
    builder's ``arch.family``, a local checkpoint's ``config.json``, a checkpoint in the local hub cache, or
    a Qwen-VL hub id by its name; ``None`` when unknown."""
    import json
    import re
    from pathlib import Path

    arch, name = model_cfg.get("arch"), model_cfg.get("name_or_path")
    if name is None:
        return (arch or {}).get("family") if model_cfg.get("modality") == "vision" else None
    path = Path(str(name)).expanduser() / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()).get("model_type")
        except (OSError, ValueError):
            return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(name), local_files_only=True).model_type
    except Exception:  # not cached locally: tell the Qwen-VL family from its hub id
        m = re.search(r"qwen(2\.5|2_5|2|3)[-_]vl", str(name).lower())
        return None if m is None else {"2.5": "qwen2_5_vl", "2_5": "qwen2_5_vl", "2": "qwen2_vl",
                                       "3": "qwen3_vl"}[m.group(1)]

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
    image_text: str | None = None  # what an image is written as in the text (default: the processor's token)

    def _text(self, prompt: str) -> str:
        if not self.use_chat_template:
            return IMAGE_TAG.sub(lambda _: self.image_text or self.processor.image_token, prompt)
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
            if image_id in ids and not getattr(ids, "has_images", False):
                raise RuntimeError("prompt ids with image tokens arrived without their pixel tensors "
                                   f"({type(ids).__name__}); the batch path dropped them")

    @lru_cache(maxsize=16384)  # noqa: B019  (a format lives as long as its run; prompts repeat across epochs)
    def _one(self, prompt: str) -> VisualIds:
        ids, visual = self._process(prompt)
        if not visual:
            return VisualIds(ids, {})
        PIXELS.put((self, prompt), visual)
        return VisualIds(ids, partial(self._pixels, prompt))

    def _process(self, prompt: str) -> tuple[list[int], dict]:
        refs = image_refs(prompt)
        images = [open_image(r) for r in refs] or None
        out = self.processor(text=[self._text(prompt)], images=images, return_tensors="pt", add_special_tokens=False)
        ids = out["input_ids"][0].tolist()
        bos = self.tokenizer.bos_token_id
        if not self.use_chat_template and bos is not None:
            ids = [bos] + ids
        visual = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids",
                                                            "mm_token_type_ids")} if images else {}
        return ids, visual

    def _pixels(self, prompt: str) -> dict:
        """The prompt's image tensors: from the pixel cache, else read and processed again."""
        visual = PIXELS.get((self, prompt))
        if visual is None:
            visual = self._process(prompt)[1]
            PIXELS.put((self, prompt), visual)
        return visual


class PixelCache:
    """Processed image tensors by (format, prompt), least recently used dropped beyond a byte budget
    (``CL_PIXEL_CACHE_MB``, default 2048 MiB): prompt ids hold their images by reference, so the pixels of a
    dataset of full-size images need not fit in memory at once; the embedded visual world fits whole."""

    def __init__(self, budget_mb: float | None = None):
        self.budget = int(float(budget_mb if budget_mb is not None else os.environ.get("CL_PIXEL_CACHE_MB", 2048))
                          * 2**20)
        self.items: OrderedDict = OrderedDict()
        self.bytes = 0
        self.misses = 0

    @staticmethod
    def size(visual: dict) -> int:
        return sum(v.numel() * v.element_size() for v in visual.values() if isinstance(v, torch.Tensor))

    def get(self, key):
        visual = self.items.get(key)
        if visual is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        return visual

    def put(self, key, visual: dict) -> None:
        if key in self.items:
            self.bytes -= self.size(self.items.pop(key))
        self.items[key] = visual
        self.bytes += self.size(visual)
        while self.bytes > self.budget and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= self.size(old)


PIXELS = PixelCache()


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

        raise ModelLoadError(f"model: '{config.model_type}' places image tokens with multimodal rotary positions this "
                             f"suite builds for {', '.join(QWEN_VL_MODELS)} only; LLaVA-style and Qwen2(.5)-VL models run")
    from transformers import AutoProcessor

    if config.model_type in QWEN_VL_MODELS:
        try:
            processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (ImportError, AttributeError, ValueError):  # its video processor needs torchvision
            processor = QwenVLImageProcessor.from_pretrained(path)
        return VisionFormat(processor.tokenizer, use_chat_template, system_prompt, processor=processor,
                            image_text=QWEN_VISION_START + QWEN_IMAGE_PAD + QWEN_VISION_END)
    processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return VisionFormat(processor.tokenizer, use_chat_template, system_prompt, processor=processor)


class QwenVLImageProcessor:
    """Qwen2-VL's processor for images only, for machines without torchvision (which ``Qwen2VLProcessor``'s
    video half needs): the checkpoint's tokenizer and its image processor (the PIL backend), each image's
    ``<|image_pad|>`` repeated once per merged patch (``grid_t * grid_h * grid_w / merge_size^2``), as
    ``Qwen2VLProcessor`` does; the chat template is the checkpoint's."""

    image_token = QWEN_IMAGE_PAD

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, chat_template

    @classmethod
    def from_pretrained(cls, path):
        import json

        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        path = Path(path)
        template = None
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        return cls(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path), template)

    def __call__(self, text: list[str], images=None, return_tensors: str = "pt", add_special_tokens: bool = False):
        from transformers import BatchFeature

        feats = dict(self.image_processor(images=images, return_tensors="pt")) if images else {}
        grids = iter(feats.get("image_grid_thw", []))
        merge = self.image_processor.merge_size ** 2
        expanded = []
        for t in text:
            parts = t.split(self.image_token)
            out = parts[0]
            for rest in parts[1:]:
                grid = next(grids, None)
                if grid is None:
                    raise ValueError("the text has more image tokens than images")
                out += self.image_token * (int(grid.prod()) // merge) + rest
            expanded.append(out)
        if next(grids, None) is not None:
            raise ValueError("more images than image tokens in the text")
        enc = self.tokenizer(expanded, add_special_tokens=add_special_tokens, return_tensors=return_tensors, padding=True)
        return BatchFeature({**enc, **feats})

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


def _image_token_types(ids: torch.Tensor, config) -> torch.Tensor:
    """Qwen2(.5)-VL's ``mm_token_type_ids``: 1 on image tokens, 0 on text (no video here)."""
    return (ids == config.image_token_id).int()


def _token_types(module, args, kwargs):
    """Forward pre-hook of a Qwen2(.5)-VL model: ``mm_token_type_ids`` (image tokens 1, text 0) from the ids
    when images are passed without them, so every forward (training, scoring, replay, probes) gets the
    image tokens' 3-D positions."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is not None and kwargs.get("image_grid_thw") is not None and kwargs.get("mm_token_type_ids") is None:
        kwargs["mm_token_type_ids"] = _image_token_types(ids, module.config)
    return args, kwargs


def add_token_types(model) -> None:
    """Install :func:`_token_types` on a Qwen2(.5)-VL model's inner model (reached by every forward, also
    through PEFT wrappers that call the outer ``forward`` directly)."""
    if getattr(model.config, "model_type", None) in QWEN_VL_MODELS:
        model.model.register_forward_pre_hook(_token_types, with_kwargs=True)


def generation_inputs(model, batch: dict) -> dict:
    """``batch`` for ``generate``: Qwen2(.5)-VL computes its positions from ``mm_token_type_ids`` before the
    first forward, so they are added when the batch has images."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in QWEN_VL_MODELS and "image_grid_thw" in batch:
        return {**batch, "mm_token_type_ids": _image_token_types(batch["input_ids"], config)}
    return batch


def _tiny_tokenizer(kind: str):
    """The tiny VLMs' tokenizer: ``char`` (the toy world's characters) or ``byte`` (any text)."""
    if kind not in ("char", "byte"):
        raise ValueError(f"model.arch.tokenizer must be char or byte, got {kind!r}")
    return build_char_tokenizer() if kind == "char" else build_byte_tokenizer()


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
    family: str = "llava",
    seed: int = 0,
) -> Path:
    """Write a randomly initialised tiny LLaVA (CLIP vision tower, projector, Llama language model), its
    tokenizer with an ``<image>`` token and its ``LlavaProcessor`` to ``out_dir``; return it. Each image
    becomes ``(image_size / patch_size)^2`` image tokens (the CLS position is dropped). ``tokenizer``:
    ``char`` (the toy world's characters) or ``byte`` (byte-level: any text, e.g. real benchmarks' rows on a
    random model). ``family``: ``llava``, or ``qwen2_vl`` / ``qwen2_5_vl`` for a tiny model of that
    architecture (:func:`build_tiny_qwen_vl`)."""
    if family in QWEN_VL_MODELS:
        return build_tiny_qwen_vl(out_dir, family, hidden_size, num_hidden_layers, num_attention_heads,
                                  intermediate_size, max_position_embeddings, image_size, patch_size,
                                  vision_hidden_size, vision_layers, vision_heads, tokenizer, seed)
    if family != "llava":
        raise ValueError(f"model.arch.family must be llava, {' or '.join(QWEN_VL_MODELS)}, got {family!r}")
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    from cl.model import tiny_llama_config

    if image_size % patch_size:
        raise ValueError(f"model.arch.image_size {image_size} is not a multiple of patch_size {patch_size}")
    tokenizer = _tiny_tokenizer(tokenizer)
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


def build_tiny_qwen_vl(out_dir, family: str, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                       intermediate_size: int, max_position_embeddings: int, image_size: int, patch_size: int,
                       vision_hidden_size: int, vision_layers: int, vision_heads: int, tokenizer: str,
                       seed: int) -> Path:
    """A randomly initialised tiny Qwen2-VL or Qwen2.5-VL (its vision transformer, patch merger and Qwen2
    language model with multimodal rotary positions) with the character or byte tokenizer plus Qwen's vision
    tokens, and Qwen's image processor (PIL backend), written to ``out_dir``. Images are resized to
    ``image_size`` x ``image_size``: ``(image_size / patch_size)^2 / 4`` image tokens each (2x2 patches merge)."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen2VLImageProcessorPil

    if image_size % (2 * patch_size):
        raise ValueError(f"model.arch.image_size {image_size} is not a multiple of 2 x patch_size {patch_size}")
    if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 2:
        raise ValueError("model.arch.hidden_size / num_attention_heads must be an even integer (rotary pairs)")
    tok = _tiny_tokenizer(tokenizer)
    specials = [QWEN_VISION_START, QWEN_IMAGE_PAD, QWEN_VISION_END, QWEN_VIDEO_PAD]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    half = hidden_size // num_attention_heads // 2  # rotary frequencies per head, split over (t, h, w)
    t_part = half // 4
    section = [t_part, (half - t_part) // 2, half - t_part - (half - t_part) // 2]
    text = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                num_key_value_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
                rope_scaling={"type": "mrope", "mrope_section": section}, tie_word_embeddings=True,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(depth=vision_layers, num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        config_cls = Qwen2VLConfig
        vision = dict(common, embed_dim=vision_hidden_size, hidden_size=hidden_size, mlp_ratio=4)
    else:
        config_cls = Qwen2_5_VLConfig
        vision = dict(common, hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
                      out_hidden_size=hidden_size, window_size=image_size,
                      fullatt_block_indexes=[vision_layers - 1])
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids[QWEN_IMAGE_PAD],
                        video_token_id=ids[QWEN_VIDEO_PAD], vision_start_token_id=ids[QWEN_VISION_START],
                        vision_end_token_id=ids[QWEN_VISION_END], tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    pixels = image_size * image_size
    images = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, merge_size=2,
                                      temporal_patch_size=2)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    images.save_pretrained(out)
    return out
