"""The three scales jobs, one function each: calibrate to files, extract to a file, check a file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlab.quant import vllm_json
from kvlab.quant.calibrate import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, Calibration, calibrate
from kvlab.quant.extract import Extracted, extract
from kvlab.quant.files import VLLM_FILE, export_scales
from kvlab.quant.scales import KVScales, ScalesError

if TYPE_CHECKING:
    from kvlab.models import LoadedModel


@dataclass
class CalibrationResult:
    calibration: Calibration
    scales: KVScales
    files: list[Path]
    tp: int
    ranks: dict[int, dict[int, float]] | None = None


def calibrate_to_files(loaded: "LoadedModel", out: str | Path, *, data: str | Path | None = None,
                       samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, granularity: str = "tensor",
                       fp8_format: str = "e4m3fn", tp: int = 1, fmt: str = "both", chat: bool | None = None,
                       on_sample: Callable[[int], None] | None = None) -> CalibrationResult:
    """Calibrate `loaded` and write its scales to `out` in the chosen format(s)."""
    from kvlab.models import model_shape
    from kvlab.quant.fp8 import fp8_dtype
    from kvlab.quant.rank_heads import heads_of_rank

    fp8_dtype(fp8_format)
    if fmt in ("vllm", "both") and fp8_format != "e4m3fn":
        raise ScalesError(f"vLLM's kv_cache_scales.json holds float8_e4m3fn scales only, not {fp8_format}; "
                          "use --format compressed-tensors")
    if tp < 1:
        raise ScalesError(f"--tp must be a positive integer, got {tp}")
    shape = model_shape(loaded.config)
    heads_of_rank(tp, shape["n_heads"], shape["n_kv_heads"])  # the geometry must split before any work
    calibration = calibrate(loaded, data, samples, seq_len, chat, on_sample)
    scales = calibration.scales(granularity, fp8_format)
    meta = {"kvlab.model": loaded.spec, "kvlab.fingerprint": loaded.fingerprint,
            "kvlab.dtype": str(loaded.model.dtype).removeprefix("torch."),
            "kvlab.calibration": f"{calibration.n_samples} samples, {calibration.n_tokens} tokens of {calibration.source}"}
    files = export_scales(out, scales, fmt=fmt, tp=tp, n_heads=shape["n_heads"], n_kv_heads=shape["n_kv_heads"],
                          model_type=shape["family"], extra_meta=meta)
    ranks = scales.to_ranks(tp, shape["n_heads"], shape["n_kv_heads"]) if fmt in ("vllm", "both") else None
    return CalibrationResult(calibration, scales, files, tp, ranks)


def extract_to_file(checkpoint: str | Path, out: str | Path | None = None, *, tp_size: int | None = None,
                    load_format: str = "auto") -> tuple[Extracted, Path]:
    """Extract a checkpoint's scales and write them as `kv_cache_scales.json` (default: in the checkpoint)."""
    found = extract(checkpoint, tp_size, load_format)
    path = Path(out) if out is not None else Path(checkpoint) / VLLM_FILE
    vllm_json.write(path, found.ranks, found.model_type)
    return found, path


@dataclass
class CheckResult:
    path: Path
    violations: list[str]
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


def check_file(path: str | Path, *, tp: int | None = None, n_layers: int | None = None,
               model_type: str | None = None) -> CheckResult:
    """Every violation of vLLM's schema in a `kv_cache_scales.json` (with the given context)."""
    data, problems = vllm_json.load_text(path)
    problems += vllm_json.check(data, tp=tp, n_layers=n_layers, model_type=model_type)
    context = {k: v for k, v in (("tp", tp), ("n_layers", n_layers), ("model_type", model_type)) if v is not None}
    return CheckResult(Path(path), problems, context)
