"""A RAG chunk's KV cache, computed on its own, and the key that names it in a store.

A chunk is computed independently of the other chunks of a prompt: after an optional shared
prefix (a system prompt), at positions starting from the position base. Its keys are stored
post-RoPE at those positions; fusion re-rotates them to wherever the chunk lands later.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from kvlab.model_facts import LoadedModel


CHECKSUM_PREFIX = "xxh3_128:"
_LEGACY = re.compile(r"[0-9a-f]{64}")


def is_legacy_checksum(stated: object) -> bool:
    """A checksum in the SHA-256 scheme of older stores (read and verified; `verify --repair` rewrites it)."""
    return isinstance(stated, str) and _LEGACY.fullmatch(stated) is not None


def token_digest(token_ids: Sequence[int]) -> str:
    """A hash of a token id sequence ("" for an empty one)."""
    return hashlib.sha256(json.dumps([int(t) for t in token_ids]).encode()).hexdigest() if token_ids else ""


@dataclass(frozen=True)
class ChunkKey:
    """What identifies a chunk's cache: model, dtype, tokens, position base and prefix.

    The prefix digest is part of the key because a chunk computed after a different prefix
    of the same length has a different cache.
    """

    fingerprint: str
    dtype: str
    token_ids: tuple[int, ...]
    position_base: int = 0
    prefix_digest: str = ""

    def digest(self) -> str:
        """The hex name of the chunk in a store (sha256 of every field)."""
        payload = {
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "tokens": token_digest(self.token_ids),
            "n_tokens": len(self.token_ids),
            "position_base": self.position_base,
            "prefix": self.prefix_digest,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class ChunkKV:
    """K (post-RoPE, positions base..base+n-1) and V per layer, each `[1, kv_heads, n, head_dim]`.

    `surprisal[t]` = -log p(token t | everything before it), float32 `[n]`; the first entry is
    NaN when nothing precedes the chunk.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    surprisal: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.keys[0].shape[-2]) if self.keys else 0

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map, the order checksums and files use."""
        out: dict[str, torch.Tensor] = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            out[f"layers.{i}.keys"] = k
            out[f"layers.{i}.values"] = v
        if self.surprisal is not None:
            out["surprisal"] = self.surprisal
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "ChunkKV":
        n_layers = sum(1 for name in tensors if name.endswith(".keys"))
        return cls(
            keys=[tensors[f"layers.{i}.keys"] for i in range(n_layers)],
            values=[tensors[f"layers.{i}.values"] for i in range(n_layers)],
            surprisal=tensors.get("surprisal"),
            meta=dict(meta),
        )

    def checksum(self) -> str:
        """"xxh3_128:" + XXH3-128 over every tensor's name, dtype, shape and raw bytes.

        A non-cryptographic hash: it guards against damage (disk, truncation, stray writes), not
        against someone forging a chunk, at over 10 GB/s where SHA-256 ran at 1.6 GB/s.
        """
        return CHECKSUM_PREFIX + self._hash(xxhash.xxh3_128())

    def legacy_checksum(self) -> str:
        """The bare SHA-256 hex digest that stores written before the xxh3 checksum carry."""
        return self._hash(hashlib.sha256())

    def checksum_matches(self, stated: str) -> bool:
        """Whether the tensors match a stated checksum of either scheme."""
        if not isinstance(stated, str):
            return False
        if stated.startswith(CHECKSUM_PREFIX):
            return self.checksum() == stated
        return _LEGACY.fullmatch(stated) is not None and self.legacy_checksum() == stated

    def _hash(self, h) -> str:
        for name, tensor in self.tensors().items():
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
        return h.hexdigest()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def chunk_key(loaded: "LoadedModel", token_ids: Sequence[int], prefix_ids: Sequence[int] = ()) -> ChunkKey:
    """The key of `token_ids` computed after `prefix_ids` with this model in its current dtype."""
    dtype = str(loaded.model.dtype).removeprefix("torch.")
    return ChunkKey(
        fingerprint=loaded.fingerprint,
        dtype=dtype,
        token_ids=tuple(int(t) for t in token_ids),
        position_base=len(prefix_ids),
        prefix_digest=token_digest(prefix_ids),
    )


def prefix_state(loaded: "LoadedModel", prefix_ids: Sequence[int]) -> tuple[Any, torch.Tensor | None]:
    """The prefix's cache and its last logits (None, None without a prefix), computed once for the
    chunks that follow it."""
    if not prefix_ids:
        return None, None
    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.model.config)
    with torch.no_grad():
        out = loaded.model(torch.tensor([list(prefix_ids)], device=loaded.model.device), past_key_values=cache,
                           use_cache=True)
    return cache, out.logits[0, -1]


def compute_chunk_kv(
    loaded: "LoadedModel",
    token_ids: Sequence[int],
    prefix_ids: Sequence[int] = (),
    *,
    surprisal: bool = False,
    prefix_cache: Any = None,
    prefix_logits: torch.Tensor | None = None,
) -> tuple[ChunkKey, ChunkKV]:
    """Run the chunk (after the prefix) through the model and keep its own K/V.

    `prefix_cache` may hold the prefix's cache already computed (it is not modified), and
    `prefix_logits` the logits at the prefix's last position (for the first token's surprisal):
    see `prefix_state`.
    """
    import copy

    from transformers import DynamicCache

    from kvlab.snapshot import now_iso

    if not token_ids:
        raise ValueError("a chunk needs at least one token")
    model = loaded.model
    key = chunk_key(loaded, token_ids, prefix_ids)
    device = model.device
    base = len(prefix_ids)
    with torch.no_grad():
        if base and prefix_cache is None:
            prefix_cache, prefix_logits = prefix_state(loaded, prefix_ids)
        cache = copy.deepcopy(prefix_cache) if base else DynamicCache(config=model.config)
        ids = torch.tensor([list(token_ids)], device=device)
        positions = torch.arange(base, base + len(token_ids), device=device)[None]
        out = model(ids, past_key_values=cache, position_ids=positions, use_cache=True,
                    logits_to_keep=0 if surprisal else 1)
        keys = [layer.keys[:, :, base:].detach().cpu().contiguous() for layer in cache.layers]
        values = [layer.values[:, :, base:].detach().cpu().contiguous() for layer in cache.layers]
        surprisal_t = None
        if surprisal:
            logits = out.logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            targets = ids[0, 1:]
            rest = -logp.gather(-1, targets[:, None])[:, 0]
            if prefix_logits is None and base:
                prefix_logits = model(torch.tensor([list(prefix_ids)], device=device)).logits[0, -1]
            if prefix_logits is not None:
                first = -torch.log_softmax(prefix_logits.float(), dim=-1)[ids[0, 0]]
            else:
                first = torch.tensor(float("nan"), device=logits.device)
            surprisal_t = torch.cat([first.reshape(1), rest]).float().cpu()
    meta = {
        "model": loaded.spec,
        "fingerprint": loaded.fingerprint,
        "dtype": key.dtype,
        "n_tokens": len(token_ids),
        "position_base": base,
        "prefix_digest": key.prefix_digest,
        "created": now_iso(),
    }
    chunk = ChunkKV(keys=keys, values=values, surprisal=surprisal_t, meta=meta)
    chunk.meta["checksum"] = chunk.checksum()
    return key, chunk
