"""Vision-language models: the tiny LLaVA, image tags in prompts, the visual task families, and SFT, GRPO,
generation and adapters on image-carrying batches."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli

TINY_VLM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=64, image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1,
                vision_heads=2)
VISUAL = ("vcount", "vread", "vcolor", "vwhere", "vbigger", "vadd", "vshape")


@pytest.fixture(autouse=True)
def _image_store(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CL_IMAGE_DIR", str(tmp_path_factory.getbasetemp() / "images"))


@pytest.fixture()
def vlm(tmp_path):
    """(model, fmt) of a random tiny LLaVA loaded through the auto classes, with its processor's format."""
    from cl.model import build_tiny, load_model_and_tokenizer
    from cl.vision import make_format

    path = build_tiny(tmp_path / "vlm", seed=0, **TINY_VLM)
    model, tok = load_model_and_tokenizer(path)
    return model, make_format(model, tok, path=path)


def _task(name="vwhere", n_train=40, n_eval=8):
    from tasks.registry import build_task

    return build_task(name, n_train, n_eval, seed=0)


def test_tiny_vlm_loads_through_the_auto_classes_and_expands_each_image(vlm):
    from transformers import LlavaForConditionalGeneration

    from cl.vision import VisionFormat

    model, fmt = vlm
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(fmt, VisionFormat)
    row = _task().train[0]
    (p, a), = fmt.encode([row["prompt"]], [row["answer"]])
    image_id = model.config.image_token_index
    assert p.count(image_id) == (32 // 8) ** 2  # one token per patch, the CLS position dropped
    assert p[0] == fmt.tokenizer.bos_token_id and a[-1] == fmt.eos_id
    assert "<image:" not in fmt.tokenizer.decode(p)
    assert p.visual["pixel_values"].shape == (1, 3, 32, 32)
    assert (p + a).visual is p.visual  # a prompt's sequences carry its pixels


def test_visual_families_are_deterministic_disjoint_and_answered():
    from cl.vision import image_refs, open_image

    for name in VISUAL:
        a, b = _task(name), _task(name)
        assert a.train["prompt"] == b.train["prompt"] and a.eval["answer"] == b.eval["answer"]
        assert not set(a.train["prompt"]) & set(a.eval["prompt"])
        assert len(set(a.eval["prompt"])) == len(a.eval)
        row = a.eval[0]
        assert len(image_refs(row["prompt"])) == 1 and open_image(image_refs(row["prompt"])[0]).size == (32, 32)
        assert a.score([row["answer"], row["answer"] + "x"], **{k: [row[k]] * 2 for k in row}) == [1.0, 0.0]
    assert set(_task("vwhere", 60).train["answer"]) == {"left", "right", "above", "below"}
    assert set(_task("vcount", 60).train["answer"]) == {"1", "2", "3", "4"}


def test_visual_answers_match_the_pixels():
    """The answers read off the drawn pixels: colour of the square, number of red discs (connected regions),
    the disc's side of the square along the axis of the larger gap, the side of the larger disc, the shape from
    its black pixels' bounding box."""
    import numpy as np
    from scipy import ndimage

    from cl.vision import image_refs, open_image
    from tasks.visual import COLORS

    def pixels(row):
        return np.asarray(open_image(image_refs(row["prompt"])[0])).astype(int)

    def mask(px, rgb):
        return (np.abs(px - np.array(rgb)).sum(-1) == 0)

    for row in _task("vcolor", 30).train:
        px = pixels(row)
        assert mask(px, COLORS[row["answer"]]).sum() >= 64 and (px.sum(-1) < 765).sum() == mask(px, COLORS[row["answer"]]).sum()
    for row in _task("vcount", 30).train:
        assert ndimage.label(mask(pixels(row), COLORS["red"]))[1] == int(row["answer"])
    for row in _task("vwhere", 30).train:
        px = pixels(row)
        (dy, dx) = np.argwhere(mask(px, COLORS["blue"])).mean(0) - np.argwhere(mask(px, COLORS["green"])).mean(0)
        want = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
        assert row["answer"] == want
    for row in _task("vbigger", 30).train:
        lab, n = ndimage.label(mask(pixels(row), COLORS["purple"]))
        assert n == 2
        sizes = sorted(((np.argwhere(lab == k)[:, 1].mean(), (lab == k).sum()) for k in (1, 2)))
        assert row["answer"] == ("left" if sizes[0][1] > sizes[1][1] else "right")
    for row in _task("vshape", 60).train:  # the shape from its black pixels' bounding box
        ys, xs = np.nonzero(pixels(row).sum(-1) == 0)
        box = pixels(row)[ys.min():ys.max() + 1, xs.min():xs.max() + 1].sum(-1) == 0
        h, w = box.shape
        want = ("cross" if box[h // 2, w // 2] and not box[0, 0] else "square" if box[0].all() and box[-1].all()
                else "triangle" if box[-1].all() else "disc" if not box[0, 0] and 0 < box[0].sum() < w else "?")
        assert row["answer"] == want, box.astype(int)
    assert set(_task("vshape", 60).train["answer"]) == {"disc", "square", "triangle", "cross"}


def test_sft_loss_is_the_models_own_loss_on_the_answer_tokens(vlm):
    from cl.core.data import SFTCollator
    from cl.objectives.sft import SFTObjective

    model, fmt = vlm
    rows = _task().train.select(range(6))
    batch = SFTCollator(fmt.pad_id)([(p, a, None) for p, a in fmt.encode(rows["prompt"], rows["answer"])])
    assert batch["pixel_values"].shape == (6, 3, 32, 32)

    class Holder:
        pass

    h = Holder()
    h.model = model
    loss, _ = SFTObjective().step(h, batch)
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss, own, rtol=1e-5, atol=1e-6)
    blank = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=torch.zeros_like(batch["pixel_values"]), labels=batch["labels"]).loss
    assert not torch.isclose(own, blank)  # the pixels reach the loss


