"""Which document tokens a fused prefill recomputes: one small dataclass per strategy.

A strategy turns what the check layer saw (or static facts: chunk spans, surprisal) into the
document rows to recompute; the question is always recomputed on top. `rate` is the fraction
of document tokens to recompute, and the count is clamped to at least 1 and at most the number
of document tokens (a tiny rate never selects nothing). Strategies that look at the model
(`cacheblend`, `a3`) compute every token up to and including `check_layer` (`a3` at layer 0 or
with `scout=true`: only the question's); the others select before the forward pass and compute
only the selected tokens from layer 0.

    full        full prefill, the baseline (no cache reuse)
    reuse       recompute the question only
    last        the last document tokens (those nearest the question)
    cacheblend  largest squared L2 of V_fresh - V_cached at the check layer (CacheBlend)
    a3          attention of the user's question tokens to each document token at the check layer
                (default 0; A^3 uses 1), summed over heads and question tokens, average-pooled with
                width `pool` (A^3); scored over the stored cache by the question's rows alone at
                check layer 0 or with `scout=true`, so no layer runs over every token
    epic        the first tokens of every chunk (EPIC's LegoLink; `k` per chunk, or the rate)
    surprisal   budget split across chunks by length, the most surprising tokens of each chunk
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlab.errors import KvlabError
from kvlab.params import ParamError, build_params, registrar, render


class StrategyError(KvlabError):
    """A strategy spec that names no strategy or has bad parameters."""


@dataclass
class SelectionInputs:
    """What a strategy may look at; rows are document token indices (0 = first document token)."""

    spans: list[tuple[int, int]]  # each chunk's [start, end) rows
    deviation: torch.Tensor | None = None  # [n_docs] squared L2 of V_fresh - V_cached (check layer)
    attention: torch.Tensor | None = None  # [n_docs] question attention summed over heads and rows
    surprisal: torch.Tensor | None = None  # [n_docs] -log p(token | chunk so far); NaN when unknown

    @property
    def n_docs(self) -> int:
        return self.spans[-1][1] if self.spans else 0


_STRATEGIES: dict[str, type["Strategy"]] = {}


register_strategy = registrar(_STRATEGIES, "strategy")


def strategy_names() -> list[str]:
    return list(_STRATEGIES)


@dataclass(frozen=True)
class Strategy:
    """Base of every strategy."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # "deviation", "attention", "surprisal"
    uses_rate: ClassVar[bool] = False
    is_full: ClassVar[bool] = False

    def validate(self) -> None:
        """Cross-field checks; raise ValueError with a one-line reason."""

    def first_selective_layer(self) -> int:
        """The first layer that computes only the selected rows."""
        return 0

    @property
    def check_layer_index(self) -> int | None:
        return None

    @property
    def scout_layer(self) -> int | None:
        """Where a question-only pass over the stored cache stops before selecting (None: no such pass)."""
        return None

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        """Sorted document rows to recompute (LongTensor)."""
        raise NotImplementedError

    def spec(self) -> str:
        items = [f"{f.name}={render(getattr(self, f.name))}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not None and f.name != "rate"]
        return self.name + (":" + ",".join(items) if items else "")

    def label(self) -> str:
        """Like `spec`, with only the parameters that differ from their defaults (for tables)."""
        items = [f"{f.name}={render(getattr(self, f.name))}" for f in dataclasses.fields(self)
                 if f.name != "rate" and getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(items) if items else "")

    @property
    def rate_value(self) -> float | None:
        return getattr(self, "rate", None) if self.uses_rate else None


@dataclass(frozen=True)
class RateStrategy(Strategy):
    """A strategy that recomputes a `rate` fraction of the document tokens."""

    uses_rate: ClassVar[bool] = True
    rate: float = 0.15

    def validate(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {self.rate}")

    def budget(self, n_docs: int) -> int:
        """round(rate * n_docs), clamped to [1, n_docs] (0 only when there is nothing to pick)."""
        if n_docs <= 0:
            return 0
        return max(1, min(n_docs, round(self.rate * n_docs)))


@dataclass(frozen=True)
class CheckedStrategy(RateStrategy):
    """Scores tokens from what the model computes at `check_layer` (all tokens up to it)."""

    check_layer: int = 1
    per_chunk: bool = False  # split the budget across chunks by length instead of one global top-k

    def validate(self) -> None:
        super().validate()
        if self.check_layer < 0:
            raise ValueError(f"check_layer must be at least 0, got {self.check_layer}")

    def first_selective_layer(self) -> int:
        return self.check_layer + 1

    @property
    def check_layer_index(self) -> int | None:
        return self.check_layer

    def pick(self, scores: torch.Tensor, inputs: SelectionInputs) -> torch.Tensor:
        k = self.budget(inputs.n_docs)
        if self.per_chunk:
            return top_per_chunk(scores, inputs.spans, k)
        return top_rows(scores, k)


def top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the k largest scores, sorted (ties: the earlier row)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def split_budget(k: int, lengths: Sequence[int]) -> list[int]:
    """k split in proportion to lengths: floors, then one more to the largest remainders."""
    total = sum(lengths)
    if total == 0 or k <= 0:
        return [0] * len(lengths)
    quotas = [k * n / total for n in lengths]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(lengths)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: k - sum(counts)]:
        counts[i] += 1
    return [min(c, n) for c, n in zip(counts, lengths)]


def top_per_chunk(scores: torch.Tensor, spans: Sequence[tuple[int, int]], k: int) -> torch.Tensor:
    counts = split_budget(k, [end - start for start, end in spans])
    parts = [top_rows(scores[start:end], count) + start for (start, end), count in zip(spans, counts)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@register_strategy("full")
class Full(Strategy):
    """Full prefill: every token computed, no cache loaded."""

    is_full: ClassVar[bool] = True

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        return torch.arange(inputs.n_docs)


@register_strategy("reuse")
class Reuse(Strategy):
    """Every chunk's cache as stored; only the question is computed."""

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)


@register_strategy("last")
class Last(RateStrategy):
    """The last document tokens, nearest the question (at the smallest budget, the last token only)."""

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        n = inputs.n_docs
        return torch.arange(n - self.budget(n), n)


@register_strategy("cacheblend")
class CacheBlend(CheckedStrategy):
    needs: ClassVar[frozenset[str]] = frozenset({"deviation"})

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        return self.pick(_required(inputs.deviation, "deviation"), inputs)


@register_strategy("a3")
class A3(CheckedStrategy):
    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    check_layer: int = 0  # A^3 scores at layer 1; layer 0 kept the same answers, faster (BENCHMARKS.md)
    pool: int = 5  # average-pool width over neighbouring tokens (1 = none)
    # score over the stored cache (only the question runs up to check_layer), then recompute the
    # selected rows from layer 0; otherwise every token runs up to check_layer and is scored fresh.
    # Unset: at check layer 0 only, where the stored keys are the fresh ones (a token's layer-0
    # K/V depend on the token and its position alone), so both give the same selection.
    scout: bool | None = None

    def validate(self) -> None:
        super().validate()
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd width of at least 1, got {self.pool}")

    @property
    def scouts(self) -> bool:
        return self.check_layer == 0 if self.scout is None else self.scout

    def first_selective_layer(self) -> int:
        return 0 if self.scouts else super().first_selective_layer()

    @property
    def scout_layer(self) -> int | None:
        return self.check_layer if self.scouts else None

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        scores = _required(inputs.attention, "attention").float()
        if self.pool > 1:
            scores = torch.nn.functional.avg_pool1d(scores[None, None], self.pool, stride=1, padding=self.pool // 2,
                                                    count_include_pad=False)[0, 0]
        return self.pick(scores, inputs)


@register_strategy("epic")
class Epic(RateStrategy):
    k: int | None = None  # first k tokens of every chunk; unset: the rate's budget split by chunk length

    def validate(self) -> None:
        super().validate()
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        lengths = [end - start for start, end in inputs.spans]
        if self.k is not None:
            counts = [min(self.k, n) for n in lengths]
        else:
            counts = split_budget(self.budget(inputs.n_docs), lengths)
        parts = [torch.arange(start, start + count) for (start, _), count in zip(inputs.spans, counts)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@register_strategy("surprisal")
class Surprisal(RateStrategy):
    """A chunk's first token has unknown surprisal (NaN) when nothing precedes it: it ranks first."""

    needs: ClassVar[frozenset[str]] = frozenset({"surprisal"})

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        scores = _required(inputs.surprisal, "surprisal").float().nan_to_num(nan=float("inf"))
        return top_per_chunk(scores, inputs.spans, self.budget(inputs.n_docs))


def _required(value: torch.Tensor | None, what: str) -> torch.Tensor:
    if value is None:
        raise RuntimeError(f"the strategy needs the {what} scores, which were not observed")
    return value


def split_strategies(text: str) -> list[str]:
    """`a3:check_layer=0,scout=true,cacheblend` -> ["a3:check_layer=0,scout=true", "cacheblend"].

    A comma starts a new strategy unless what follows is a `name=value` parameter and the spec
    before it already has parameters (after its `:`); a stray parameter stays an item of its own,
    for `make_strategy` to refuse by name.
    """
    specs: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if specs and ":" in specs[-1] and "=" in item and ":" not in item.split("=", 1)[0]:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def make_strategy(text: str, rate: float | None = None) -> Strategy:
    """`a3:check_layer=2,pool=5` (plus a rate) -> a validated strategy; StrategyError otherwise."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    cls = _STRATEGIES.get(name)
    if cls is None:
        raise StrategyError(f"unknown strategy {name!r}; allowed: {', '.join(strategy_names())}")
    items = [item for item in (part.strip() for part in rest.split(",")) if item]
    try:
        kwargs: dict[str, Any] = build_params(cls, items, f"strategy {name}")
        if rate is not None and "rate" not in kwargs and cls.uses_rate:
            kwargs["rate"] = rate
        strategy = cls(**kwargs)
        strategy.validate()
    except ParamError as err:
        raise StrategyError(str(err)) from None
    except (ValueError, TypeError) as err:
        raise StrategyError(f"strategy {name}: {err}") from None
    return strategy
