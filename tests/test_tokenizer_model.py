from transformers import AutoTokenizer

from cl.core.data import PromptFormat, collate_prompts, collate_sft
from cl.model import ModelLoadError, build_tiny_llama, count_parameters, load_model_and_tokenizer
from cl.tokenizer import build_char_tokenizer

import pytest


def test_char_tokenizer_roundtrip_through_save_and_from_pretrained(tmp_path):
    build_char_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "A3:123+456=0579"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.unk_token_id in tok("?", add_special_tokens=False)["input_ids"]


def test_default_tiny_model_has_about_one_million_parameters(tmp_path):
    build_tiny_llama(tmp_path)  # the defaults of conf/model/tiny.yaml
    model, tok = load_model_and_tokenizer(tmp_path)
    n = count_parameters(model)
    assert 0.9e6 < n < 1.2e6, n
    assert model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_missing_local_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "nope")


def test_prompt_format_masks_prompt_and_pads(tiny_model_dir):
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    fmt = PromptFormat(tok)
    pairs = fmt.encode(["A:1+2=", "A:10+20="], ["3", "30"])
    p, a = pairs[0]
    assert p[0] == tok.bos_token_id and a[-1] == tok.eos_token_id
    batch = collate_sft(pairs, fmt.pad_id)
    labels = batch["labels"][0]
    assert (labels[: len(p)] == -100).all()
    assert labels[len(p) : len(p) + len(a)].tolist() == a
    assert batch["attention_mask"][0].sum() == len(p) + len(a)
    left = collate_prompts([x for x, _ in pairs], fmt.pad_id)
    assert left["input_ids"][0, 0] == fmt.pad_id and left["attention_mask"][0, 0] == 0
    assert fmt.decode(a) == "3"