def test_fast_decoding_gives_generates_greedy_tokens_with_images(vlm):
    from cl.generation import decode_ids, generate_ids

    model, fmt = vlm
    rows = _task("vcount").eval
    prompts = fmt.prompt_ids(rows["prompt"])
    a = generate_ids(model, prompts, fmt, max_new_tokens=6, batch_size=5)
    b = decode_ids(model, prompts, fmt, max_new_tokens=6, batch_size=5)
    assert a == b
    torch.manual_seed(3)
    s1 = generate_ids(model, prompts[:3], fmt, 5, do_sample=True, num_return_sequences=4)
    torch.manual_seed(3)
    s2 = decode_ids(model, prompts[:3], fmt, 5, do_sample=True, num_return_sequences=4)
    assert len(s1) == len(s2) == 12


def test_grpo_step_on_images_updates_the_policy(vlm):
    from cl.objectives.grpo import GRPOObjective, token_logprobs

    model, fmt = vlm
    task = _task("vcolor")
    obj = GRPOObjective(group_size=4, max_new_tokens=6, kl_coef=0.01, reference="base")
    obj.bind(fmt, {task.name: task})
    obj.ref_model = None

    class Ctx:
        pass

    h = Ctx()
    h.model = model
    obj._snapshot(model)
    rows = [task.train[i] for i in range(4)]
    batch = obj.collate_fn(fmt.pad_id)([(p, a, r) for (p, a), r in zip(fmt.encode([r["prompt"] for r in rows],
                                                                                  [r["answer"] for r in rows]), rows)])
    torch.manual_seed(0)
    loss, logs = obj.step(h, batch)
    ro = obj._rollout
    assert torch.isfinite(loss) and "reward" in logs
    # every completion is scored with its own prompt's image (each prompt's pixels repeated G times)
    assert ro.visual["pixel_values"].shape[0] == ro.input_ids.shape[0] == 16
    assert torch.equal(ro.visual["pixel_values"][4:8], batch["prompt_ids"][1].visual["pixel_values"].expand(4, -1, -1, -1))
    lp = token_logprobs(model, ro.input_ids, ro.attention_mask, 1.0, ro.visual)
    torch.testing.assert_close(lp * ro.completion_mask, ro.ref_logp * ro.completion_mask)  # no update yet
    blind = token_logprobs(model, ro.input_ids, ro.attention_mask, 1.0,
                           {"pixel_values": torch.zeros_like(ro.visual["pixel_values"])})
    assert not torch.allclose(lp * ro.completion_mask, blind * ro.completion_mask)
    (lp * ro.completion_mask).sum().backward()  # the policy gradient reaches the image encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "vision_tower" in n)


