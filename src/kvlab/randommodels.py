"""Random-weight models of a chosen size: `--model random:FAMILY,k=v,...`.

They serve timing where no trained model of that shape is at hand (`kvlab bench decode
--model random:llama-mha,hidden=4096,layers=8`): seeded, built in memory, with the byte
tokenizer and no end-of-sequence token, like the tiny test models. Their outputs mean nothing.

Families: `llama-mha` (one KV head per head), `llama` (GQA, 4 heads per KV head), `qwen2`
(GQA with q/k/v biases), `mistral` (GQA, no sliding window). Keys: hidden, layers, heads
(default hidden / 128), kv_heads, intermediate (default 8/3 hidden, rounded up to 256),
max_positions, seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.params import ParamError, build_params

PREFIX = "random:"
FAMILIES = {"llama-mha": "llama", "llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}


@dataclass(frozen=True)
class RandomModelSpec:
    hidden: int = 1024
    layers: int = 8
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    max_positions: int = 32768
    seed: int = 0

    def config(self, family: str):
        from transformers import AutoConfig

        from kvlab.tinymodels import _COMMON

        heads = self.heads or max(1, self.hidden // 128)
        kv_heads = self.kv_heads or (heads if family == "llama-mha" else max(1, heads // 4))
        if self.hidden < 1 or self.layers < 1 or self.hidden % heads or heads % kv_heads:
            raise KvlabError(f"random:{family}: hidden={self.hidden}, heads={heads}, kv_heads={kv_heads} do not "
                             "divide evenly (hidden % heads and heads % kv_heads must be 0)")
        intermediate = self.intermediate or -(-8 * self.hidden // 3 // 256) * 256
        extra = {"sliding_window": None} if family == "mistral" else {}
        shape = {"hidden_size": self.hidden, "num_hidden_layers": self.layers, "num_attention_heads": heads,
                 "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
                 "max_position_embeddings": self.max_positions, "head_dim": self.hidden // heads}
        return AutoConfig.for_model(FAMILIES[family], **{**_COMMON, "initializer_range": 0.02, **shape, **extra})


def parse_random_spec(spec: str) -> tuple[str, RandomModelSpec]:
    """`random:llama-mha,hidden=4096,layers=8` -> ("llama-mha", RandomModelSpec(...))."""
    body = spec.removeprefix(PREFIX)
    family, *items = [part.strip() for part in body.split(",") if part.strip()] or [""]
    if family not in FAMILIES:
        raise KvlabError(f"{spec}: unknown random family {family!r}; allowed: {', '.join(FAMILIES)}")
    try:
        return family, RandomModelSpec(**build_params(RandomModelSpec, items, f"{PREFIX}{family}"))
    except ParamError as err:
        raise KvlabError(str(err)) from None


def build_random(spec: str):
    """The seeded float32 model for a `random:...` spec."""
    from kvlab.tinymodels import build_seeded

    family, params = parse_random_spec(spec)
    return build_seeded(params.config(family), params.seed)
