"""What every layer of kvlab needs to know about a loaded transformers model, and nothing above it.

The loaded model and its tokenizer, its attention geometry, where its decoder layers,
attention modules and rotary module live, and the switch of its attention kernel. Parts are
found through the model, never by family: every causal LM in transformers exposes its decoder
through `get_decoder()`, whose `layers` hold one decoder layer per `num_hidden_layers`, and
each layer's attention module carries its `layer_idx`. Anything else is refused with one line.
This module imports nothing of kvlab but `errors`, so cache policies, the cost model and
calibration can read a model without reaching up into the loader.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvlab.errors import KvlabError, first_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class LoadedModel:
    """A model ready to run, with the tokenizer and the identity snapshots record."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    spec: str
    fingerprint: str

    @property
    def config(self):
        return self.model.config

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Prompt token ids; with `chat`, the text is one user turn in the model's chat template."""
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise KvlabError(f"model {self.spec} has no chat template: drop --chat")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        """The `model` block of a snapshot's meta.json."""
        return {"spec": self.spec, "fingerprint": self.fingerprint, **model_shape(self.model.config)}


def model_shape(config) -> dict[str, Any]:
    """Family and attention geometry: what a reader of a cache needs to know."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return {
        "family": text.model_type,
        "n_layers": text.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
    }


def apply_attention(model, attn: str) -> None:
    """Switch the attention kernel, with one clear line when the kernel is not usable here."""
    if getattr(model.config, "_attn_implementation", None) == attn:
        return
    try:
        model.set_attn_implementation(attn)
    except (ValueError, ImportError) as err:
        raise KvlabError(f"attn={attn} cannot be used with this model here: {first_line(err)}") from None


def decoder_layers(model) -> "torch.nn.ModuleList":
    """The decoder layers, in order."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != n_layers:
        raise KvlabError(f"{type(model).__name__}: cannot find its {n_layers} decoder layers (decoder.layers)")
    return layers


def attention_modules(model) -> list["torch.nn.Module"]:
    """The attention module of every decoder layer, in layer order."""
    modules = []
    for index, layer in enumerate(decoder_layers(model)):
        attention = getattr(layer, "self_attn", None)
        if attention is None:
            found = [m for m in layer.modules() if m is not layer and getattr(m, "layer_idx", None) == index]
            attention = found[0] if found else None
        if attention is None:
            raise KvlabError(f"decoder layer {index} of {type(model).__name__} has no attention module kvlab can find")
        modules.append(attention)
    return modules


def rotary_module(model) -> "torch.nn.Module":
    """The model's one rotary embedding module (called as `rotary(x, position_ids)`)."""
    candidates = [m for name, m in model.named_modules()
                  if name.split(".")[-1] == "rotary_emb" or type(m).__name__.endswith("RotaryEmbedding")]
    unique = list({id(m): m for m in candidates}.values())
    if len(unique) != 1:
        raise KvlabError(f"expected one rotary embedding module in {type(model).__name__}, found {len(unique)}")
    return unique[0]


def modeling_function(module: "torch.nn.Module", name: str):
    """A function of the modeling file that defines `module`'s class (e.g. its eager attention)."""
    return getattr(inspect.getmodule(type(module)), name, None)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars and info logs for the block, then restore them."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
