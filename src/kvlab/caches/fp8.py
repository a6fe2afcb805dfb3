"""`cache=fp8`: K/V stored as float8 with fixed scales, dequantized (`q * scale`) for attention.

    cache=fp8:scales=PATH|calibrate|prefill,granularity=tensor|head,format=e4m3fn|e5m2|e4m3fnuz,
              prefill=exact|fp8

- `scales=calibrate` (the default): kvlab's built-in calibration (`kvlab scales calibrate`
  defaults: 8 windows of up to 512 tokens of the built-in text) run through this model when the
  cache is first built, once per model object and dtype; scale = amax / fp8_max.
- `scales=PATH`: a vLLM `kv_cache_scales.json`, a compressed-tensors / ModelOpt `.safetensors`
  file, or a checkpoint folder (`kvlab scales extract` reads). A per-tensor file used with
  `granularity=head` gives every head its layer's scale; per-head scales used per tensor keep
  the largest head.
- `scales=prefill`: each layer's scales from the amax of the first update (the prompt), then
  frozen: what transformers' `QuantizedCache(backend="fp8")` does, plus clamping and per-head.

Values beyond a scale's range are clamped to ±fp8_max before the cast (never NaN).
`prefill=exact` (the default, as vLLM and transformers do): the first update (the prefill)
attends to its own K/V in the model's precision while they are stored as fp8; every later
update reads the dequantized cache, including its own new tokens. `prefill=fp8`: every
update, the first included, reads the dequantized cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlab.caches.registry import CachePolicy, register
from kvlab.model_facts import model_shape
from kvlab.quant import fp8
from kvlab.scales.calibrate import builtin_calibration
from kvlab.scales.files import load_scales
from kvlab.scales.scales import KVScales, ScalesError


class FP8Layer(CacheLayerMixin):
    """One layer's cache: float8 payloads `[batch, kv_heads, seq, head_dim]` and their scales."""

    is_croppable = True

    def __init__(self, key_scale: torch.Tensor | None, value_scale: torch.Tensor | None, fmt: str = "e4m3fn",
                 exact_prefill: bool = True, per_head: bool = False) -> None:
        # CacheLayerMixin.__init__ would set `keys`/`values`, which here are read-only views.
        self.is_initialized = False
        self.key_scale, self.value_scale = key_scale, value_scale
        self.fmt = fmt
        self.exact_prefill = exact_prefill
        self.per_head = per_head  # only used when the scales come from the prefill
        self.qkeys: torch.Tensor | None = None
        self.qvalues: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    # ---- the contract ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.key_scale is None:  # scales=prefill: freeze the amax of the first update
            self.key_scale = fp8.scale_from_amax(fp8.amax(key_states, self.per_head).reshape(-1), self.fmt)
            self.value_scale = fp8.scale_from_amax(fp8.amax(value_states, self.per_head).reshape(-1), self.fmt)
        self.key_scale = self.key_scale.to(self.device)
        self.value_scale = self.value_scale.to(self.device)
        for scale in (self.key_scale, self.value_scale):
            fp8.broadcast_scale(scale, key_states)  # raises when per-head scales do not fit
        b, h, _, d = key_states.shape
        empty = torch.empty((b, h, 0, d), dtype=fp8.fp8_dtype(self.fmt), device=self.device)
        self.qkeys, self.qvalues = empty, empty.clone()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        self.qkeys = torch.cat([self.qkeys, fp8.quantize(key_states, self.key_scale, self.fmt)], dim=-2)
        self.qvalues = torch.cat([self.qvalues, fp8.quantize(value_states, self.value_scale, self.fmt)], dim=-2)
        if first and self.exact_prefill:
            return key_states, value_states
        return self.keys, self.values

    @property
    def keys(self) -> torch.Tensor | None:
        """The dequantized keys (a new tensor each time)."""
        if self.qkeys is None:
            return None
        return fp8.dequantize(self.qkeys, self.key_scale, self.dtype)

    @property
    def values(self) -> torch.Tensor | None:
        if self.qvalues is None:
            return None
        return fp8.dequantize(self.qvalues, self.value_scale, self.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    # ---- what generate may call ----------------------------------------------------------
    def reset(self) -> None:
        self.qkeys = self.qvalues = None
        self.is_initialized = False

    def offload(self) -> None:
        if self.is_initialized:
            self.qkeys, self.qvalues = self.qkeys.to("cpu"), self.qvalues.to("cpu")

    def prefetch(self) -> None:
        if self.is_initialized and self.qkeys.device != self.device:
            self.qkeys, self.qvalues = self.qkeys.to(self.device), self.qvalues.to(self.device)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self.qkeys = self.qkeys[..., :tokens_to_remove, :]
            self.qvalues = self.qvalues[..., :tokens_to_remove, :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.qkeys, self.qvalues = self.qkeys[indices], self.qvalues[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.qkeys = self.qkeys.repeat_interleave(repeats, dim=0)
            self.qvalues = self.qvalues.repeat_interleave(repeats, dim=0)


@register("fp8")
@dataclass(frozen=True)
class FP8Policy(CachePolicy):
    """FP8 KV cache with calibrated, loaded or prefill scales (see the module docstring)."""

    scales: str = "calibrate"
    granularity: Literal["tensor", "head"] = "tensor"
    format: Literal["e4m3fn", "e5m2", "e4m3fnuz"] = "e4m3fn"
    prefill: Literal["exact", "fp8"] = "exact"

    lossless: ClassVar[bool] = False

    def validate(self) -> None:
        if not self.scales.strip():
            raise ValueError("scales needs a value: a path, calibrate or prefill")

    def resolve_scales(self, model) -> "KVScales | None":
        """This model's scales at the policy's granularity (None for scales=prefill)."""
        if self.scales == "prefill":
            return None
        shape = model_shape(model.config)
        if self.scales == "calibrate":
            found = builtin_calibration(model).scales("head", self.format)
        else:
            found = load_scales(self.scales, n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                                n_kv_heads=shape["n_kv_heads"])
            if found.fp8_format != self.format and fp8.fp8_max(found.fp8_format) > fp8.fp8_max(self.format):
                raise ScalesError(f"{self.scales} holds scales for {found.fp8_format}; with format={self.format} "
                                  "they would clip")
        return found.fitted(shape["n_layers"], shape["n_kv_heads"], self.granularity)

    def build(self, model, *, batch_size: int = 1, max_length: int | None = None) -> Cache:
        scales = self.resolve_scales(model)
        if scales is None:  # scales=prefill: each layer finds its own
            pairs = [(None, None)] * model_shape(model.config)["n_layers"]
        else:
            pairs = [(k.clone(), v.clone()) for k, v in zip(scales.keys, scales.values)]
        exact, per_head = self.prefill == "exact", self.granularity == "head"
        return Cache(layers=[FP8Layer(k, v, self.format, exact, per_head) for k, v in pairs])

    def export(self, cache: Cache):
        """The dequantized K/V, plus `layers.{i}.keys.q` / `.values.q` (fp8) and `.keys.scale` / `.values.scale`."""
        layers, extras = [], {}
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, FP8Layer) or not layer.is_initialized:
                raise ValueError("an fp8 cache layer was never filled; was the model run with this cache?")
            layers.append((layer.keys, layer.values))
            extras[f"layers.{i}.keys.q"] = layer.qkeys
            extras[f"layers.{i}.values.q"] = layer.qvalues
            extras[f"layers.{i}.keys.scale"] = layer.key_scale.reshape(-1)
            extras[f"layers.{i}.values.scale"] = layer.value_scale.reshape(-1)
        return layers, extras


@register("hf-fp8")
@dataclass(frozen=True)
class TransformersFP8Policy(CachePolicy):
    """transformers' own `QuantizedCache(backend="fp8")`, the baseline for `cache=fp8`.

    e4m3fn with one scale per layer and tensor, taken from the amax of the first update and
    frozen; later values beyond it are cast without a clamp. The prefill attends to its own
    K/V in full precision.
    """

    lossless: ClassVar[bool] = False

    def build(self, model, *, batch_size: int = 1, max_length: int | None = None) -> Cache:
        from transformers import QuantizedCache

        return QuantizedCache(backend="fp8", config=model.config)

    def export(self, cache: Cache):
        layers, extras = [], {}
        for i, layer in enumerate(cache.layers):
            stored = getattr(layer, "_quantized_keys", None)
            if stored is None:
                raise ValueError("a cache layer was never filled; was the model run with this cache?")
            layers.append((layer._dequantize(layer._quantized_keys), layer._dequantize(layer._quantized_values)))
            extras[f"layers.{i}.keys.q"], extras[f"layers.{i}.keys.scale"] = layer._quantized_keys
            extras[f"layers.{i}.values.q"], extras[f"layers.{i}.values.scale"] = layer._quantized_values
        return layers, {name: t.reshape(-1) if name.endswith("scale") else t for name, t in extras.items()}
