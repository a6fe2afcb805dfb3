"""vLLM's legacy `kv_cache_scales.json` (pydantic `QuantParamSchema`): write, read, check.

    {"model_type": str | null,
     "kv_cache": {"dtype": "float8_e4m3fn",
                  "scaling_factor": {"<tp rank>": {"<layer>": float}}}}

vLLM swallowed every error while loading this file and ran with scale 1.0; `check` instead
lists every rule the file breaks, and `read` refuses a file that breaks any. Each problem says
whose rule it is: what vLLM's pydantic schema itself rejects (with the context vLLM always
passes: tp size, layer count, the model's type), or kvlab's stricter rules (finite positive
numeric scales, canonical integer keys, no duplicate keys), which vLLM's schema lets through.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlab.atomic import write_text_atomic
from kvlab.scales.scales import RankScales, ScalesError

DTYPE = "float8_e4m3fn"
_INT_KEY = re.compile(r"^(0|[1-9][0-9]*)$")
_LOOSE_INT_KEY = re.compile(r"^[+-]?[0-9]+$")  # what pydantic still reads as an int ("07", "+7")


@dataclass(frozen=True)
class Problem:
    """One broken rule; `vllm` is True when vLLM's schema itself rejects it, False for kvlab's own rules."""

    text: str
    vllm: bool

    def __str__(self) -> str:
        return self.text


def schema_object(ranks: RankScales, model_type: str | None) -> dict[str, Any]:
    """The schema's object, ranks and layers in order, keys as integer strings."""
    return {
        "model_type": model_type,
        "kv_cache": {
            "dtype": DTYPE,
            "scaling_factor": {
                str(rank): {str(layer): float(ranks[rank][layer]) for layer in sorted(ranks[rank])}
                for rank in sorted(ranks)
            },
        },
    }


def write(path: str | Path, ranks: RankScales, model_type: str | None) -> Path:
    """Write the file atomically after checking it against the schema."""
    data = schema_object(ranks, model_type)
    problems = check(data, expect_model_type=False)
    if problems:
        raise ScalesError(f"refusing to write invalid scales: {problems[0]}")
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    return Path(path)


def load_text(path: str | Path) -> tuple[Any, list[str]]:
    """Parse the file, keeping duplicate keys visible: (data, problems found while parsing)."""
    path = Path(path)
    if not path.is_file():
        raise ScalesError(f"scales file {path} does not exist")
    problems: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                problems.append(f"duplicate key {key!r} (JSON keeps only the last)")
            seen[key] = value
        return seen

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=pairs)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ScalesError(f"{path} is not valid JSON: {err}") from None
    return data, problems


def check(data: Any, *, tp: int | None = None, n_layers: int | None = None,
          model_type: str | None = None, expect_model_type: bool = True) -> list[str]:
    """Every broken rule, vLLM's and kvlab's, one line each (empty when the file is valid); see `problems`."""
    return [p.text for p in problems(data, tp=tp, n_layers=n_layers, model_type=model_type,
                                     expect_model_type=expect_model_type)]


