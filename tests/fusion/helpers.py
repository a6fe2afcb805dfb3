"""Prompts and reference runs shared by the fusion tests."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvlab.fusion.prompt import FusionPrompt, build_prompt
from kvlab.model_facts import LoadedModel
from kvlab.models import model_fingerprint
from kvlab.tokenizer_bytes import VOCAB_SIZE, byte_tokenizer

DOCS = [
    "The cat sat on the mat and looked at the bird in the old tree.",
    "Water boils at one hundred degrees at sea level.",
    "Paris is the capital of France; the river there is the Seine.",
]
QUESTION = "Where does the cat sit?"


def llama_from_config(**config) -> LoadedModel:
    """A small seeded Llama from config keys (everything else left at the config's defaults)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=512, **config)
    state = torch.random.get_rng_state()
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    torch.random.set_rng_state(state)
    return LoadedModel(model, byte_tokenizer(), "custom", model_fingerprint(model))


def tiny_prompt(loaded, docs=DOCS, question=QUESTION, chat=None) -> FusionPrompt:
    return build_prompt(loaded, docs, question, chat=chat)


def full_run(loaded, ids, steps: int = 0):
    """Plain prefill (and greedy steps) with DynamicCache: (first logits, cache, greedy tokens)."""
    model = loaded.model
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.tensor([list(ids)]), past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float()
        tokens = [int(torch.argmax(logits))]
        for _ in range(steps):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            tokens.append(int(torch.argmax(out.logits[0, -1])))
    return logits, cache, tokens


def decode(model, cache, first: int, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy steps from `first` through `cache`: tokens and each step's logits."""
    tokens, rows = [first], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1].float())
            tokens.append(int(torch.argmax(rows[-1])))
    return tokens, rows