def test_adapters_wrap_the_language_model_not_the_image_encoder(vlm):
    from cl.adapters import LoRA

    model, _ = vlm
    lora = LoRA(r=2, target_modules=["q_proj", "v_proj"]).setup(model)
    wrapped = [n for n, m in lora.named_modules() if n.endswith(".q_proj") and hasattr(m, "lora_A")]
    assert wrapped and all("language_model" in n for n in wrapped)
    assert not any("lora_" in n for n, _ in lora.named_parameters() if "vision_tower" in n)


def test_mora_leaves_the_image_encoder_alone(tmp_path):
    from cl.adapters import MoRA, MoRALinear
    from cl.model import build_tiny, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(build_tiny(tmp_path / "m", seed=0, **TINY_VLM))
    MoRA(r=2, target_modules=["q_proj"]).setup(model)
    names = [n for n, m in model.named_modules() if isinstance(m, MoRALinear)]
    assert len(names) == TINY_VLM["num_hidden_layers"] and all("language_model" in n for n in names)


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_vlm_smoke_runs_end_to_end(tmp_path, cache_dir, objective):
    """`experiment=vlm_smoke` (a short base stage here) writes the full results contract for SFT and GRPO."""
    out = tmp_path / objective
    proc = run_cli("experiment=vlm_smoke", f"objective={objective}", "base.steps=80", "base.min_steps=30", "base.anneal_steps=40",
                   "stream.steps_per_task=4", "eval.n_per_task=12", "eval.every_n_steps=2", f"hydra.run.dir={out}",
                   timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["tasks"] == ["vread", "vwhere"]
    assert res["general_tasks"] == ["vcolor", "vcount"]
    assert len(res["acc_matrix"]) == 2 and len(res["general_matrix"]) == 2
    for key in ("avg_acc", "forgetting", "general_retention", "stability_gap"):
        assert key in res["metrics"]
    assert (out / "curves.jsonl").read_text().count("\n") > 8


def test_chat_template_puts_the_images_first_in_the_user_turn(vlm):
    """With use_chat_template the processor's template lays out the turn (LLaVA-1.5's: USER, the image, the
    text, ASSISTANT); the image still expands to its tokens and its pixels ride along."""
    from cl.vision import VisionFormat

    model, fmt = vlm
    proc = fmt.processor
    proc.chat_template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                          "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                          "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    chat = VisionFormat(fmt.tokenizer, True, None, processor=proc)
    row = _task().eval[0]
    ids = chat.prompt_ids([row["prompt"]])[0]
    text = fmt.tokenizer.decode([i for i in ids if i != model.config.image_token_index])
    assert text == "USER: where= ASSISTANT:"
    assert ids.count(model.config.image_token_index) == 16 and ids.visual["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("overrides,field", [
    (["experiment=smoke", "stream.tasks=[vread]"], "model"),
    (["experiment=vlm_smoke", "objective=grpo", "objective.rollout_backend=vllm"], "objective.rollout_backend"),
    (["experiment=vlm_smoke", "eval.backend=vllm"], "eval.backend"),
    (["experiment=vlm_smoke", "general_eval=lm_eval"], "general_eval"),
    (["experiment=vlm_smoke", "trainer=fsdp_cpu"], "trainer.strategy"),
])
def test_what_a_vision_model_cannot_do_is_refused_in_one_line(overrides, field):
    from omegaconf import OmegaConf

    from cl.validate import ConfigError, validate_config
    from tests.conftest import compose_cfg

    with pytest.raises(ConfigError) as e:
        validate_config(OmegaConf.to_container(compose_cfg(*overrides), resolve=True))
    assert any(p.startswith(field + ":") and ("image" in p or "vision" in p) for p in e.value.problems), \
        e.value.problems


@pytest.mark.parametrize("preset", ["tiny_vlm", "llava_1_5_7b", "qwen2_5_vl_3b_instruct", "qwen2_5_vl_7b_instruct"])
def test_vision_model_presets_compose_and_validate(preset):
    from omegaconf import OmegaConf

    from cl.validate import validate_config, is_vision_model
    from tests.conftest import compose_cfg

    extra = [] if preset == "tiny_vlm" else ["base=none"]
    cfg = OmegaConf.to_container(compose_cfg(f"model={preset}", *extra, "stream=vision"), resolve=True)
    validate_config(cfg)
    assert is_vision_model(cfg)


