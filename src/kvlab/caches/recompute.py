"""K and V of an attention layer recomputed from the layer's input activations.

For attention of the Llama kind (llama, qwen2, mistral, ... and SmolLM2), the cached keys are
`RoPE(k_proj(X))` and the values `v_proj(X)`, where X is the normalised hidden state the
attention module receives. Everything needed is found through the model itself, nothing is
written per family: each decoder layer's attention module (which must have `k_proj` and
`v_proj`), the model's rotary embedding module (called with the positions the tokens had), and
the `apply_rotary_pos_emb` function of the module that defines the attention class, all found
by `kvlab.model_facts`.

A family whose attention does more to K (a k_norm, a fused qkv projection, ...) is refused
when the parts are looked up, or, at the latest, when the first recomputed rows are checked
against the keys the model itself produced.
"""

from __future__ import annotations

import torch

from kvlab.errors import KvlabError
from kvlab.model_facts import attention_modules, model_shape, modeling_function, rotary_module

CHECK_ROWS = 4
_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_HALF_TOLERANCE = 3e-2


class KVRecomputer:
    """Recomputes K (with RoPE) and V of any layer of `model` from its attention inputs."""

    def __init__(self, model) -> None:
        shape = model_shape(model.config)
        self.modules = attention_modules(model)
        family = shape["family"]
        if not all(hasattr(m, "k_proj") and hasattr(m, "v_proj") for m in self.modules):
            raise KvlabError(f"cache=kvpr: {family} attention has no separate k_proj/v_proj in every layer; "
                             "K/V cannot be recomputed from activations")
        first = self.modules[0]
        self.apply_rope = modeling_function(first, "apply_rotary_pos_emb")
        if self.apply_rope is None:
            raise KvlabError(f"cache=kvpr: {family} attention has no apply_rotary_pos_emb function")
        try:
            self.rotary = rotary_module(model)
        except KvlabError as err:
            raise KvlabError(f"cache=kvpr: {err}") from None
        self.head_dim = int(getattr(first, "head_dim", None) or shape["head_dim"])
        self.hidden_size = int(shape["hidden_size"])
        self.family = family

    def rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[b or 1, n, head_dim]` at `position_ids`, from the model's own rotary module."""
        with torch.no_grad():
            return self.rotary(x, position_ids=position_ids)

    def kv(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[b, kv_heads, n, head_dim]` from activations `x` `[b, n, hidden]`."""
        module = self.modules[layer]
        batch, n, _ = x.shape
        with torch.no_grad():
            keys = module.k_proj(x).view(batch, n, -1, self.head_dim).transpose(1, 2)
            values = module.v_proj(x).view(batch, n, -1, self.head_dim).transpose(1, 2)
            # apply_rotary_pos_emb rotates a query and a key: give it one head as the query
            _, keys = self.apply_rope(keys[:, :1], keys, cos, sin)
        return keys, values

    def check(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor) -> None:
        """Refuse, with one line, a model whose K/V are not what `kv` recomputes (first rows only)."""
        n = min(CHECK_ROWS, x.shape[1])
        if n == 0:
            return
        got_k, got_v = self.kv(layer, x[:, :n], cos[:, :n], sin[:, :n])
        tolerance = _CHECK_TOLERANCE.get(keys.dtype, _HALF_TOLERANCE)
        for name, got, want in (("K", got_k, keys[:, :, :n]), ("V", got_v, values[:, :, :n])):
            scale = max(1.0, float(want.abs().max()))
            error = float((got.float() - want.float()).abs().max())
            if error > tolerance * scale:
                raise KvlabError(f"cache=kvpr: recomputed {name} of layer {layer} differs from the model's by "
                                 f"{error:.3g}: {self.family} attention is not k_proj/v_proj + RoPE; "
                                 "this family is not supported")
