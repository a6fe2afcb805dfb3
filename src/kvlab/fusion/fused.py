"""Fused prefill: a prompt's cache from stored chunk caches, with selective recomputation.

1. Load the prefix and each chunk from the store (computing and storing the missing ones).
2. Move each chunk's keys to where it lands (`rope.RopeShift`) and concatenate everything into
   one FusionLayer per model layer, with empty slots for the question.
3. Run the model once over the whole prompt. Layers before the strategy's first selective
   layer compute every token (the check layer is the last of them, where CacheBlend's value
   deviation and A^3's question attention are observed); from there a forward pre-hook on each
   decoder layer keeps only the selected rows (selected document tokens + the whole question;
   the prefix stays as stored, it is exact), with their positions and a mask that lets each see
   every key up to its own position; their fresh K/V overwrite the loaded ones. Their attention
   runs in blocks of rows, each over the keys it can see. A strategy that scouts (`a3` at its
   default layer 0) first runs the question alone up to its check layer over the stored cache
   and selects from that, so every layer of this pass is selective.
4. The last row's logits give the first token; the cache then decodes like any other.

Everything goes through transformers' own interfaces: cache layers, forward pre-hooks with
kwargs, position_ids, and AttentionInterface taps; nothing is patched and nothing is per family.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvlab.caches.eviction import EvictionPolicy
from kvlab.caches.fusion import FusionLayer, FusionPlan
from kvlab.caches.taps import attention_taps, inner_attention, last_rows_attention, rows_attention
from kvlab.decode import decode_n_tokens, eos_ids
from kvlab.errors import KvlabError
from kvlab.fusion.chunks import ChunkKV, chunk_key, compute_chunk_kv
from kvlab.fusion.prompt import FusionPrompt
from kvlab.fusion.rope import rope_shift
from kvlab.fusion.store.base import ChunkStore
from kvlab.fusion.store.errors import CorruptChunkError
from kvlab.fusion.strategies import Reuse, SelectionInputs, Strategy
from kvlab.intercept import intercept
from kvlab.model_facts import LoadedModel, decoder_layers


@dataclass
class LoadStats:
    hits: int = 0
    misses: int = 0  # computed now and stored
    repaired: int = 0  # damaged or incomplete entries recomputed and replaced
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "repaired": self.repaired, "load_s": self.seconds}


@dataclass
class Prefill:
    """The result of a (fused or full) prefill: the cache to decode from and the first token's logits."""

    cache: Cache
    logits: torch.Tensor  # [vocab] float32, next-token logits after the prompt
    n_tokens: int
    n_docs: int
    recomputed: int  # document tokens recomputed in the selective layers
    selected: torch.Tensor  # their rows among the document tokens
    load: LoadStats = field(default_factory=LoadStats)
    seconds: float = 0.0  # loading + prefill, up to the first token's logits

    @property
    def recomputed_fraction(self) -> float:
        return self.recomputed / self.n_docs if self.n_docs else 0.0


def load_chunks(loaded: "LoadedModel", store: ChunkStore, prompt: FusionPrompt, *,
                surprisal: bool = False) -> tuple[ChunkKV | None, list[ChunkKV], LoadStats]:
    """The prefix (as a chunk at position 0) and every chunk, from the store or computed and stored."""
    stats = LoadStats()
    started = time.perf_counter()
    prefix_ids = list(prompt.prefix)
    prefix = _fetch(loaded, store, prefix_ids, [], False, stats, None) if prefix_ids else None
    prefix_cache = None
    if prefix is not None:
        prefix_cache = DynamicCache(ddp_cache_data=list(zip(prefix.keys, prefix.values)))
    logits: list[torch.Tensor] = []

    def prefix_logits() -> torch.Tensor | None:
        """The logits after the prefix (a missing chunk's first surprisal), computed once for all misses."""
        if prefix_ids and not logits:
            with torch.no_grad():
                logits.append(loaded.model(torch.tensor([prefix_ids], device=loaded.model.device)).logits[0, -1])
        return logits[0] if logits else None

    chunks = [_fetch(loaded, store, list(ids), prefix_ids, surprisal, stats, prefix_cache, prefix_logits)
              for ids in prompt.chunks]
    stats.seconds = time.perf_counter() - started
    return prefix, chunks, stats


