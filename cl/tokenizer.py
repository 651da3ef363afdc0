"""A character-level tokenizer for the embedded toy world.

Built with the ``tokenizers`` library (WordLevel model over single characters, ``Fuse`` decoder) and
wrapped in transformers' fast-tokenizer class, so it is saved with ``save_pretrained`` and loaded with
``AutoTokenizer.from_pretrained`` exactly like a real checkpoint's tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
# digits, lowercase letters, uppercase letters (task tags), arithmetic and scratchpad punctuation.
ALPHABET = string.digits + string.ascii_lowercase + string.ascii_uppercase + "+-*=:%,.;<>|#() "


def build_char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """Return a character-level fast tokenizer: one token per character, unknown -> ``<unk>``."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(alphabet))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="right",
        model_max_length=512,
    )


QWEN_STYLE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (256 byte tokens + ``<|endoftext|>`` pad, ``<|im_end|>`` eos,
    ``<|im_start|>``) and a Qwen-style chat template: every UTF-8 text encodes, as with the real Qwen
    tokenizer, so random stand-ins of real models read real data offline (tests, ``scripts/real_check.py``)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = QWEN_STYLE_TEMPLATE
    return tok
