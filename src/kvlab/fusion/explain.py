"""Why a fused answer went wrong: one task's fused cache set against full prefill's.

For one task and strategy:
- the fused cache is diffed against the full-prefill cache with kvlab's own cache diff
  (`kvlab.compare.cachediff`: rel-L2 per layer, KV head and position; the first divergence is
  the earliest position past the tolerance, then its worst layer and head), and the largest
  error of each chunk's positions is given, so a chunk that went bad stands out;
- the evidence (a generated task's planted facts, else the accepted answers wherever they occur
  in the documents) is located in the prompt's tokens, and the strategy's selected tokens are
  counted on it;
- the question's attention mass on the evidence is measured per layer in both prefills: the
  question's tokens are run once more over each cache's context (prefix and documents), which
  gives exactly the attention they had in that prefill, because the question is always computed
  and sees every context key as the cache holds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from kvlab.caches.taps import attention_taps, rows_attention
from kvlab.compare.cachediff import CacheDiff, Divergence, diff_caches
from kvlab.decode import decode_n_tokens, eos_ids
from kvlab.fusion.fused import Prefill, prefill
from kvlab.errors import KvlabError
from kvlab.fusion.prompt import DEFAULT_CHUNK_TOKENS, FusionPrompt, find_task, task_prompt
from kvlab.fusion.store.base import ChunkStore
from kvlab.fusion.strategies import Strategy, make_strategy
from kvlab.model_facts import LoadedModel, decoder_layers
from kvlab.tasks.records import Task
from kvlab.tasks.scoring import score

if TYPE_CHECKING:
    from kvlab.runspec import RunSpec


DEFAULT_TOL = 1e-3  # rel-L2 per cache row: above float32 noise between two kernels, far below a lost context


@dataclass
class Evidence:
    """One evidence string and the prompt positions of the tokens that hold it."""

    text: str
    positions: list[int]  # prompt positions (prefix first), empty when not found
    chunk: int | None  # the chunk holding its first token


@dataclass
class Explanation:
    task: Task
    strategy: Strategy
    prompt: FusionPrompt
    token_texts: list[str]  # every prompt token, decoded on its own
    full: Prefill
    fused: Prefill
    diff: CacheDiff
    tol: float
    evidence: list[Evidence]
    attention_full: list[float]  # per layer: the question's attention mass on the evidence
    attention_fused: list[float]
    answers: dict[str, str] = field(default_factory=dict)  # "full" / "fused" -> generated text

    @property
    def first_divergence(self) -> Divergence | None:
        return self.diff.first_divergence(self.tol)

    def selected_positions(self) -> list[int]:
        """Prompt positions of the document tokens the strategy recomputed."""
        return [int(r) + self.prompt.n_prefix for r in self.fused.selected.tolist()]

    def where(self, position: int) -> dict[str, Any]:
        """What part of the prompt a position is in: prefix, chunk i (and offset), or question."""
        p = self.prompt
        if position < p.n_prefix:
            return {"part": "prefix", "offset": position}
        doc = position - p.n_prefix
        for i, (start, end) in enumerate(p.spans):
            if start <= doc < end:
                return {"part": "chunk", "chunk": i, "offset": doc - start}
        return {"part": "question", "offset": doc - p.n_docs}

    def chunk_errors(self) -> list[dict[str, float]]:
        """Per chunk: the largest rel-L2 of K and of V over its positions, layers and heads."""
        out = []
        for start, end in self.prompt.spans:
            a, b = self.prompt.n_prefix + start, self.prompt.n_prefix + end
            out.append({t: float(self.diff.maps[t]["rel_l2"][:, :, a:b].nan_to_num(float("inf")).max())
                        for t in ("keys", "values")})
        return out

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        selected = set(self.selected_positions())
        return {
            "task": self.task.id,
            "question": self.task.question,
            "accepted": self.task.answers,
            "strategy": self.strategy.spec(),
            "rate": self.strategy.rate_value,
            "answers": {name: {"text": text, **score(text, self.task.answers,
                                                     verbatim=bool(self.task.meta.get("verbatim")))}
                        for name, text in self.answers.items()},
            "n_tokens": self.prompt.n_tokens,
            "n_prefix": self.prompt.n_prefix,
            "chunks": [{"start": self.prompt.n_prefix + s, "end": self.prompt.n_prefix + e} for s, e in self.prompt.spans],
            "recomputed": self.fused.recomputed,
            "selected": sorted(selected),
            "tolerance": self.tol,
            "first_divergence": None if first is None else {**first.to_dict(), **self.where(first.position)},
            "chunk_errors": self.chunk_errors(),
            "evidence": [{**asdict(e), "selected": sum(p in selected for p in e.positions)} for e in self.evidence],
            "attention_on_evidence": {"full": self.attention_full, "fused": self.attention_fused},
        }


class _CacheLayers:
    """A prefill's cache as the diff reads it: `tensor(layer, "keys"|"values")` over the prompt's positions."""

    def __init__(self, cache, n_tokens: int) -> None:
        self.layers = cache.layers
        self.n_tokens = n_tokens

    def tensor(self, layer: int, which: str) -> torch.Tensor:
        return getattr(self.layers[layer], which)[:, :, : self.n_tokens].float().cpu()


def locate(token_texts: list[str], prompt: FusionPrompt, text: str) -> Evidence:
    """The document tokens that hold `text` (found in the documents' decoded tokens, case-insensitively)."""
    start_doc = prompt.n_prefix
    pieces = token_texts[start_doc: start_doc + prompt.n_docs]
    joined, starts = "", []
    for piece in pieces:
        starts.append(len(joined))
        joined += piece
    at = joined.lower().find(text.lower())
    if at < 0 or not text:
        return Evidence(text, [], None)
    end = at + len(text)
    positions = [start_doc + i for i, s in enumerate(starts) if s < end and s + len(pieces[i]) > at]
    doc = positions[0] - start_doc
    chunk = next(i for i, (a, b) in enumerate(prompt.spans) if a <= doc < b)
    return Evidence(text, positions, chunk)


def evidence_texts(task: Task) -> list[str]:
    """A generated task's planted facts; else its accepted answers."""
    facts = task.meta.get("facts")
    if isinstance(facts, list) and facts and all(isinstance(f, str) for f in facts):
        return list(facts)
    return [a for a in task.answers if a.strip()]


def question_attention(model, cache, prompt: FusionPrompt, positions: list[int]) -> list[float]:
    """Per layer: the attention mass the user's question tokens put on `positions`, averaged over
    query heads and question tokens, when the question runs over `cache`'s context."""
    n_context = prompt.n_prefix + prompt.n_docs
    context = DynamicCache(ddp_cache_data=[(layer.keys[:, :, :n_context].clone(), layer.values[:, :, :n_context].clone())
                                           for layer in cache.layers])
    start, end = prompt.query_span
    wanted = torch.tensor(positions, dtype=torch.long)
    mass: dict[int, float] = {}

    def tap(module, query, key, attention_mask, kwargs):
        rows = torch.arange(start, end)
        probs = rows_attention(query, key, rows, rows + n_context, kwargs.get("scaling"))  # [heads, rows, keys]
        mass[module.layer_idx] = float(probs[:, :, wanted.to(probs.device)].sum(-1).mean()) if len(positions) else 0.0

    n_layers = len(decoder_layers(model))
    ids = torch.tensor([list(prompt.question)], device=model.device)
    position_ids = torch.arange(n_context, prompt.n_tokens, device=model.device)[None]
    with torch.no_grad(), attention_taps(model, {i: tap for i in range(n_layers)}):
        model(input_ids=ids, position_ids=position_ids, past_key_values=context, use_cache=True, logits_to_keep=1)
    return [mass[i] for i in range(n_layers)]


def explain(loaded: "LoadedModel", prompt: FusionPrompt, task: Task, strategy: Strategy, store: ChunkStore, *,
            tol: float = DEFAULT_TOL, max_new_tokens: int = 24) -> Explanation:
    """Full prefill and `strategy` on one task, their caches diffed, the evidence and attention on it."""
    model = loaded.model
    full = prefill(loaded, prompt, make_strategy("full"), store)
    fused = prefill(loaded, prompt, strategy, store)
    n_layers = len(decoder_layers(model))
    diff = diff_caches(_CacheLayers(full.cache, prompt.n_tokens), _CacheLayers(fused.cache, prompt.n_tokens), n_layers)
    token_texts = [loaded.tokenizer.decode([t]) for t in prompt.ids]
    evidence = [locate(token_texts, prompt, text) for text in evidence_texts(task)]
    positions = sorted({p for e in evidence for p in e.positions})
    attention_full = question_attention(model, full.cache, prompt, positions)
    attention_fused = question_attention(model, fused.cache, prompt, positions)
    answers = {}  # decoded last: decoding appends to the caches
    for name, done in (("full", full), ("fused", fused)):
        tokens = decode_n_tokens(model, done.cache, prompt.ids, max_new_tokens, eos=eos_ids(model),
                                 attention_mask=False, prefilled=done.logits[None]).ids
        answers[name] = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    return Explanation(task, strategy, prompt, token_texts, full, fused, diff, tol, evidence, attention_full,
                       attention_fused, answers)


@dataclass
class ExplainedTask:
    """`kvlab fuse explain`'s result: the explanation and its JSON."""

    explanation: Explanation
    summary: dict[str, Any]


def explain_task(model_spec: str, run: "RunSpec", task_file: str, task_id: str, strategy: Strategy,
                 store_url: str, *, tol: float = DEFAULT_TOL, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 prefix: str | None = None, chat: bool | None = None, max_new_tokens: int = 24,
                 progress: bool = False) -> ExplainedTask:
    """Load the model, find task `task_id` in `task_file` and explain `strategy` on it."""
    from kvlab.fusion.evaluate import open_chunk_store
    from kvlab.models import load_model

    if strategy.is_full:
        raise KvlabError("--strategy full is the reference itself: explain a fused strategy")
    task = find_task(task_file, task_id)
    loaded = load_model(model_spec, run, progress=progress)
    prompt = task_prompt(loaded, task, chat=chat, prefix=prefix, chunk_tokens=chunk_tokens)
    with open_chunk_store(store_url) as store:
        result = explain(loaded, prompt, task, strategy, store, tol=tol, max_new_tokens=max_new_tokens)
    return ExplainedTask(result, {"model": model_spec, **result.to_dict()})
