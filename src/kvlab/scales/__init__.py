"""FP8 KV-cache scales: calibrate them on a model, extract them from checkpoints, write and check files.

`KVScales` holds one K and one V scale per layer (per tensor or per KV head); every file format
converts to and from it. The three jobs of `kvlab scales`, one function each:
`calibrate_to_files(loaded, out)` writes vLLM's `kv_cache_scales.json` and/or compressed-tensors
files, `extract_to_file(checkpoint)` reads a quantized checkpoint's scales, `check_file(path)`
lists every rule a `kv_cache_scales.json` breaks. `load_scales(path, ...)` reads any of them for
a run; `export_checkpoint(scales_path, model_dir, out)` merges scales into a model folder vLLM
loads. `kvlab.scales.vllm_verify` runs vLLM, so it is imported from there. The number formats
themselves (fp8, integer, ggml blocks) are `kvlab.quant`.
"""

from kvlab.scales.api import CalibrationResult, CheckResult, calibrate_to_files, check_file, extract_to_file
from kvlab.scales.calibrate import Calibration
from kvlab.scales.extract import Extracted
from kvlab.scales.files import export_scales, load_scales
from kvlab.scales.scales import KVScales, RankScales, ScalesError
from kvlab.scales.vllm_export import ExportResult, export_checkpoint

__all__ = [
    "Calibration", "CalibrationResult", "CheckResult", "ExportResult", "Extracted", "KVScales", "RankScales",
    "ScalesError", "calibrate_to_files", "check_file", "export_checkpoint", "export_scales", "extract_to_file",
    "load_scales",
]