def test_image_question_answer_files_load_with_their_images(tmp_path, vlm):
    """User VQA data: a JSONL file whose image column holds paths relative to it, and a Parquet file written
    through datasets' Image feature (the hub's layout: bytes in the file); both become image tags whose
    pixels are the files' own, and a missing image fails in one line naming the row."""
    import datasets
    import numpy as np
    from PIL import Image

    from cl.vision import image_refs, open_image
    from tasks.user_data import DataError, load_user_task

    (tmp_path / "img").mkdir()
    colours = ["red", "blue", "green", "red"]
    for i, c in enumerate(colours):
        Image.new("RGB", (32, 32), c).save(tmp_path / "img" / f"{i}.png")
    rows = [{"image": f"img/{i}.png", "question": "color=", "answer": c} for i, c in enumerate(colours)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (tmp_path / "eval.jsonl").write_text(json.dumps(rows[3]) + "\n")
    task = load_user_task("vqa", str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl"),
                          prompt_column="question", image_column="image")
    refs = [image_refs(p) for p in task.train["prompt"]]
    assert all(len(r) == 1 for r in refs) and "image" not in task.train.column_names
    assert np.asarray(open_image(refs[1][0]))[0, 0].tolist() == [0, 0, 255]
    model, fmt = vlm
    (p, a), = fmt.encode([task.eval[0]["prompt"]], [task.eval[0]["answer"]])
    assert p.visual["pixel_values"].shape == (1, 3, 32, 32) and p.count(model.config.image_token_index) == 16

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": (tmp_path / "img" / f"{i}.png").read_bytes(), "path": None}
                                               for i in range(4)],
                                     "question": ["color="] * 4, "answer": colours}, features=features)
    ds.to_parquet(tmp_path / "train.parquet")
    hub_like = load_user_task("vqa2", str(tmp_path / "train.parquet"), prompt_column="question",
                              image_column="image", eval_fraction=0.25)
    stored = [open_image(image_refs(p)[0]) for p in hub_like.train["prompt"]]
    assert {tuple(np.asarray(im)[0, 0]) for im in stored} <= {(255, 0, 0), (0, 0, 255), (0, 128, 0)}
    assert all(len(image_refs(p)[0]) == 16 for p in hub_like.train["prompt"])  # the file's bytes went to the store

    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "image": "img/none.png"}) + "\n" * 1 +
                                        json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: image file 'img/none.png' .* does not exist"):
        load_user_task("bad", str(tmp_path / "bad.jsonl"), prompt_column="question", image_column="image",
                       eval_fraction=0.5)


def test_prompt_ids_that_lost_their_images_are_caught(vlm):
    """The check GRPO runs on every batch: image tokens without pixel tensors (a batch path that rebuilt the
    lists) fail loudly instead of letting the model read image tokens as text."""
    _, fmt = vlm
    ids = fmt.prompt_ids(_task().eval["prompt"][:2])
    fmt.check_images(ids)
    with pytest.raises(RuntimeError, match="without their pixel tensors"):
        fmt.check_images([list(ids[0]), ids[1]])


def test_lightning_moves_rl_batches_without_stripping_images(vlm):
    """Lightning rebuilds every list it moves to the device; an RL batch's prompt ids keep their images."""
    from cl.core.data import PromptRowsCollator
    from cl.module import ContinualLM
    from cl.objectives.sft import SFTObjective

    model, fmt = vlm
    rows = [dict(r) for r in _task().train.select(range(3))]
    batch = PromptRowsCollator()([(p, a, r) for (p, a), r in zip(fmt.encode([r["prompt"] for r in rows],
                                                                           [r["answer"] for r in rows]), rows)])
    module = ContinualLM(model, SFTObjective(), torch.optim.AdamW)
    moved = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    fmt.check_images(moved["prompt_ids"])
    assert all(m is p for m, p in zip(moved["prompt_ids"], batch["prompt_ids"]))


def test_checkpoints_keep_prompt_images():
    from cl.checkpoint import capture, restore
    from cl.core.data import VisualIds

    ids = VisualIds([1, 2, 3], {"pixel_values": torch.randn(1, 3, 4, 4)})
    back = restore(None, capture({"pairs": [[ids, [4, 5]]]}))["pairs"][0][0]
    assert isinstance(back, VisualIds) and list(back) == [1, 2, 3]
    torch.testing.assert_close(back.visual["pixel_values"], ids.visual["pixel_values"])


