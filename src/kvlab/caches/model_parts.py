"""Where the parts of a transformers decoder live, found through the model, never by family.

Every causal LM in transformers exposes its decoder through `get_decoder()`, whose `layers`
hold one decoder layer per `num_hidden_layers`; each layer's attention module carries its
`layer_idx`. Anything else is refused with one line.
"""

from __future__ import annotations

import inspect

import torch

from kvlab.errors import KvlabError


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers, in order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != n_layers:
        raise KvlabError(f"{type(model).__name__}: cannot find its {n_layers} decoder layers (decoder.layers)")
    return layers


def attention_modules(model) -> list[torch.nn.Module]:
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


def modeling_function(module: torch.nn.Module, name: str):
    """A function of the modeling file that defines `module`'s class (e.g. its eager attention)."""
    return getattr(inspect.getmodule(type(module)), name, None)
