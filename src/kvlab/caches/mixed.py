"""`cache=mixed:bits=4,hot=128,scheme=kivi,group=32`: the policy (parameters, build, session, export).

The cache itself is `kvlab.caches.mixed_layer.MixedLayer`, imported when a cache is built so
that parsing a run spec does not load torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

from kvlab.attention import native
from kvlab.caches.mixed_layer import MixedLayer, flash_session
from kvlab.caches.registry import CachePolicy, register
from kvlab.errors import KvlabError
from kvlab.model_facts import model_shape
from kvlab.quant.blocks import SchemeSpec

SCHEME_BITS = {"q8_0": 8, "q4_0": 4, "fp8": 8}  # kivi takes bits=2, 4 or 8


@register("mixed")
@dataclass(frozen=True)
class MixedPolicy(CachePolicy):
    """Hot window in full precision, older tokens in quantized blocks, flash-decoding over both.

    bits: 2, 4 or 8 for kivi (default 4); q8_0, q4_0 and fp8 fix their own (8, 4, 8).
    hot: tokens kept in full precision (0 allowed). group: tokens per block, and kivi's value
    group (channels, capped at head_dim). split: tokens flash-decoding dequantizes at once (a
    multiple of group) on the PyTorch path: the working memory of a decode step; larger splits
    make fewer, larger calls, which on CPU is most of the cost of small ones.
    kernel: how a CPU decode step reads the blocks. `native`: the compiled kernel
    (`kvlab.attention.native`), which dequantizes each block inside the attention loop;
    `torch`: PyTorch ops, one split at a time; `auto`: native where it builds, else torch.
    """

    bits: Literal[2, 4, 8] | None = None
    hot: int = 128
    scheme: Literal["kivi", "q8_0", "q4_0", "fp8"] = "kivi"
    group: int = 32
    split: int = 4096
    kernel: Literal["auto", "native", "torch"] = "auto"

    lossless = False

    @property
    def n_bits(self) -> int:
        return SCHEME_BITS.get(self.scheme, self.bits if self.bits is not None else 4)

    def validate(self) -> None:
        if self.hot < 0:
            raise ValueError(f"hot must be 0 or more tokens, got {self.hot}")
        if self.group < 1:
            raise ValueError(f"group must be at least 1 token, got {self.group}")
        if self.split < self.group or self.split % self.group:
            raise ValueError(f"split ({self.split}) must be a positive multiple of group ({self.group})")
        fixed = SCHEME_BITS.get(self.scheme)
        if fixed is not None and self.bits is not None and self.bits != fixed:
            raise ValueError(f"scheme {self.scheme} stores {fixed} bits; drop bits= or set bits={fixed}")

    def scheme_spec(self):
        return SchemeSpec(self.scheme, self.n_bits, self.group, self.group)

    def build(self, model, *, batch_size: int = 1, max_length: int | None = None):
        from transformers import Cache

        shape = model_shape(model.config)
        spec = self.scheme_spec()
        use_native = self._native()
        try:
            layers = [MixedLayer(spec, shape["head_dim"], self.hot, self.split // self.group, native=use_native)
                      for _ in range(shape["n_layers"])]
        except ValueError as err:
            raise KvlabError(f"cache={self.spec()}: {err} (head_dim {shape['head_dim']})") from None
        return Cache(layers=layers)

    def _native(self) -> bool:
        """Whether decode steps on CPU use the compiled kernel (built here, once, if need be)."""
        if self.kernel == "torch":
            return False
        reason = native.unavailable_reason()
        if reason is None:
            return True
        if self.kernel == "native":
            raise KvlabError(f"cache={self.spec()}: the native kernel is unavailable: {reason}")
        native.note_fallback(reason)
        return False

    def session(self, model) -> contextlib.AbstractContextManager:
        return flash_session(model)

    def export(self, cache):
        """The dequantized view per layer, plus the raw blocks: `layers.{i}.keys.q`, `.keys.scale`,
        `.keys.zero` (kivi), `.keys.hot` and the same for values."""
        layers, extras = [], {}
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, MixedLayer) or not layer.is_initialized:
                raise ValueError("a cache layer was never filled; was the model run with this cache?")
            layers.append(layer.dequantized())
            for name, tensor in layer.raw().items():
                extras[f"layers.{i}.{name}"] = tensor
        return layers, extras
