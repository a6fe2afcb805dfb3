"""Check a trace: recompute each recorded attention in float64 and compare element-wise.

For every layer, step and query head the recorded output is compared with the float64
reference attention over the recorded q, k, v and mask: max abs error, relative L2 error
and cosine similarity, element by element. Never sums of outputs: a sum is blind to a
permuted layout and turns a tiny difference of two near-zero sums into a huge "relative
error".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvlab.attention.reference import reference_attention
from kvlab.compare.metrics import tensor_errors
from kvlab.trace.format import TensorLayout, tensor_name
from kvlab.trace.reader import TraceFile

# Default relative-L2 tolerance by the coarsest ggml type among q, k, v and out: what the
# rounding of a kernel working in that type leaves, with a wide margin.
DEFAULT_TOLERANCE = {"F64": 1e-6, "F32": 1e-4, "F16": 5e-3, "BF16": 3e-2, "Q8_0": 3e-2, "Q4_0": 0.2}
# With ggml's CPU kernel replayed (`kernel_rounding`) what is left is float32 order of operations.
REPLAYED_TOLERANCE = 1e-3
ROUNDINGS = ("auto", "ggml-cpu", "none")
_COARSEST_FIRST = ("Q4_0", "Q8_0", "BF16", "F16", "F32", "F64")


@dataclass(frozen=True)
class HeadError:
    layer: int
    step: int
    head: int
    max_abs: float
    rel_l2: float
    cosine: float

    def within(self, rel_l2: float, max_abs: float | None) -> bool:
        ok = self.rel_l2 <= rel_l2 and math.isfinite(self.cosine)  # NaN compares false: not ok
        return ok and (max_abs is None or self.max_abs <= max_abs)


@dataclass
class CheckReport:
    path: str
    tolerance: float
    max_abs_tolerance: float | None
    entries: list[HeadError] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)  # role -> ggml type seen
    rounding: str = "none"  # "ggml-cpu" when the reference replayed ggml's CPU kernel

    @property
    def failures(self) -> list[HeadError]:
        return [e for e in self.entries if not e.within(self.tolerance, self.max_abs_tolerance)]

    @property
    def ok(self) -> bool:
        return bool(self.entries) and not self.failures

    def worst(self) -> HeadError | None:
        return max(self.entries, key=lambda e: (not math.isfinite(e.rel_l2), e.rel_l2), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "path": self.path,
            "tolerance": {"rel_l2": self.tolerance, "max_abs": self.max_abs_tolerance},
            "types": self.types,
            "rounding": self.rounding,
            "entries": [_finite(asdict(e)) for e in self.entries],
        }


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: non-finite figures become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def check_trace(
    trace: TraceFile | str | os.PathLike,
    *,
    tol: float | None = None,
    max_abs: float | None = None,
    scale: float | None = None,
    layout: str | dict[str, TensorLayout] | None = None,
    deinterleave_qk: bool = False,
    rounding: str = "auto",
    on_step: Callable[[int], None] | None = None,
) -> CheckReport:
    """Recompute every (layer, step) of the trace with the float64 reference and compare per head.

    tol: relative L2 tolerance per head (default: by the coarsest stored type, see
        DEFAULT_TOLERANCE); max_abs: an optional max abs error tolerance as well.
    scale: the softmax scale when the trace does not record one (default head_dim ** -0.5).
    rounding: "ggml-cpu" replays the roundings of ggml's CPU flash-attention kernel (q converted
        to K's dot-product type, V summed in float16 for an F16 cache: `kernel_rounding`) in the
        reference, with the tight REPLAYED_TOLERANCE by default; "auto" does so for traces that
        say they come from llama.cpp (`kvlab.engine`); "none" never.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    if not isinstance(trace, TraceFile):
        trace = TraceFile(trace, layout=layout, deinterleave_qk=deinterleave_qk)
    pairs = trace.steps()
    types = _types(trace, pairs)
    replay = rounding == "ggml-cpu" or (rounding == "auto" and trace.meta.get("kvlab.engine") == "llama.cpp")
    flash = trace.layout_name != "llama.cpp-noflash"
    if tol is None and replay:
        tol = REPLAYED_TOLERANCE
    if tol is None:
        tol = next((DEFAULT_TOLERANCE[t] for t in _COARSEST_FIRST if t in types.values()), DEFAULT_TOLERANCE["F32"])
    threads = int(trace.meta.get("kvlab.engine.threads") or 1)
    report = CheckReport(path=str(trace.path), tolerance=tol, max_abs_tolerance=max_abs, types=types,
                         rounding="ggml-cpu" if replay else "none")
    for layer, step in pairs:
        att = trace.attention_step(layer, step)
        step_scale = att.scale if att.scale is not None else scale
        if replay:
            from kvlab.trace.kernel_rounding import kernel_attention

            expected = kernel_attention(att.q, att.k, att.v, att.mask, step_scale,
                                        k_type=trace.ggml_type(tensor_name(layer, step, "k")),
                                        v_type=trace.ggml_type(tensor_name(layer, step, "v")), threads=threads,
                                        flash=flash)
        else:
            expected = reference_attention(att.q, att.k, att.v, att.mask, step_scale, softcap=att.softcap)
        for head in range(att.q.shape[1]):
            errors = tensor_errors(expected[:, head], att.out[:, head])
            report.entries.append(HeadError(layer, step, head, errors.max_abs, errors.rel_l2, errors.cosine))
        if on_step is not None:
            on_step(1)
    return report


def _types(trace: TraceFile, pairs: list[tuple[int, int]]) -> dict[str, str]:
    """The ggml type of q, k, v and out (the coarsest one where steps differ)."""
    found: dict[str, str] = {}
    for layer, step in pairs:
        for role in ("q", "k", "v", "out"):
            name = tensor_name(layer, step, role)
            if not trace.has(name):
                continue
            kind = trace.ggml_type(name)
            old = found.get(role)
            if old is None or _rank(kind) < _rank(old):
                found[role] = kind
    return found


def _rank(kind: str) -> int:
    return _COARSEST_FIRST.index(kind) if kind in _COARSEST_FIRST else -1
