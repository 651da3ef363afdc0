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
