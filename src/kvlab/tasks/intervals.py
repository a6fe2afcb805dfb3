"""Confidence intervals for accuracies measured on a few dozen tasks.

The Wilson score interval (Wilson 1927) stays inside [0, 1] and keeps a sensible width at 0 or
n successes, where the normal approximation collapses to a point: 0/8 right does not prove
that a strategy never answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a success rate: (low, high); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def score_interval(scores: Sequence[float]) -> tuple[float, float] | None:
    """The 95% Wilson interval of 0/1 scores; None for graded scores (token F1), which it does not fit."""
    if not scores or any(s not in (0.0, 1.0) for s in scores):
        return None
    return wilson_interval(sum(scores), len(scores))
