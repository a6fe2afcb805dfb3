"""The mixed cache layer: a full-precision hot window + quantized blocks (`cache=mixed:...`).

Per layer, the most recent `hot` tokens stay in the model's dtype. Once `group` tokens older
than the window have gathered, they are quantized as one block (`kvlab.quant.blocks`) and
stored after the earlier blocks; a stored block is never re-quantized. So the hot buffer holds
between `hot` and `hot + group - 1` tokens.

What attention sees (both paths agree):
- a multi-token update (prefill) attends to its own new tokens in full precision and to what
  was stored before it as stored (dequantized), as KIVI does;
- a single-token step attends to the cache as it is after the update: the dequantized blocks,
  then the hot window.

Two ways to run it. Under the policy's `session(model)` (what `kvlab capture --run
cache=mixed:...` does) the model's attention is flash-decoding (`kvlab_split_k`): a decode step's
`update()` returns only the hot window and attention reads the quantized blocks one split
(`split` tokens) at a time, merging partial softmax statistics. Without the session (e.g.
`model.generate(past_key_values=policy.build(model))` on its own), `update()` returns the
whole dequantized view and any attention kernel consumes it: dequantize everything, then SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from kvlab.attention import flash_decoding, native
from kvlab.caches.blockstore import BlockStore
from kvlab.intercept import intercept
from kvlab.model_facts import attention_modules
from kvlab.quant.blocks import SchemeSpec
from kvlab.quant.intq import tensor_bytes


class MixedLayer(DynamicLayer):
    """One layer: `keys` / `values` hold the hot window; `key_store` / `value_store` the blocks."""

    is_croppable = False

    def __init__(self, spec: SchemeSpec, head_dim: int, hot: int, split_blocks: int, native: bool = False) -> None:
        super().__init__()
        self.spec, self.hot, self.block = spec, hot, spec.tokens
        self.native = native  # decode steps on CPU read the blocks with the compiled kernel
        self.key_store = BlockStore(spec.codec("keys", head_dim), split_blocks)
        self.value_store = BlockStore(spec.codec("values", head_dim), split_blocks)
        self.defer_cold = False  # set for one decode call while flash-decoding reads the blocks itself

    # ---- the CacheLayerMixin contract ------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append, move whole blocks out of the hot window, and return what attention reads:
        a prefill's view from before the move, a decode step's from after it (the hot window only
        while flash-decoding reads the blocks itself)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        prefill_view = self._with_cold(keys, values) if key_states.shape[-2] > 1 else None
        self.keys, self.values = keys, values
        self._flush()
        if prefill_view is not None:
            return prefill_view
        if self.defer_cold:
            return self.keys, self.values
        return self._with_cold(self.keys, self.values)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.cold_length + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        spec, head_dim = self.spec, self.key_store.codec.head_dim
        split = self.key_store.segment_blocks
        super().reset()
        self.key_store = BlockStore(spec.codec("keys", head_dim), split)
        self.value_store = BlockStore(spec.codec("values", head_dim), split)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("the mixed cache cannot be cropped: its older tokens are stored quantized")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices, ...])

    # ---- blocks --------------------------------------------------------------------------
    @property
    def cold_length(self) -> int:
        return self.key_store.n_blocks * self.block

    def _flush(self) -> None:
        """Move every whole block of tokens older than the hot window into the stores."""
        n = (self.keys.shape[-2] - self.hot) // self.block
        if n <= 0:
            return
        take = n * self.block
        for store, name in ((self.key_store, "keys"), (self.value_store, "values")):
            hot = getattr(self, name)
            b, h, _, d = hot.shape
            store.append(hot[:, :, :take].reshape(b, h, n, self.block, d))
            setattr(self, name, hot[:, :, take:].clone())

    def cold_parts(self, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Dequantized (keys, values) one split at a time, oldest first (flash_decoding.ColdSource)."""
        for k_parts, v_parts in zip(self.key_store.splits(), self.value_store.splits()):
            yield self.key_store.decode(k_parts, dtype), self.value_store.decode(v_parts, dtype)

    def native_parts(self) -> list | None:
        """The stored blocks as the compiled kernel reads them, one part per split (no copies), or
        None where this layer reads them with PyTorch ops (flash_decoding.ColdSource)."""
        if not self.native or self.device.type != "cpu":
            return None

        try:
            return [native.Part(native.codec_role(self.key_store.codec, k),
                                native.codec_role(self.value_store.codec, v),
                                next(iter(k.values())).shape[2] * self.block, self.block)
                    for k, v in zip(self.key_store.splits(), self.value_store.splits())]
        except native.NativeUnavailable as err:  # a layout the kernel does not read: PyTorch ops
            native.note_fallback(str(err))
            self.native = False
            return None

    def _with_cold(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key_store.n_blocks == 0:
            return keys, values
        cold_k = self.key_store.decode_all(keys.dtype)
        cold_v = self.value_store.decode_all(values.dtype)
        return torch.cat([cold_k, keys], dim=-2), torch.cat([cold_v, values], dim=-2)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache as attention reads it: dequantized blocks, then the hot window."""
        return self._with_cold(self.keys, self.values)

    def _select(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.key_store.map(fn)
        self.value_store.map(fn)

    # ---- accounting ----------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Real memory of this layer: quantized payload + scales + zeros, plus the hot window."""
        if not self.is_initialized:
            return 0
        return self.key_store.nbytes + self.value_store.nbytes + tensor_bytes(self.keys) + tensor_bytes(self.values)

    def raw(self) -> dict[str, torch.Tensor]:
        """The stored blocks as named tensors `keys.q`, `keys.scale`, ... (`[b, kv, n_blocks, ...]`)."""
        out = {}
        for role, store in (("keys", self.key_store), ("values", self.value_store)):
            for part, tensor in store.raw().items():
                out[f"{role}.{part}"] = tensor
            out[f"{role}.hot"] = getattr(self, role)
        return out


def cache_nbytes(cache: Cache) -> int:
    """Bytes a cache's layers hold: `nbytes` of mixed layers, keys + values of any other layer."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, MixedLayer):
            total += layer.nbytes
        elif getattr(layer, "keys", None) is not None:
            total += tensor_bytes(layer.keys) + tensor_bytes(layer.values)
    return total


@contextlib.contextmanager
def flash_session(model) -> Iterator[None]:
    """Flash-decoding attention on, plus hooks that hand each decode step's mixed layer to it."""
    bound: dict[torch.nn.Module, MixedLayer] = {}

    def before(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is None or hidden is None or hidden.shape[1] != 1:
            return
        layer = cache.layers[module.layer_idx] if module.layer_idx < len(cache.layers) else None
        if isinstance(layer, MixedLayer):
            layer.defer_cold = True
            bound[module] = layer
            flash_decoding.bind(module, layer)

    def after(module, args, kwargs, output):
        layer = bound.pop(module, None)
        if layer is not None:
            layer.defer_cold = False
        flash_decoding.unbind(module)

    modules = attention_modules(model)
    flash_decoding.register()
    try:
        with intercept(model, attention=flash_decoding.NAME, pre=[(m, before) for m in modules],
                       post=[(m, after) for m in modules], always_call=True):
            yield
    finally:
        for module, layer in list(bound.items()):
            layer.defer_cold = False
            flash_decoding.unbind(module)
