"""The one greedy decode loop: a first pass over the prompt, then one token per step fed back.

Capture, trace recording, fused answers, the offload decode bench and calibration all step a
model the same way (gpt-fast's `decode_n_tokens`): run a forward pass, take the last
position's logits, choose the next token (the forced one under teacher forcing, else the
model's own argmax), stop at the last step or an end-of-sequence token, feed the token back.
What each of them keeps of a step (top-k logits, attention records, bytes moved, timings) is
its callback's business, so the loop itself is written once. `run_steps` is the loop over any
forward function (llama.cpp's runner uses it too); `decode_n_tokens` is it over a transformers
model and its cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvlab.intercept import intercept

# forward(feed [batch, n]) -> (the last position's logits [batch, vocab], the cache after the pass)
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class Step:
    """One forward pass, as the callback sees it."""

    index: int  # 0: the pass over the first feed (the prompt); i: the pass over the i-th token fed back
    logits: torch.Tensor  # [batch, vocab], the last position's, in the dtype the model returned
    greedy: torch.Tensor  # [batch], the model's own argmax
    token: torch.Tensor  # [batch], the token that follows: the forced one, else `greedy`
    seconds: float  # the forward pass, wall clock (the device synchronised around it)
    cache: Any  # the cache after the pass (None where the runner keeps its own)


@dataclass
class Decoded:
    """What the loop returns: every step's token and own choice, `[batch, steps]` on CPU, and timings."""

    tokens: torch.Tensor
    greedy: torch.Tensor
    seconds: list[float]
    cache: Any = None

    @property
    def ids(self) -> list[int]:
        """The tokens of the first (for a batch of one: the only) row."""
        return self.tokens[0].tolist()


def run_steps(forward: Forward, feed: Sequence[int] | torch.Tensor, n_steps: int, *,
              forced: Sequence[int] | torch.Tensor | None = None, eos: Container[int] = (),
              callback: Callable[[Step], None] | None = None, device: torch.device | str = "cpu") -> Decoded:
    """At most `n_steps` forward passes: `feed` first, then each step's token.

    forced: the token after step i is `forced[i]` (a row per batch row), the model's own choice
        past its end; the last step's token is returned but never fed.
    eos: the loop stops after a step whose token (every row's) is in it.
    callback: called after every pass with its `Step`, before the loop decides to stop.
    """
    device = torch.device(device)
    feed = _rows(feed, device)
    forced_rows = None if forced is None else _rows(forced, device)
    tokens: list[torch.Tensor] = []
    greedy: list[torch.Tensor] = []
    seconds: list[float] = []
    cache = None
    with torch.no_grad():
        for index in range(n_steps):
            started = _now(device)
            logits, cache = forward(feed)
            elapsed = _now(device) - started
            own = torch.argmax(logits, dim=-1)
            token = forced_rows[:, index] if forced_rows is not None and index < forced_rows.shape[1] else own
            tokens.append(token)
            greedy.append(own)
            seconds.append(elapsed)
            if callback is not None:
                callback(Step(index, logits, own, token, elapsed, cache))
            if index == n_steps - 1 or (eos and all(t in eos for t in token.tolist())):
                break
            feed = token[:, None]
    return Decoded(_columns(tokens, feed.shape[0]), _columns(greedy, feed.shape[0]), seconds, cache)


def decode_n_tokens(model, cache, feed: Sequence[int] | torch.Tensor, n_steps: int, *,
                    forced: Sequence[int] | torch.Tensor | None = None, eos: Container[int] = (),
                    callback: Callable[[Step], None] | None = None, attention_mask: bool = True,
                    prefilled: torch.Tensor | None = None) -> Decoded:
    """`run_steps` over a transformers model: each pass `model(...)` through `cache`, keeping one logits row.

    attention_mask: pass the all-ones mask of everything fed so far (as `generate` does); without
    it the model assumes one itself.
    prefilled: the last position's logits `[batch, vocab]` of a pass over `feed` that already ran
        into `cache` (a fused prefill): step 0 takes its token from them instead of running `feed`.
    """
    mask: torch.Tensor | None = None

    def forward(ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        nonlocal cache, mask, prefilled
        if attention_mask:
            mask = torch.ones_like(ids) if mask is None else torch.cat([mask, mask.new_ones(ids.shape)], dim=1)
        if prefilled is not None:
            logits, prefilled = prefilled, None
            return logits, cache
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        return out.logits[:, -1], cache

    decoded = run_steps(forward, feed, n_steps, forced=forced, eos=eos, callback=callback, device=model.device)
    decoded.cache = cache
    return decoded


@contextlib.contextmanager
def policy_cache(model, policy, *, attention: str | None = None, batch_size: int = 1,
                 max_length: int | None = None) -> Iterator[Any]:
    """A fresh cache of `policy`, used inside the policy's session and with `model` on `attention`.

    Everything is undone on exit, error or not: the session ends, the attention comes back.
    """
    with intercept(model, attention=attention):
        cache = policy.build(model, batch_size=batch_size, max_length=max_length)
        with policy.session(model), torch.no_grad():
            yield cache


def eos_ids(model) -> set[int]:
    """The model's end-of-sequence token ids (its generation config's), empty when it names none."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _rows(ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token ids as a long tensor `[batch, n]` on `device` (a flat list or 1-d tensor is one row)."""
    t = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    t = t.to(device=device, dtype=torch.long)
    return t[None] if t.dim() == 1 else t


def _columns(per_step: list[torch.Tensor], batch: int) -> torch.Tensor:
    if not per_step:
        return torch.empty((batch, 0), dtype=torch.long)
    return torch.stack(per_step, dim=1).cpu()


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
