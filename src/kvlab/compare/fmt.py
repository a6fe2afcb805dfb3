"""How figures are written in the terminal summary and the HTML report (one place, one style)."""

from __future__ import annotations

import math


def fmt_num(value: float | None, digits: int = 3) -> str:
    """A figure in `digits` significant digits; n/a, NaN or inf where it is not a number."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else "inf"
    return f"{value:.{digits}g}"


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