def test_peft_targets_pick_the_plain_names_on_a_text_model(tiny_model_dir):
    """The pattern that keeps LoRA off image encoders selects exactly the modules the plain name list did."""
    import re

    from torch import nn

    from cl.adapters import DEFAULT_TARGETS, peft_targets
    from cl.model import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model_dir)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for targets in (list(DEFAULT_TARGETS), ["q_proj", "v_proj"], ["lm_head"], ["down_proj", "lm_head"]):
        assert [n for n in names if re.fullmatch(peft_targets(targets), n)] == \
            [n for n in names if n.rsplit(".", 1)[-1] in targets]


def test_hft_freezes_language_model_matrices_only(vlm):
    from cl.adapters import HalfFineTuning

    model, _ = vlm
    frozen = HalfFineTuning(seed=0).draw(model, 0)
    assert frozen and all("language_model" in n for n in frozen)


def test_generation_never_emits_the_image_token(vlm):
    """A model that prefers the image token still never generates it (greedy or sampled, generate or the fast
    loop): a sampled image token would ask the model for an image that is not there."""
    from cl.generation import decode_ids, generate_ids

    model, fmt = vlm
    image_id = model.config.image_token_index
    def prefer_image_token(module, args, out):
        out.logits[..., image_id] += 100.0

    model.register_forward_hook(prefer_image_token)
    prompts = fmt.prompt_ids(_task("vcount").eval["prompt"][:4])
    from cl.core.data import collate_prompts

    with torch.no_grad():  # unsuppressed, the image token is every row's next token
        assert (model(**collate_prompts(prompts, fmt.pad_id)).logits[:, -1].argmax(-1) == image_id).all()
    for fn in (generate_ids, decode_ids):
        for sample in (False, True):
            out = fn(model, prompts, fmt, 6, do_sample=sample, num_return_sequences=2 if sample else 1)
            assert not any(image_id in c for c in out)
    assert generate_ids(model, prompts, fmt, 6) == decode_ids(model, prompts, fmt, 6)


# --- Qwen2-VL and Qwen2.5-VL: multimodal rotary positions ---

@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl"])
def qwen_vlm(request, tmp_path):
    """(model, fmt) of a random tiny Qwen2-VL / Qwen2.5-VL loaded through the auto classes."""
    from cl.model import build_tiny, load_model_and_tokenizer
    from cl.vision import make_format

    arch = dict(TINY_VLM, num_attention_heads=2, max_position_embeddings=128, family=request.param)
    path = build_tiny(tmp_path / request.param, seed=0, **arch)
    model, tok = load_model_and_tokenizer(path)
    return model, make_format(model, tok, path=path)


def _explicit_types(model, batch):
    """The forward inputs with ``mm_token_type_ids`` built as Qwen's processor returns them (1 on image pads)."""
    from cl.core.data import model_inputs

    inputs = model_inputs(batch)
    pad = model.config.image_token_id
    return {**inputs, "mm_token_type_ids": (inputs["input_ids"] == pad).int()}


def test_qwen_vl_sft_loss_is_the_models_own_loss_with_3d_positions(qwen_vlm):
    from cl.core.data import SFTCollator
    from cl.objectives.sft import SFTObjective

    model, fmt = qwen_vlm
    rows = _task().train.select(range(4))
    batch = SFTCollator(fmt.pad_id)([(p, a, None) for p, a in fmt.encode(rows["prompt"], rows["answer"])])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 4  # 32x32, 8-pixel patches: 4x4, merged to 4 tokens
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [4] * 4

    class Holder:
        pass

    h = Holder()
    h.model = model
    loss, _ = SFTObjective().step(h, batch)
    own = model(**_explicit_types(model, batch), labels=batch["labels"]).loss
    torch.testing.assert_close(loss, own, rtol=1e-5, atol=1e-6)
    from cl.core.data import model_inputs

    inner = model.model  # without the hook Qwen2-VL refuses images without token types and Qwen2.5-VL
    hooks = dict(inner._forward_pre_hooks)  # silently gives the image tokens 1-D positions
    with torch.no_grad():
        ours = model(**model_inputs(batch)).logits
    inner._forward_pre_hooks.clear()
    try:
        if model.config.model_type == "qwen2_vl":
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                model(**model_inputs(batch), labels=batch["labels"])
        else:  # measured: logits move by ~9e-4 (max |logit| ~0.8); fp32 noise is ~1e-7
            with torch.no_grad():
                assert (model(**model_inputs(batch)).logits - ours).abs().max() > 1e-5
    finally:
        inner._forward_pre_hooks.update(hooks)