def _fetch(loaded, store: ChunkStore, ids: list[int], prefix_ids: list[int], surprisal: bool, stats: LoadStats,
           prefix_cache, prefix_logits=lambda: None) -> ChunkKV:
    key = chunk_key(loaded, ids, prefix_ids)
    try:
        chunk = store.get(key)
    except CorruptChunkError:
        chunk = None
        stats.repaired += 1
        store.delete(key)
    if chunk is not None and surprisal and chunk.surprisal is None:
        stats.repaired += 1
        store.delete(key)
        chunk = None
    if chunk is not None:
        stats.hits += 1
        return chunk
    key, chunk = compute_chunk_kv(loaded, ids, prefix_ids, surprisal=True, prefix_cache=prefix_cache,
                                  prefix_logits=prefix_logits())
    store.put(key, chunk)
    stats.misses += 1
    return chunk


def _check_model(model, strategy: Strategy) -> int:
    n_layers = len(decoder_layers(model))
    check = strategy.check_layer_index
    if check is not None and check >= n_layers:
        raise KvlabError(f"strategy {strategy.spec()}: check_layer={check} but the model has {n_layers} layers "
                         f"(0..{n_layers - 1})")
    if any(DynamicCache(config=model.config).is_sliding):
        raise KvlabError("fusion needs full attention in every layer; this model has sliding-window layers")
    return n_layers


def prefill(loaded: "LoadedModel", prompt: FusionPrompt, strategy: Strategy, store: ChunkStore | None = None, *,
            evict: EvictionPolicy | None = None) -> Prefill:
    """Prefill `prompt` with `strategy` (chunks from `store`), then evict with `evict` if given."""
    with torch.no_grad():
        if strategy.is_full:
            return _full_prefill(loaded, prompt, evict)
        if store is None:
            raise KvlabError(f"strategy {strategy.name} reuses stored chunks: give a store")
        return _fused_prefill(loaded, prompt, strategy, store, evict)


def _full_prefill(loaded, prompt: FusionPrompt, evict: EvictionPolicy | None) -> Prefill:
    model = loaded.model
    started = time.perf_counter()
    cache = DynamicCache(config=model.config)
    observed: dict[int, torch.Tensor] = {}
    ids = torch.tensor([prompt.ids], device=model.device)
    with _observation_taps(model, evict, prompt, observed, {}):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[0, -1].float()
    seconds = time.perf_counter() - started
    if evict is not None:
        cache = evict.adopt(cache, observed, window=len(prompt.question))
    return Prefill(cache, logits, prompt.n_tokens, prompt.n_docs, prompt.n_docs, torch.arange(prompt.n_docs),
                   seconds=seconds)


def _fused_prefill(loaded, prompt: FusionPrompt, strategy: Strategy, store: ChunkStore,
                   evict: EvictionPolicy | None) -> Prefill:
    model = loaded.model
    n_layers = _check_model(model, strategy)
    shift = rope_shift(model)
    started = time.perf_counter()
    prefix, chunks, stats = load_chunks(loaded, store, prompt, surprisal="surprisal" in strategy.needs)
    first_selective = min(strategy.first_selective_layer(), n_layers)
    plan = FusionPlan(n_tokens=prompt.n_tokens, n_prefix=prompt.n_prefix, n_docs=prompt.n_docs,
                      check_layer=strategy.check_layer_index if "deviation" in strategy.needs else None)
    layers = _assemble(shift, prefix, chunks, prompt, first_selective, plan.check_layer, model.device)
    cache = Cache(layers=[FusionLayer(i, k, v, plan) for i, (k, v) in enumerate(layers)])
    surprisal = None
    if "surprisal" in strategy.needs:
        surprisal = torch.cat([c.surprisal.float() for c in chunks])
    selector = _Selector(model, plan, strategy, SelectionInputs(prompt.spans, surprisal=surprisal))
    observed: dict[int, torch.Tensor] = {}
    ids = torch.tensor([prompt.ids], device=model.device)
    positions = torch.arange(prompt.n_tokens, device=model.device)[None]
    if strategy.scout_layer is not None:
        _scout(model, prompt, plan, strategy.scout_layer, ids, positions, cache)
    question_taps = ({strategy.check_layer_index: plan}
                     if "attention" in strategy.needs and strategy.scout_layer is None else {})
    selective = range(first_selective, n_layers)
    with selector.hooks(selective), _observation_taps(model, evict, prompt, observed, question_taps,
                                                      {i: selector.blockwise for i in selective}):
        out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    plan.done = True
    logits = out.logits[0, -1].float()
    seconds = time.perf_counter() - started
    if plan.rows is None:  # no selective layer: every token was computed
        selected = torch.arange(prompt.n_docs)
    else:
        rows = plan.rows.cpu() - prompt.n_prefix
        selected = rows[(rows >= 0) & (rows < prompt.n_docs)]
    if evict is not None:
        cache = evict.adopt(cache, observed, window=len(prompt.question))
    return Prefill(cache, logits, prompt.n_tokens, prompt.n_docs, int(selected.numel()), selected, stats, seconds)


