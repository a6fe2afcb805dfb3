"""Tiny random models, seeded and built in memory, one per attention family.

They are small enough that a test runs a full generation in milliseconds, yet each keeps
what makes its family different: grouped KV heads, q/k/v biases, multi-query attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvlab.tokenizer_bytes import VOCAB_SIZE

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    max_position_embeddings=1024,
    initializer_range=0.08,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)


@dataclass(frozen=True)
class TinySpec:
    name: str
    family: str
    summary: str
    overrides: dict[str, Any]
    seed: int = 0

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.for_model(self.family, **{**_COMMON, **self.overrides})


TINY_MODELS: dict[str, TinySpec] = {
    spec.name: spec
    for spec in [
        TinySpec("tiny-llama", "llama", "Llama, 4 layers, 4 query heads sharing 2 KV heads (GQA)",
                 dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)),
        TinySpec("tiny-mha", "llama", "Llama, 4 layers, 4 heads each with its own KV head (MHA)",
                 dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0), seed=1),
        TinySpec("tiny-qwen2", "qwen2", "Qwen2, 4 layers, GQA 4/2 with q/k/v biases",
                 dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0), seed=2),
        TinySpec("tiny-mistral", "mistral", "Mistral, 4 layers, 4 query heads on 1 KV head (MQA), no sliding window",
                 dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None, head_dim=16), seed=3),
        TinySpec("tiny-llama-32l", "llama", "Llama, 32 layers, GQA 4/2: catches hard-coded layer counts",
                 dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=32, hidden_size=32,
                      intermediate_size=64), seed=4),
    ]
}


def build_tiny(name: str):
    """The seeded float32 model for `name`; the same weights on every machine."""
    spec = TINY_MODELS[name]
    return build_seeded(spec.config(), spec.seed)


def build_seeded(config, seed: int):
    """A float32 model with random weights drawn from `seed` (the global RNG is left as it was)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    # Random weights never stop on their own: no end-of-sequence token, so runs have a known length.
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=None,
                                               pad_token_id=config.pad_token_id)
    return model.eval()
