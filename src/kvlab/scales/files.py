"""Scales to and from files: whichever format a path holds, and every format calibrate writes."""

from __future__ import annotations

from pathlib import Path

from kvlab.scales import compressed_tensors, vllm_json
from kvlab.scales.extract import extract
from kvlab.scales.scales import KVScales, ScalesError

VLLM_FILE = "kv_cache_scales.json"
OUTPUT_FORMATS = ("vllm", "compressed-tensors", "both")


def load_scales(path: str | Path, *, n_layers: int, n_heads: int, n_kv_heads: int,
                model_type: str | None = None) -> KVScales:
    """Scales for a single-device run of a model with this geometry, from any supported path.

    - `kv_cache_scales.json` (vLLM): checked against the schema and the model's layer count;
      one scale per layer for K and V; with several ranks each KV head takes the scale of the
      ranks that hold it (per head), or the largest over the ranks (per tensor).
    - a `.safetensors` file of compressed-tensors / ModelOpt names: separate K and V scales.
    - a checkpoint folder: whatever `kvlab scales extract` reads there.
    """
    path = Path(path)
    if path.is_dir():
        found = extract(path)
        if found.scales is not None:
            return found.scales
        return KVScales.from_ranks(found.ranks, n_heads, n_kv_heads, per_head=True)
    if not path.is_file():
        raise ScalesError(f"scales file {path} does not exist")
    if path.suffix == ".json":
        _, ranks = vllm_json.read(path, n_layers=n_layers, model_type=model_type)
        scales = KVScales.from_ranks(ranks, n_heads, n_kv_heads, per_head=True)
        return KVScales(scales.keys, scales.values, "e4m3fn", {"source": str(path)})
    if path.suffix == ".safetensors":
        return compressed_tensors.read_file(path, n_layers, n_kv_heads)
    raise ScalesError(f"{path}: expected a kv_cache_scales.json, a .safetensors file of k_scale/v_scale "
                      "tensors, or a checkpoint folder")


def check_expressible(fmt: str, fp8_format: str) -> None:
    """Refuse an output format that cannot say which fp8 format the scales are for.

    vLLM's kv_cache_scales.json names float8_e4m3fn; compressed-tensors' kv_cache_scheme
    (`num_bits: 8, type: float`) stands for float8_e4m3fn too and has no way to name another.
    A reader would apply e5m2 scales (amax / 57344) as e4m3fn ones (amax / 448): 128x too small.
    """
    if fp8_format == "e4m3fn":
        return
    if fmt in ("vllm", "both"):
        raise ScalesError(f"vLLM's kv_cache_scales.json holds float8_e4m3fn scales only, not {fp8_format}")
    if fmt == "compressed-tensors":
        raise ScalesError(f"compressed-tensors' kv_cache_scheme (num_bits 8, type float) stands for float8_e4m3fn "
                          f"and cannot say {fp8_format}: a reader would take these scales as e4m3fn ones; write "
                          f"e4m3fn scales (kvlab's cache=fp8:format={fp8_format} calibrates its own)")


def export_scales(out: str | Path, scales: KVScales, *, fmt: str, tp: int, n_heads: int, n_kv_heads: int,
                  model_type: str | None, extra_meta: dict[str, str] | None = None) -> list[Path]:
    """Write `kv_cache_scales.json` (vLLM, one entry per tp rank) and/or the compressed-tensors files."""
    if fmt not in OUTPUT_FORMATS:
        raise ScalesError(f"unknown output format {fmt!r}; allowed: {', '.join(OUTPUT_FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ScalesError(f"--out {out} exists and is not a folder")
    check_expressible(fmt, scales.fp8_format)
    written: list[Path] = []
    if fmt in ("vllm", "both"):
        ranks = scales.to_ranks(tp, n_heads, n_kv_heads)
        out.mkdir(parents=True, exist_ok=True)
        written.append(vllm_json.write(out / VLLM_FILE, ranks, model_type))
    if fmt in ("compressed-tensors", "both"):
        written += compressed_tensors.write(out, scales, extra_meta)
    return written