def test_qwen_vl_generation_equals_a_full_forward_greedy_loop(qwen_vlm):
    """Cached ``generate`` (positions from the token types, then the stored offsets) gives the tokens of a
    greedy loop that recomputes every step from scratch with explicit token types."""
    from cl.core.data import collate_prompts
    from cl.generation import generate_ids

    from PIL import Image

    from cl.vision import store_image

    model, fmt = qwen_vlm
    wide = store_image(Image.new("RGB", (48, 24), (10, 120, 200)))  # another grid, another prompt length
    texts = list(_task("vcount").eval["prompt"][:2]) + [f"see {wide}count=", "count="]  # and one text-only
    prompts = fmt.prompt_ids(texts)
    assert len({len(p) for p in prompts}) > 1  # left padding in the batch
    got = generate_ids(model, prompts, fmt, max_new_tokens=5)
    for p, g in zip(prompts, got):
        seq = list(p)
        want = []
        for _ in range(5):
            batch = collate_prompts([type(p)(seq, p.visual)], fmt.pad_id)
            with torch.no_grad():
                logits = model(**_explicit_types(model, batch)).logits[0, -1]
            logits[list(fmt.suppress_ids)] = -float("inf")
            nxt = int(logits.argmax())
            want.append(nxt)
            seq.append(nxt)
            if nxt == fmt.eos_id:
                break
        assert g == want


