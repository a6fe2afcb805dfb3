"""A byte-level tokenizer built in memory, for the tiny test models.

Each byte is one token (ids 0..255, in byte order) plus a few special tokens, so any text
round-trips and no vocabulary file is needed.
"""

from __future__ import annotations

from functools import lru_cache

SPECIALS = ("<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>")
VOCAB_SIZE = 256 + len(SPECIALS)

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{{ m['content'] }}</s>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """The printable stand-in character of each byte, in byte order (GPT-2 convention)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    stand_ins = iter(range(256, 512))  # the other bytes, in order, past the byte range
    return [chr(b) if b in printable else chr(next(stand_ins)) for b in range(256)]


@lru_cache(maxsize=1)
def byte_tokenizer():
    """A `PreTrainedTokenizerFast` over bytes; cached because it is immutable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for offset, token in enumerate(SPECIALS):
        vocab[token] = 256 + offset
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=list(SPECIALS[3:]))
    tok.chat_template = CHAT_TEMPLATE
    return tok
