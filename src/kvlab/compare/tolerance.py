"""How far a test cache may drift before the diff calls it a divergence.

The tolerance is a relative L2 error per cache row (one layer, KV head and position of K or
V: `||t - g|| / ||g||` over head_dim). Its default follows the precision of the coarser of the
two runs, because rounding alone already moves every row by about that much:

| precision | default rel-L2 | largest row measured, teacher-forced vs float32 (smollm2) |
| --- | --- | --- |
| float32 | 1e-4 | another attention kernel (eager vs sdpa): 5e-6 at 1k tokens, 1e-5 at 4k |
| float16 | 0.05 | 0.013 at 1k tokens, 0.021 at 4k (99.99th percentile 0.015) |
| bfloat16 | 0.25 | 0.080 at 1k tokens, 0.133 at 4k (99.99th percentile 0.097) |
| float8 (e4m3 / e5m2) | 0.25 / 0.5 | 3 / 2 mantissa bits against bfloat16's 7 |
| a lossy cache policy | 0.5 | at least the dtype's figure; set `--tol` to the policy's bound |
| another engine with its own arithmetic (llama.cpp; not vLLM, which runs the float weights in the same dtype) | 0.25 | f16 cache vs float32: 0.14 (8-bit matmul activations on Q4_1 weights) |

so a default run flags rows that drift about twice past the worst that rounding gave at 4k tokens, and
a clean precision study reports no divergence. `--tol` overrides: one number for every run
(`--tol 0.02`) or per precision (`--tol bfloat16=0.1,float16=0.02,lossy=0.3,engine=0.2`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.errors import KvlabError

DEFAULT_REL_L2: dict[str, float] = {
    "float32": 1e-4,
    "float16": 0.05,
    "bfloat16": 0.25,
    "float8_e4m3fn": 0.25,
    "float8_e5m2": 0.5,
}
LOSSY = "lossy"
LOSSY_CACHE_REL_L2 = 0.5
ENGINE = "engine"
ENGINE_REL_L2 = 0.25
KEYS = (*DEFAULT_REL_L2, LOSSY, ENGINE)


class ToleranceError(KvlabError):
    """A --tol value that cannot be read."""


@dataclass(frozen=True)
class Tolerance:
    rel_l2: float
    basis: str  # why this value: "default for bfloat16", "--tol", ...

    def to_dict(self) -> dict:
        return {"rel_l2": self.rel_l2, "basis": self.basis}


@dataclass(frozen=True)
class ToleranceOverride:
    """What `--tol` said: one value for all, or values per precision key."""

    value: float | None = None
    per_key: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "ToleranceOverride":
        if text is None or not text.strip():
            return cls()
        text = text.strip()
        if "=" not in text:
            return cls(value=_positive(text, text))
        per_key = []
        for item in text.split(","):
            key, sep, value = (p.strip() for p in item.partition("="))
            if not sep or key not in KEYS:
                raise ToleranceError(f"--tol: {item.strip()!r} is not NUMBER or KEY=NUMBER with KEY one of {', '.join(KEYS)}")
            per_key.append((key, _positive(value, item)))
        return cls(per_key=tuple(per_key))


def tolerance_for(precisions: list[str], lossy_cache: bool, override: ToleranceOverride | None = None,
                  other_arithmetic: bool = False) -> Tolerance:
    """The rel-L2 tolerance for a comparison whose runs use `precisions` (e.g. float32, bfloat16).

    other_arithmetic: one run is an engine whose arithmetic differs from transformers' beyond the dtype.
    """
    override = override or ToleranceOverride()
    if override.value is not None:
        return Tolerance(override.value, "--tol")
    given = dict(override.per_key)
    table = {**DEFAULT_REL_L2, LOSSY: LOSSY_CACHE_REL_L2, ENGINE: ENGINE_REL_L2, **given}
    keys = [p for p in precisions if p in table] or ["float32"]
    if lossy_cache:
        keys.append(LOSSY)
    if other_arithmetic:
        keys.append(ENGINE)
    key = max(keys, key=lambda k: table[k])
    origin = "--tol" if key in given else "default"
    what = {LOSSY: "a lossy cache", ENGINE: "another engine"}.get(key, key)
    return Tolerance(table[key], f"{origin} for {what}")


def _positive(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ToleranceError(f"--tol: {item!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ToleranceError(f"--tol: {item!r} must be a positive finite number")
    return value