class _Scouted(Exception):
    """Ends a scout pass once its last layer has run: nothing after it is needed."""


def _scout(model, prompt: FusionPrompt, plan: FusionPlan, layer: int, ids, positions, cache: Cache) -> None:
    """The question's attention at `layer` over the stored cache, into `plan.observations`.

    Only the question's rows run, through layers 0..`layer`; their K/V land in the question's
    slots, which the fused pass then recomputes. Layer 0's stored K/V are exact (they depend on
    the token and its position alone), so the scores differ from a full pass only by the stored
    layers above it.
    """
    scout = _Selector(model, plan, Reuse(), SelectionInputs(prompt.spans))
    scouted = range(layer + 1)

    def stop(module, args, kwargs, output):
        raise _Scouted

    with contextlib.suppress(_Scouted), scout.hooks(scouted), \
            intercept(model, post=[(decoder_layers(model)[layer], stop)]), \
            _observation_taps(model, None, prompt, {}, {layer: plan}, {i: scout.blockwise for i in scouted}):
        model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    plan.rows = None


def _assemble(shift, prefix: ChunkKV | None, chunks: Sequence[ChunkKV], prompt: FusionPrompt,
              first_selective: int, check_layer: int | None, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer `[1, kv, n_tokens, d]`: prefix, chunks moved to where they land, zero question slots.

    A chunk stored at base len(prefix) lands at len(prefix) + its start among the documents:
    every token of it moves by that start. Layers that compute every token overwrite the
    loaded K/V unread, so they get a zero-cost stand-in (but for the values of the check layer,
    which CacheBlend compares with the fresh ones).
    """
    n_layers = chunks[0].n_layers
    cos = sin = None
    if first_selective < n_layers:
        starts = torch.cat([torch.full((len(c),), start) for c, (start, _) in zip(prompt.chunks, prompt.spans)])
        cos, sin = shift.angles(starts, device)
    docs = slice(prompt.n_prefix, prompt.n_prefix + prompt.n_docs)

    def laid_out(stored: ChunkKV | None, parts: list[torch.Tensor], rotate: bool) -> torch.Tensor:
        first = parts[0]
        out = torch.zeros(*first.shape[:2], prompt.n_tokens, first.shape[-1], dtype=first.dtype, device=device)
        if stored is not None:
            out[:, :, : prompt.n_prefix] = stored
        for part, (start, end) in zip(parts, prompt.spans):
            out[:, :, docs.start + start: docs.start + end] = part
        if rotate:
            out[:, :, docs] = shift.rotate(out[:, :, docs], cos, sin)
        return out

    def stand_in(like: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=like.dtype, device=device).expand(*like.shape[:2], prompt.n_tokens, like.shape[-1])

    out = []
    for i in range(n_layers):
        full = i < first_selective
        key_parts = [c.keys[i] for c in chunks]
        value_parts = [c.values[i] for c in chunks]
        prefix_keys, prefix_values = (None, None) if prefix is None else (prefix.keys[i], prefix.values[i])
        keys = stand_in(key_parts[0]) if full else laid_out(prefix_keys, key_parts, rotate=True)
        values = (stand_in(value_parts[0]) if full and i != check_layer
                  else laid_out(prefix_values, value_parts, rotate=False))
        out.append((keys, values))
    return out


class _Selector:
    """Shrinks the selective layers to the selected rows (forward pre-hooks) and runs their attention in blocks."""

    def __init__(self, model, plan: FusionPlan, strategy: Strategy, inputs: SelectionInputs) -> None:
        self.model = model
        self.plan = plan
        self.strategy = strategy
        self.inputs = inputs
        self.state: dict[str, Any] | None = None

    def hooks(self, indices: range) -> contextlib.AbstractContextManager[None]:
        layers = decoder_layers(self.model)
        return intercept(self.model, pre=[(layers[i], self._pre_hook) for i in indices])

    def _select(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        plan = self.plan
        self.inputs.deviation = plan.observations.get("deviation")
        self.inputs.attention = plan.observations.get("attention")
        docs = self.strategy.select(self.inputs).to(torch.long).cpu()
        if docs.numel() and (docs.min() < 0 or docs.max() >= plan.n_docs or not bool((docs[1:] > docs[:-1]).all())):
            raise RuntimeError(f"strategy {self.strategy.name} returned rows outside 0..{plan.n_docs - 1} or unsorted")
        device = self.model.device
        rows = torch.cat([docs + plan.n_prefix, torch.arange(plan.n_prefix + plan.n_docs, plan.n_tokens)]).to(device)
        embeddings = kwargs.get("position_embeddings")
        if not isinstance(embeddings, tuple) or any(t.shape[-2] != plan.n_tokens for t in embeddings):
            raise KvlabError("fusion needs decoder layers that take position_embeddings (cos, sin) per token")
        state = {
            "rows": rows,
            "position_embeddings": tuple(t[:, rows] for t in embeddings),
            "mask": self._mask(rows),
            "blocks": self._blocks(rows),
        }
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            state["position_ids"] = kwargs["position_ids"][:, rows]
        plan.rows = rows
        return state

    def _mask(self, rows: torch.Tensor):
        """Selected queries see every key up to their own position, in the attention kernel's format."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        def visible(batch_idx, head_idx, q_idx, kv_idx):
            return kv_idx <= rows[q_idx]

        make = ALL_MASK_ATTENTION_FUNCTIONS[inner_attention(self.model)]
        return make(batch_size=1, q_length=rows.numel(), kv_length=self.plan.n_tokens, mask_function=visible,
                    allow_is_causal_skip=False, dtype=self.model.dtype, device=rows.device, config=self.model.config)

    def _blocks(self, rows: torch.Tensor) -> list[tuple[int, int, int]]:
        """(first query, end query, number of keys it can see) per block of about equal size.

        More blocks skip more masked keys but cost more kernel calls: the count (1, 2, 4 or 8)
        is the one with the least work, a call counted as 1/64 of the one-block work.
        """
        n, n_keys = rows.numel(), self.plan.n_tokens
        best, best_cost = [(0, n, n_keys)], float("inf")
        for count in (1, 2, 4, 8):
            cuts = sorted({round(n * b / count) for b in range(count + 1)})
            blocks = [(a, b, int(rows[b - 1]) + 1) for a, b in zip(cuts, cuts[1:]) if b > a]
            cost = sum((b - a) * end for a, b, end in blocks) + len(blocks) * n * n_keys / 64
            if cost < best_cost:
                best, best_cost = blocks, cost
        return best

    def blockwise(self, kernel, module, query, key, value, attention_mask, **kwargs):
        """Attention of the selected rows, block by block over the keys each block can see.

        Keys past a block's last position are masked for all its rows anyway: leaving them out
        gives the same result and spares most of the work the mask would waste.
        """
        if self.state is None or query.shape[-2] != self.state["rows"].numel():
            return kernel(module, query, key, value, attention_mask, **kwargs)
        outputs = []
        for a, b, end in self.state["blocks"]:
            mask = attention_mask[:, :, a:b, :end] if attention_mask is not None else None
            out, _ = _masked(kernel, module, query[:, :, a:b], key[:, :, :end], value[:, :, :end], mask, kwargs)
            outputs.append(out)
        return torch.cat(outputs, dim=1), None

    def _pre_hook(self, module, args, kwargs):
        if self.state is None:
            self.state = self._select(kwargs)
        rows = self.state["rows"]
        in_kwargs = not args
        hidden = kwargs["hidden_states"] if in_kwargs else args[0]
        if hidden.shape[-2] != rows.numel():
            hidden = hidden[:, rows]
        kwargs["position_embeddings"] = self.state["position_embeddings"]
        kwargs["attention_mask"] = self.state["mask"]
        if "position_ids" in self.state:
            kwargs["position_ids"] = self.state["position_ids"]
        if in_kwargs:
            kwargs["hidden_states"] = hidden
            return args, kwargs
        return (hidden, *args[1:]), kwargs


def _masked(kernel, module, query, key, value, mask, kwargs: dict[str, Any]):
    """`kernel` over one block of rows with its mask.

    transformers' sdpa repeats each KV head for its query heads (a copy of the keys and values
    per call) unless there is no mask; it adds a position bias to the scores as it would a mask,
    so the mask given as a bias lets the kernel use the KV head groups as they are: same result,
    fewer copies. Any other kernel gets the mask as a mask.
    """
    if kernel is sdpa_attention_forward and mask is not None and "position_bias" not in kwargs:
        return kernel(module, query, key, value, None, **{**kwargs, "position_bias": mask, "is_causal": False})
    return kernel(module, query, key, value, mask, **kwargs)


@contextlib.contextmanager
def _observation_taps(model, evict: EvictionPolicy | None, prompt: FusionPrompt, observed: dict[int, torch.Tensor],
                      question_taps: dict[int, FusionPlan], routes=None) -> Iterator[None]:
    """Taps that record attention from the question part of the prompt.

    For eviction: all of the question part (SnapKV's observation window) at every layer. For
    A^3: the user's question tokens at the check layer, summed over heads and tokens, per
    document token.
    """
    n_question = len(prompt.question)
    start, end = prompt.query_span
    observe = evict is not None and evict.observes
    wanted = set(question_taps) | (set(range(len(decoder_layers(model)))) if observe else set())

    def tap(module, query, key, attention_mask, kwargs):
        layer = module.layer_idx
        if observe:
            observed[layer] = evict.reduce(last_rows_attention(query, key, n_question, kwargs.get("scaling")),
                                           key.shape[1])
        plan = question_taps.get(layer)
        if plan is not None:
            first_row = query.shape[-2] - n_question  # the question closes the rows of every layer
            first_key = key.shape[-2] - n_question
            probs = rows_attention(query, key, torch.arange(first_row + start, first_row + end),
                                   torch.arange(first_key + start, first_key + end), kwargs.get("scaling"))
            plan.observations["attention"] = probs[:, :, plan.docs].sum(dim=(0, 1))

    with attention_taps(model, {layer: tap for layer in sorted(wanted)}, routes):
        yield


@dataclass
class Answer:
    text: str
    tokens: list[int]
    ttft_s: float  # wall clock
    tpot_s: float | None
    prefill: Prefill
    ttft_cpu_s: float = 0.0  # this process's CPU time up to the first token (steadier on a busy machine)

    def to_dict(self) -> dict[str, Any]:
        """The answer, its timing and what its prefill recomputed (`kvlab fuse run --json`)."""
        result = self.prefill
        return {"answer": self.text, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "n_tokens": result.n_tokens,
                "n_docs": result.n_docs, "recomputed": result.recomputed,
                "recomputed_fraction": result.recomputed_fraction}


def answer(loaded: "LoadedModel", prompt: FusionPrompt, strategy: Strategy, store: ChunkStore | None = None, *,
           evict: EvictionPolicy | None = None, max_new_tokens: int = 32) -> Answer:
    """Prefill with `strategy`, then decode greedily; TTFT runs from the first store read to the first token."""
    started, cpu_started = time.perf_counter(), time.process_time()
    result = prefill(loaded, prompt, strategy, store, evict=evict)
    int(torch.argmax(result.logits))  # the first token is part of the time to first token
    ttft, ttft_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    decoded = decode_n_tokens(loaded.model, result.cache, prompt.ids, max_new_tokens, eos=eos_ids(loaded.model),
                              attention_mask=False, prefilled=result.logits[None])
    tokens = decoded.ids
    text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    steps = decoded.seconds[1:]  # step 0 is the prefill, counted in TTFT
    tpot = sum(steps) / len(steps) if steps else None
    return Answer(text, tokens, ttft, tpot, result, ttft_cpu)
