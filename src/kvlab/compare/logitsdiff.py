"""Per-step agreement of a test run's logits with the golden run's.

Under teacher forcing both runs see the same tokens, so step s of each is comparable: KL
divergence of the full next-token distributions, whether their top-1 tokens agree, and the
first step at which the test's own greedy token differs from the token the golden run chose
(where the test run, left alone, would have parted from the golden text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvlab.compare.metrics import first_mismatch, kl_divergence
from kvlab.compare.source import SnapshotSource

LOGITS_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LogitsDiff:
    steps: int
    kl: list[float] | None  # KL(golden || test) per step, nats; None without full logits
    top1: list[bool] | None  # test argmax == golden argmax per step
    first_token_mismatch: int | None  # first step where test's greedy token != golden token
    golden_token: int | None = None  # the tokens at that step
    test_token: int | None = None

    @property
    def kl_mean(self) -> float | None:
        return sum(self.kl) / len(self.kl) if self.kl else None

    @property
    def kl_max(self) -> float | None:
        return max(self.kl) if self.kl else None

    @property
    def top1_agreement(self) -> float | None:
        return sum(self.top1) / len(self.top1) if self.top1 else None

    def to_dict(self) -> dict:
        return {
            "first_token_mismatch": self.first_token_mismatch,
            "kl_mean": _finite_or_none(self.kl_mean),
            "top1_agreement": self.top1_agreement,
            "kl_max": _finite_or_none(self.kl_max),
            "steps": self.steps,
            "golden_token": self.golden_token,
            "test_token": self.test_token,
            "kl_per_step": None if self.kl is None else [_finite_or_none(v) for v in self.kl],
            "top1_per_step": self.top1,
        }


def diff_logits(golden: SnapshotSource, test: SnapshotSource) -> LogitsDiff:
    """Compare the recorded steps of two runs over the same tokens."""
    g_snap, t_snap = golden.snapshot, test.snapshot
    golden_tokens = g_snap.token_ids[g_snap.n_prompt:]
    steps = len(golden_tokens)
    kl = _kl_per_step(golden, test, steps)
    g_greedy, t_greedy = g_snap.greedy_ids, t_snap.greedy_ids
    top1 = None
    if len(g_greedy) == len(t_greedy) == steps and steps:
        top1 = [a == b for a, b in zip(g_greedy, t_greedy)]
    mismatch = first_mismatch(golden_tokens, t_greedy) if len(t_greedy) == steps else None
    return LogitsDiff(
        steps=steps,
        kl=kl,
        top1=top1,
        first_token_mismatch=mismatch,
        golden_token=golden_tokens[mismatch] if mismatch is not None else None,
        test_token=t_greedy[mismatch] if mismatch is not None else None,
    )


def _kl_per_step(golden: SnapshotSource, test: SnapshotSource, steps: int) -> list[float] | None:
    g_steps, t_steps = golden.logits_steps(), test.logits_steps()
    if g_steps is None or t_steps is None or g_steps != t_steps or g_steps != steps or not steps:
        return None
    vocab = golden.vocab() or 1
    rows = max(1, LOGITS_CHUNK_ELEMENTS // vocab)
    kl: list[float] = []
    for g_rows, t_rows in zip(golden.logits_chunks(rows), test.logits_chunks(rows)):
        kl.extend(kl_divergence(g_rows, t_rows).tolist())
    return kl


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
