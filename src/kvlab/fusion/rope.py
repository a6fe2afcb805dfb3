"""Moving cached keys to new positions: the RoPE relative property, with the model's own rotary.

A chunk's keys are stored post-RoPE at the positions it was computed at. With RoPE, rotating a
key at position p by the angle of position d gives the key at p + d, so a chunk that lands
`delta` positions later in a fused prompt is moved by one rotation — provided the rotation
frequencies are fixed. Rope types whose frequencies depend on the sequence length (dynamic NTK
scaling, LongRoPE's short/long switch) do not compose and are refused, as are models with more
than one rotary embedding or none.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvlab.errors import KvlabError
from kvlab.model_facts import attention_modules, modeling_function

# Rope types whose frequencies do not change with the sequence length (yarn's extra attention
# factor scales cos/sin, and is divided out of a shift).
COMPOSABLE_ROPE = ("default", "linear", "llama3", "yarn")


class RopeError(KvlabError):
    """A model whose cached keys cannot be moved to new positions."""


@dataclass
class RopeShift:
    """Rotates post-RoPE keys by position deltas with the model's rotary embedding."""

    rotary: torch.nn.Module
    apply: Callable
    rope_type: str
    scaling: float

    def angles(self, positions: torch.Tensor, device, *, unit: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[1, n, rot_dim]` (float32) of integer `positions` `[n]`.

        `unit` divides out the rope type's attention scaling (yarn), so that a rotation moves
        a key without rescaling it; without it they are what the model applies.
        """
        probe = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = self.rotary(probe, positions.reshape(1, -1).to(device))
        cos, sin = cos.float(), sin.float()
        if unit and self.scaling != 1.0:
            cos, sin = cos / self.scaling, sin / self.scaling
        return cos, sin

    def rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`keys` `[b, kv, n, d]` rotated by per-token angles `[1, n, rot_dim]` (from `angles`)."""
        k = keys if keys.dtype == torch.float32 else keys.float()
        _, moved = self.apply(k[:, :1, :1], k, cos, sin)  # the query slot gets a one-element stand-in
        return moved.to(keys.dtype)

    def shift(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """`keys` computed at positions p moved to p + delta."""
        if delta == 0:
            return keys
        cos, sin = self.angles(torch.tensor([delta]), keys.device)
        return self.rotate(keys, cos, sin)


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, RopeShift]" = weakref.WeakKeyDictionary()


def rope_shift(model) -> RopeShift:
    """The model's key rotation, checked to compose; RopeError when it cannot be used."""
    if model not in _CACHE:
        _CACHE[model] = _build(model)
    return _CACHE[model]


def _rope_type(model, rotary) -> str:
    params = getattr(model.config.get_text_config(decoder=True), "rope_parameters", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise RopeError("this model uses a different RoPE per layer type; fusion supports one rotary embedding")
    rope_type = getattr(rotary, "rope_type", None) or (params.get("rope_type") if isinstance(params, dict) else None)
    return str(rope_type or "default")


def _build(model) -> RopeShift:
    name = type(model).__name__
    rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotaries:
        raise RopeError(f"{name} has no rotary position embedding: fusion moves cached keys with RoPE")
    if len(rotaries) > 1:
        raise RopeError(f"{name} has {len(rotaries)} rotary embeddings; fusion supports models with one")
    rotary = rotaries[0]
    rope_type = _rope_type(model, rotary)
    if rope_type not in COMPOSABLE_ROPE:
        raise RopeError(
            f"rope_type={rope_type!r} changes its frequencies with the sequence length, so cached keys cannot be "
            f"re-rotated to new positions; fusion supports rope types {', '.join(COMPOSABLE_ROPE)}"
        )
    attention = attention_modules(model)[0]
    apply = modeling_function(attention, "apply_rotary_pos_emb")
    if apply is None:
        raise RopeError(f"{name}: its modeling file has no apply_rotary_pos_emb to rotate keys with")
    shift = RopeShift(rotary, apply, rope_type, float(getattr(rotary, "attention_scaling", 1.0) or 1.0))
    _check_composes(shift, attention, model)
    return shift


def _check_composes(shift: RopeShift, attention, model) -> None:
    """Rotating the key at p by d must give the key at p + d, at small and large positions."""
    device = next(model.parameters()).device
    cos0, _ = shift.angles(torch.tensor([0]), device, unit=False)
    head_dim = int(getattr(attention, "head_dim", 0) or cos0.shape[-1])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 1, head_dim, generator=generator).to(device)
    limit = int(getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", 2048) or 2048)
    for start, delta in ((3, 5), (limit // 4, limit // 2)):
        cos, sin = shift.angles(torch.tensor([start]), device, unit=False)
        _, at_start = shift.apply(x, x, cos, sin)
        cos, sin = shift.angles(torch.tensor([start + delta]), device, unit=False)
        _, expected = shift.apply(x, x, cos, sin)
        moved = shift.shift(at_start, delta)
        if not torch.allclose(moved, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
            raise RopeError(f"rope_type={shift.rope_type!r} of {type(model).__name__}: rotating a key by a position "
                            "delta does not give the key at the new position; fusion cannot move cached keys")
