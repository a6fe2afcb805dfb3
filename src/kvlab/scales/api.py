"""The three scales jobs, one function each: calibrate to files, extract to a file, check a file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.model_facts import LoadedModel, model_shape
from kvlab.quant.fp8 import fp8_dtype
from kvlab.scales import vllm_json
from kvlab.scales.calibrate import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, Calibration, calibrate
from kvlab.scales.engine_tp import vllm_tp_problem
from kvlab.scales.extract import FP8_FORMAT_KEY, Extracted, extract
from kvlab.scales.files import VLLM_FILE, check_expressible, export_scales
from kvlab.scales.rank_heads import heads_of_rank
from kvlab.scales.scales import KVScales, ScalesError


@dataclass
class CalibrationResult:
    calibration: Calibration
    scales: KVScales
    files: list[Path]
    tp: int
    ranks: dict[int, dict[int, float]] | None = None
    warnings: list[str] = field(default_factory=list)  # valid, but an engine would refuse it

    def to_dict(self) -> dict[str, Any]:
        """`kvlab scales calibrate --json` after the options it echoes (model, fp8 format, granularity)."""
        return {
            "tp": self.tp,
            "files": [str(p) for p in self.files],
            **self.calibration.to_dict(),
            "scales": [{"layer": i, "k_scale": k.tolist(), "v_scale": v.tolist()}
                       for i, (k, v) in enumerate(zip(self.scales.keys, self.scales.values))],
            "rank_scales": self.ranks,
            "warnings": self.warnings,
        }


def calibrate_to_files(loaded: "LoadedModel", out: str | Path, *, data: str | Path | None = None,
                       samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, granularity: str = "tensor",
                       fp8_format: str = "e4m3fn", tp: int = 1, fmt: str = "both", chat: bool | None = None,
                       on_sample: Callable[[int], None] | None = None) -> CalibrationResult:
    """Calibrate `loaded` and write its scales to `out` in the chosen format(s)."""
    fp8_dtype(fp8_format)
    check_expressible(fmt, fp8_format)
    if tp < 1:
        raise ScalesError(f"--tp must be a positive integer, got {tp}")
    shape = model_shape(loaded.config)
    heads_of_rank(tp, shape["n_heads"], shape["n_kv_heads"])  # the geometry must split before any work
    warnings = []
    problem = vllm_tp_problem(tp, shape["n_heads"], shape["n_kv_heads"]) if fmt in ("vllm", "both") else None
    if problem is not None:
        warnings.append(f"kv_cache_scales.json for tp {tp}, but {problem}")
    calibration = calibrate(loaded, data, samples, seq_len, chat, on_sample)
    scales = calibration.scales(granularity, fp8_format)
    meta = {"kvlab.model": loaded.spec, "kvlab.fingerprint": loaded.fingerprint,
            "kvlab.dtype": str(loaded.model.dtype).removeprefix("torch."),
            "kvlab.calibration": f"{calibration.n_samples} samples, {calibration.n_tokens} tokens of {calibration.source}"}
    files = export_scales(out, scales, fmt=fmt, tp=tp, n_heads=shape["n_heads"], n_kv_heads=shape["n_kv_heads"],
                          model_type=shape["family"], extra_meta=meta)
    ranks = scales.to_ranks(tp, shape["n_heads"], shape["n_kv_heads"]) if fmt in ("vllm", "both") else None
    return CalibrationResult(calibration, scales, files, tp, ranks, warnings)


def extract_to_file(checkpoint: str | Path, out: str | Path | None = None, *, tp_size: int | None = None,
                    load_format: str = "auto", model_type: str | None = None) -> tuple[Extracted, Path]:
    """Extract a checkpoint's scales and write them as `kv_cache_scales.json` (default: in the checkpoint)."""
    found = extract(checkpoint, tp_size, load_format, model_type)
    if found.scales is not None and found.scales.fp8_format != "e4m3fn":
        raise ScalesError(f"{checkpoint} holds {found.scales.fp8_format} scales (its {FP8_FORMAT_KEY} header says "
                          f"so); vLLM's kv_cache_scales.json holds float8_e4m3fn scales only")
    path = Path(out) if out is not None else Path(checkpoint) / VLLM_FILE
    vllm_json.write(path, found.ranks, found.model_type)
    return found, path


@dataclass
class CheckResult:
    path: Path
    violations: list[str]  # every broken rule: vLLM's schema's first, then kvlab's
    context: dict[str, Any] = field(default_factory=dict)
    vllm_violations: list[str] = field(default_factory=list)  # what vLLM's schema itself rejects
    kvlab_violations: list[str] = field(default_factory=list)  # kvlab's stricter rules

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        """`kvlab scales check --json` after the file name as given."""
        return {"ok": self.ok, "context": self.context, "violations": self.violations,
                "vllm_violations": self.vllm_violations, "kvlab_violations": self.kvlab_violations}


def check_file(path: str | Path, *, tp: int | None = None, n_layers: int | None = None,
               model_type: str | None = None, expect_model_type: bool = True,
               model: str | None = None) -> CheckResult:
    """Every rule a `kv_cache_scales.json` breaks (with the given context), vLLM's schema's and kvlab's.

    `model` (a model spec, in place of `n_layers`) gives the layer count, the model type unless one is
    given or none is expected, and the head counts, for kvlab's rule that vLLM can run it at the file's tp.
    """
    n_heads = n_kv_heads = None
    if model is not None:
        from kvlab.models import load_model

        config = load_model(model).config
        shape = model_shape(config)
        n_layers, n_heads, n_kv_heads = shape["n_layers"], shape["n_heads"], shape["n_kv_heads"]
        if expect_model_type:
            model_type = model_type or config.model_type
    data, duplicates = vllm_json.load_text(path)
    found = vllm_json.problems(data, tp=tp, n_layers=n_layers, model_type=model_type,
                               expect_model_type=expect_model_type)
    found += [vllm_json.Problem(text, False) for text in duplicates]
    if n_heads is not None and n_kv_heads is not None:
        file_tp = tp if tp is not None else _rank_count(data)
        problem = vllm_tp_problem(file_tp, n_heads, n_kv_heads) if file_tp else None
        if problem is not None:
            found.append(vllm_json.Problem(f"scales for tp {file_tp}, but {problem}", False))
    schema = [p.text for p in found if p.vllm]
    own = [p.text for p in found if not p.vllm]
    context = {k: v for k, v in (("tp", tp), ("n_layers", n_layers), ("model_type", model_type)) if v is not None}
    if not expect_model_type:
        context["model_type_expected"] = False
    return CheckResult(Path(path), schema + own, context, schema, own)


def _rank_count(data: Any) -> int | None:
    try:
        return len(data["kv_cache"]["scaling_factor"]) or None
    except (KeyError, TypeError):
        return None
