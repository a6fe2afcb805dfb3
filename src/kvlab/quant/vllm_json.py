"""vLLM's legacy `kv_cache_scales.json` (pydantic `QuantParamSchema`): write, read, check.

    {"model_type": str | null,
     "kv_cache": {"dtype": "float8_e4m3fn",
                  "scaling_factor": {"<tp rank>": {"<layer>": float}}}}

vLLM swallowed every error while loading this file and ran with scale 1.0; `check` instead
lists every rule the file breaks, and `read` refuses a file that breaks any.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from kvlab.quant.scales import RankScales, ScalesError

DTYPE = "float8_e4m3fn"
_INT_KEY = re.compile(r"^(0|[1-9][0-9]*)$")


def to_json(ranks: RankScales, model_type: str | None) -> dict[str, Any]:
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
    from kvlab.atomic import write_text_atomic

    data = to_json(ranks, model_type)
    problems = check(data)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScalesError(f"{path} is not valid JSON: {err}") from None
    return data, problems


def check(data: Any, *, tp: int | None = None, n_layers: int | None = None,
          model_type: str | None = None) -> list[str]:
    """Every violation of vLLM's schema, one line each (empty when the file is valid).

    With `tp` / `n_layers` / `model_type` (vLLM's validation context) also: exactly tp ranks
    0..tp-1, every layer 0..n_layers-1 in every rank, the same model type.
    """
    problems: list[str] = []
    if not isinstance(data, dict):
        return [f"the top level must be a JSON object, not {_kind(data)}"]
    if "model_type" not in data:
        problems.append("missing key 'model_type' (it is required; it may be null)")
    elif data["model_type"] is not None and not isinstance(data["model_type"], str):
        problems.append(f"model_type must be a string or null, not {_kind(data['model_type'])}")
    elif model_type is not None and data["model_type"] != model_type:
        problems.append(f"model_type is {data['model_type']!r} but the model is {model_type!r}")
    kv = _object(data, "kv_cache", "kv_cache", problems)
    if kv is None:
        return problems
    if "dtype" not in kv:
        problems.append(f"missing key 'kv_cache.dtype' (must be {DTYPE!r})")
    elif kv["dtype"] != DTYPE:
        problems.append(f"kv_cache.dtype is {kv['dtype']!r}; vLLM accepts only {DTYPE!r}")
    factors = _object(kv, "scaling_factor", "kv_cache.scaling_factor", problems)
    if factors is None:
        return problems
    if not factors:
        problems.append("kv_cache.scaling_factor holds no ranks")
    ranks: dict[int, set[int]] = {}
    for rank_key, layers in factors.items():
        where = f"rank {rank_key!r}"
        if not _INT_KEY.match(str(rank_key)):
            problems.append(f"{where}: rank keys must be integer strings like \"0\", not {rank_key!r}")
            continue
        rank = int(rank_key)
        if not isinstance(layers, dict):
            problems.append(f"{where}: must map layers to scales, not {_kind(layers)}")
            continue
        seen: set[int] = set()
        for layer_key, scale in layers.items():
            at = f"rank {rank} layer {layer_key!r}"
            if not _INT_KEY.match(str(layer_key)):
                problems.append(f"{at}: layer keys must be integer strings like \"0\", not {layer_key!r}")
                continue
            seen.add(int(layer_key))
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                problems.append(f"{at}: the scale must be a number, not {_kind(scale)}")
            elif not math.isfinite(scale) or scale <= 0:
                problems.append(f"{at}: the scale must be finite and positive, got {scale}")
        ranks[rank] = seen
    if not ranks:
        return problems
    want_tp = tp if tp is not None else max(ranks) + 1
    if tp is not None and len(factors) != tp:
        problems.append(f"{len(factors)} ranks but tp is {tp}")
    missing = [r for r in range(want_tp) if r not in ranks]
    if missing:
        problems.append(f"missing ranks {_span(missing)} (tp {want_tp} needs ranks 0..{want_tp - 1})")
    extra = [r for r in ranks if r >= want_tp]
    if extra and tp is not None:
        problems.append(f"ranks {_span(extra)} are beyond tp {tp}")
    want_layers = n_layers if n_layers is not None else max((max(s) + 1 for s in ranks.values() if s), default=0)
    for rank in sorted(ranks):
        layers = ranks[rank]
        absent = [i for i in range(want_layers) if i not in layers]
        if absent:
            problems.append(f"rank {rank}: missing layers {_span(absent)} (needs 0..{want_layers - 1})")
        beyond = sorted(i for i in layers if i >= want_layers)
        if beyond and n_layers is not None:
            problems.append(f"rank {rank}: layers {_span(beyond)} are beyond the model's {n_layers} layers")
    return problems


def read(path: str | Path, *, tp: int | None = None, n_layers: int | None = None,
         model_type: str | None = None) -> tuple[str | None, RankScales]:
    """(model_type, {rank: {layer: scale}}) from a file that passes `check`, else ScalesError."""
    data, problems = load_text(path)
    problems += check(data, tp=tp, n_layers=n_layers, model_type=model_type)
    if problems:
        more = f" (and {len(problems) - 1} more; run `kvlab scales check {path}`)" if len(problems) > 1 else ""
        raise ScalesError(f"{path}: {problems[0]}{more}")
    factors = data["kv_cache"]["scaling_factor"]
    ranks = {int(r): {int(layer): float(s) for layer, s in layers.items()} for r, layers in factors.items()}
    return data["model_type"], ranks


def _object(parent: dict, key: str, where: str, problems: list[str]) -> dict | None:
    """`parent[key]` when it is a JSON object; otherwise None, with the problem recorded."""
    value = parent.get(key)
    if value is None:
        problems.append(f"missing key {where!r}")
    elif not isinstance(value, dict):
        problems.append(f"{where} must be an object, not {_kind(value)}")
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