def test_qwen_vl_runs_sft_and_grpo_with_lora_end_to_end(tmp_path):
    # Qwen2-VL refuses images without token types: these runs pass only if the hook fires through PEFT
    for family, extra in (("qwen2_vl", ["objective=sft", "adapter=mora"]), ("qwen2_vl", ["objective=grpo", "adapter=lora"]),
                          ("qwen2_5_vl", ["objective=sft"])):
        out = tmp_path / f"{family}-{extra[0].split('=')[1]}-{len(extra)}"
        proc = run_cli("experiment=vlm_smoke", "base=none", f"model.arch.family={family}",
                       "model.arch.max_position_embeddings=128", "stream.steps_per_task=3", "data.n_train=50",
                       "data.n_eval=20", "eval.n_per_task=10", *extra, f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = json.loads((out / "results.json").read_text())
        assert res["tasks"] == ["vread", "vwhere"] and len(res["acc_matrix"]) == 2


def test_processor_without_torchvision_expands_images_like_qwens():
    """The images-only processor repeats each <|image_pad|> once per merged patch and refuses a count mismatch."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    from cl.tokenizer import build_byte_tokenizer
    from cl.vision import QWEN_IMAGE_PAD, QwenVLImageProcessor

    tok = build_byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [QWEN_IMAGE_PAD]})
    proc = QwenVLImageProcessor(tok, Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8,
                                                              merge_size=2, temporal_patch_size=2))
    ims = [Image.new("RGB", (32, 32)), Image.new("RGB", (64, 32))]
    out = proc(text=[f"a{QWEN_IMAGE_PAD}b{QWEN_IMAGE_PAD}"], images=ims)
    grids = out["image_grid_thw"].tolist()
    assert grids == [[1, 4, 4], [1, 4, 8]]
    pad = tok.convert_tokens_to_ids(QWEN_IMAGE_PAD)
    assert int((out["input_ids"] == pad).sum()) == 4 + 8
    assert out["pixel_values"].shape[0] == 16 + 32
    with pytest.raises(ValueError, match="more images"):
        proc(text=[f"a{QWEN_IMAGE_PAD}"], images=ims)


def test_visual_rows_carry_the_cover_key_the_base_stage_uses():
    """Each visual row names its part of the input space (``key``); the base stage trains on covered keys
    only and reports accuracy on covered and uncovered rows by the same keys."""
    from cl.base_stage import cover_keys, covered_split
    from tasks.visual import COLORS

    rows = {n: _task(n, 60, 10).train for n in VISUAL}
    assert rows["vread"]["key"] == [int(a) for a in rows["vread"]["answer"]]
    assert rows["vcount"]["key"] == [int(a) for a in rows["vcount"]["answer"]]
    assert rows["vcolor"]["key"] == [sorted(COLORS).index(a) for a in rows["vcolor"]["answer"]]
    assert all(0 <= int(a) - k <= 9 for a, k in zip(rows["vadd"]["answer"], rows["vadd"]["key"]))
    assert set(rows["vwhere"]["key"]) <= set(range(10)) and len(set(rows["vwhere"]["key"])) > 3
    assert rows["vbigger"]["key"] == [2 if a == "left" else 7 for a in rows["vbigger"]["answer"]]
    assert rows["vshape"]["key"] == [3 * ("disc", "square", "triangle", "cross").index(a) for a in rows["vshape"]["answer"]]
    keys = cover_keys(rows["vread"].to_dict())
    scores = [1.0 if k < 5 else 0.0 for k in keys]
    assert covered_split(scores, keys, (0, 1, 2, 3, 4)) == {"covered": 1.0, "uncovered": 0.0}
    assert cover_keys({"prompt": ["A3:123+456=", "C:abc="]}) == [1, None]  # text tasks: the leading digit


def test_vlm_default_composes_and_validates():
    from omegaconf import OmegaConf

    from cl.validate import validate_config
    from tests.conftest import compose_cfg

    cfg = OmegaConf.to_container(compose_cfg("experiment=vlm_default"), resolve=True)
    validate_config(cfg)
    assert cfg["base"]["cover"] == [0, 1, 2, 3, 4] and cfg["model"]["modality"] == "vision"


def test_hf_fast_is_refused_for_qwen_vl_at_validation(tmp_path):
    """Multimodal rotary positions are computed by the model, which the decode loop does not reproduce: the
    refusal comes from validation (tiny builder family, a hub preset, a local checkpoint), not at the first
    rollout."""
    import json

    from cl.validate import ConfigError, validate_config
    from cl.vision import declared_model_type
    from tests.conftest import compose_cfg

    grpo = ("experiment=vlm_smoke", "objective=grpo", "objective.rollout_backend=hf_fast")
    validate_config(compose_cfg(*grpo))  # the tiny LLaVA: accepted
    for extra in (("model.arch.family=qwen2_vl",), ("model=qwen2_5_vl_7b_instruct", "base=none")):
        with pytest.raises(ConfigError, match="hf_fast decodes text models and LLaVA-style"):
            validate_config(compose_cfg(*grpo, *extra))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    assert declared_model_type({"name_or_path": str(tmp_path)}) == "qwen3_vl"
    assert declared_model_type({"name_or_path": "someone/Qwen2-VL-2B-Instruct-finetune"}) == "qwen2_vl"
    assert declared_model_type({"name_or_path": "/ckpts/qwen2_5_vl_sft"}) == "qwen2_5_vl"
    assert declared_model_type({"name_or_path": None, "modality": "text", "arch": {}}) is None


def test_prompt_pixels_come_from_a_bounded_cache_and_are_read_again_when_dropped(vlm, monkeypatch):
    """Prompt ids hold their images by reference: under a budget that keeps one image, every prompt's
    tensors still come back (re-read and processed), equal to the first processing; pickling (DataLoader
    workers) hands over the tensors themselves."""
    import pickle

    import cl.vision as vision
    from cl.core.data import visual_inputs

    model, fmt = vlm
    prompts = list(_task("vread").train["prompt"][:6])
    full = {p: vision.VisionFormat._process(fmt, p)[1] for p in prompts}
    small = vision.PixelCache(budget_mb=full[prompts[0]]["pixel_values"].numel() * 4 * 1.5 / 2**20)
    monkeypatch.setattr(vision, "PIXELS", small)
    vision.VisionFormat._one.cache_clear()
    ids = fmt.prompt_ids(prompts)
    assert len(small.items) == 1 and small.misses == 0
    for p, row in zip(prompts, ids):
        torch.testing.assert_close(row.visual["pixel_values"], full[p]["pixel_values"], rtol=0, atol=0)
    assert small.misses >= len(prompts) - 1 and len(small.items) == 1
    batch = visual_inputs(ids + [])  # the collators' path: concatenated in row order
    assert batch["pixel_values"].shape[0] == len(prompts) * full[prompts[0]]["pixel_values"].shape[0]
    both = ids[0] + [5, 6]
    torch.testing.assert_close(both.visual["pixel_values"], full[prompts[0]]["pixel_values"])
    back = pickle.loads(pickle.dumps(ids[1]))
    assert list(back) == list(ids[1]) and isinstance(back.visual, dict)
    torch.testing.assert_close(back.visual["pixel_values"], full[prompts[1]]["pixel_values"])
    vision.VisionFormat._one.cache_clear()