def problems(data: Any, *, tp: int | None = None, n_layers: int | None = None,
             model_type: str | None = None, expect_model_type: bool = True) -> list[Problem]:
    """Every rule the file breaks, each marked vLLM's or kvlab's.

    With `tp` / `n_layers` / `model_type` (vLLM's validation context) also: exactly tp ranks
    0..tp-1, every layer 0..n_layers-1 in every rank, the same model type. vLLM and SGLang always
    pass the model's type, so a null model_type is refused unless `expect_model_type` is False.
    """
    found: list[Problem] = []

    def vllm(text: str) -> None:
        found.append(Problem(text, True))

    def kvlab(text: str) -> None:
        found.append(Problem(text, False))

    if not isinstance(data, dict):
        return [Problem(f"the top level must be a JSON object, not {_kind(data)}", True)]
    if "model_type" not in data:
        vllm("missing key 'model_type' (it is required)")
    elif data["model_type"] is None:
        if model_type is not None:
            vllm(f"model_type is null but the model is {model_type!r}")
        elif expect_model_type:
            vllm("model_type is null: vLLM and SGLang pass the model's type and reject null "
                 "(if no model type is expected, say so: --no-model-type)")
    elif not isinstance(data["model_type"], str):
        vllm(f"model_type must be a string or null, not {_kind(data['model_type'])}")
    elif model_type is not None and data["model_type"] != model_type:
        vllm(f"model_type is {data['model_type']!r} but the model is {model_type!r}")
    kv = _object(data, "kv_cache", "kv_cache", vllm)
    if kv is None:
        return found
    if "dtype" not in kv:
        vllm(f"missing key 'kv_cache.dtype' (must be {DTYPE!r})")
    elif kv["dtype"] != DTYPE:
        vllm(f"kv_cache.dtype is {kv['dtype']!r}; vLLM accepts only {DTYPE!r}")
    factors = _object(kv, "scaling_factor", "kv_cache.scaling_factor", vllm)
    if factors is None:
        return found
    if not factors:
        vllm("kv_cache.scaling_factor holds no ranks")
    ranks: dict[int, set[int]] = {}
    for rank_key, layers in factors.items():
        where = f"rank {rank_key!r}"
        if not _INT_KEY.match(str(rank_key)):
            (kvlab if _LOOSE_INT_KEY.match(str(rank_key)) else vllm)(
                f"{where}: rank keys must be integer strings like \"0\", not {rank_key!r}")
            continue
        rank = int(rank_key)
        if not isinstance(layers, dict):
            vllm(f"{where}: must map layers to scales, not {_kind(layers)}")
            continue
        seen: set[int] = set()
        for layer_key, scale in layers.items():
            at = f"rank {rank} layer {layer_key!r}"
            if not _INT_KEY.match(str(layer_key)):
                (kvlab if _LOOSE_INT_KEY.match(str(layer_key)) else vllm)(
                    f"{at}: layer keys must be integer strings like \"0\", not {layer_key!r}")
                continue
            seen.add(int(layer_key))
            _check_scale(scale, at, vllm, kvlab)
        ranks[rank] = seen
    if not ranks:
        return found
    want_tp = tp if tp is not None else max(ranks) + 1
    if tp is not None and len(factors) != tp:
        vllm(f"{len(factors)} ranks but tp is {tp}")
    missing = [r for r in range(want_tp) if r not in ranks]
    if missing:
        vllm(f"missing ranks {_span(missing)} (tp {want_tp} needs ranks 0..{want_tp - 1})")
    extra = [r for r in ranks if r >= want_tp]
    if extra and tp is not None:
        vllm(f"ranks {_span(extra)} are beyond tp {tp}")
    want_layers = n_layers if n_layers is not None else max((max(s) + 1 for s in ranks.values() if s), default=0)
    for rank in sorted(ranks):
        layers = ranks[rank]
        absent = [i for i in range(want_layers) if i not in layers]
        if absent:
            vllm(f"rank {rank}: missing layers {_span(absent)} (needs 0..{want_layers - 1})")
        beyond = sorted(i for i in layers if i >= want_layers)
        if beyond and n_layers is not None:
            vllm(f"rank {rank}: layers {_span(beyond)} are beyond the model's {n_layers} layers")
    return found


def _check_scale(scale: Any, at: str, vllm, kvlab) -> None:
    """One scale: vLLM's schema needs something pydantic reads as a float; kvlab a finite positive number."""
    if scale is None or isinstance(scale, (dict, list)):
        vllm(f"{at}: the scale must be a number, not {_kind(scale)}")
    elif isinstance(scale, str):
        try:
            float(scale)
        except ValueError:
            vllm(f"{at}: the scale must be a number, not a string")
        else:
            kvlab(f"{at}: the scale must be a number, not a string")
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        kvlab(f"{at}: the scale must be a number, not {_kind(scale)}")
    else:
        try:
            value = float(scale)
        except OverflowError:
            kvlab(f"{at}: the scale is an integer of {len(str(abs(scale)))} digits, too large for a float")
            return
        if not math.isfinite(value) or value <= 0:
            kvlab(f"{at}: the scale must be finite and positive, got {value}")


def read(path: str | Path, *, tp: int | None = None, n_layers: int | None = None,
         model_type: str | None = None) -> tuple[str | None, RankScales]:
    """(model_type, {rank: {layer: scale}}) from a file that passes `check`, else ScalesError."""
    data, problems = load_text(path)
    problems += check(data, tp=tp, n_layers=n_layers, model_type=model_type, expect_model_type=False)
    if problems:
        more = f" (and {len(problems) - 1} more; run `kvlab scales check {path}`)" if len(problems) > 1 else ""
        raise ScalesError(f"{path}: {problems[0]}{more}")
    factors = data["kv_cache"]["scaling_factor"]
    ranks = {int(r): {int(layer): float(s) for layer, s in layers.items()} for r, layers in factors.items()}
    return data["model_type"], ranks


def _object(parent: dict, key: str, where: str, report) -> dict | None:
    """`parent[key]` when it is a JSON object; otherwise None, with the problem reported."""
    value = parent.get(key)
    if value is None:
        report(f"missing key {where!r}")
    elif not isinstance(value, dict):
        report(f"{where} must be an object, not {_kind(value)}")
    else:
        return value
    return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _span(items: list[int]) -> str:
    """'3' / '3, 5' / '3..7' for short lists of integers."""
    items = sorted(items)
    if len(items) > 2 and items == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}..{items[-1]}"
    if len(items) > 8:
        return ", ".join(map(str, items[:8])) + f", ... ({len(items)} in all)"
    return ", ".join(map(str, items))
