"""`kvlab scales export`: merge KV scales into a model folder as a checkpoint vLLM loads with fp8.

Today's vLLM reads KV scales only from compressed-tensors checkpoints (its `kv_cache_scales.json`
loader was removed after 0.6.6): tensors `model.layers.{i}.self_attn.k_scale` / `v_scale`, `(1,)`
per tensor or `(kv_heads, 1, 1)` per head, and in `config.json` a complete
`quantization_config` — `quant_method: compressed-tensors` (vLLM refuses the block without it)
and `config_groups: {}` (its per-head loader asserts without it), as llm-compressor writes.

The checkpoint is the model folder's files (weights hard-linked where the file system allows,
copied otherwise), `config.json` with that block, and the scales in their own
`kv_cache_scales.safetensors` (added to the weight index when the model has one). It is written
under a temporary name and renamed into place: never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlab.scales import compressed_tensors
from kvlab.scales.files import load_scales
from kvlab.scales.scales import KVScales, ScalesError

SCALES_FILE = compressed_tensors.TENSORS_FILE
INDEX_FILE = "model.safetensors.index.json"
GRANULARITIES = ("tensor", "head")
COMPLETE_MARKER = "kvlab-complete"  # kvlab's own note in its converted model folder, not the model's


@dataclass(frozen=True)
class ExportResult:
    path: Path
    scales: KVScales
    linked: bool  # weights hard-linked (else copied)
    quantization_config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.path), "granularity": self.scales.granularity, "n_layers": self.scales.n_layers,
                "weights_linked": self.linked, "quantization_config": self.quantization_config}


def quantization_config(granularity: str) -> dict[str, Any]:
    """The complete block vLLM needs: compressed-tensors, no weight groups, the KV cache scheme."""
    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "config_groups": {},
        "ignore": [],
        "kv_cache_scheme": compressed_tensors.kv_cache_scheme(granularity),
        "quantization_status": "frozen",
    }


def model_geometry(model_dir: Path) -> dict[str, Any]:
    """Layers, heads, KV heads and model type from a model folder's config.json."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ScalesError(f"--into {model_dir}: no config.json (expected a Hugging Face model folder)")
    config = json.loads(config_path.read_text())
    text = config.get("text_config", config)
    try:
        n_layers = int(text["num_hidden_layers"])
        n_heads = int(text["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise ScalesError(f"{config_path}: no num_hidden_layers / num_attention_heads") from None
    return {"config": config, "n_layers": n_layers, "n_heads": n_heads,
            "n_kv_heads": int(text.get("num_key_value_heads") or n_heads), "model_type": config.get("model_type")}


def export_checkpoint(scales_path: str | Path, model_dir: str | Path, out: str | Path, *,
                      granularity: str | None = None) -> ExportResult:
    """Write OUT: MODEL_DIR's files with the scales of SCALES_PATH merged as compressed-tensors.

    granularity: `tensor` folds per-head scales to their maximum per layer; `head` needs per-head
    scales; None keeps what the scales are.
    """
    model_dir, out = Path(model_dir), Path(out)
    if granularity is not None and granularity not in GRANULARITIES:
        raise ScalesError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    geometry = model_geometry(model_dir)
    config = geometry["config"]
    if "quantization_config" in config:
        raise ScalesError(f"--into {model_dir}: config.json already has a quantization_config; export merges "
                          "scales into an unquantized model folder")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ScalesError(f"--into {model_dir}: no .safetensors weights (vLLM loads compressed-tensors "
                          "checkpoints from safetensors)")
    if any(p.name == SCALES_FILE for p in weights):
        raise ScalesError(f"--into {model_dir} already holds {SCALES_FILE}")
    scales = load_scales(scales_path, n_layers=geometry["n_layers"], n_heads=geometry["n_heads"],
                         n_kv_heads=geometry["n_kv_heads"], model_type=geometry["model_type"])
    if scales.n_layers != geometry["n_layers"]:
        raise ScalesError(f"{scales_path} has scales for {scales.n_layers} layers; {model_dir} has "
                          f"{geometry['n_layers']}")
    if scales.fp8_format != "e4m3fn":
        raise ScalesError(f"vLLM's fp8 KV cache is e4m3fn; {scales_path} holds {scales.fp8_format} scales")
    granularity = granularity or scales.granularity
    if granularity == "tensor":
        scales = scales.per_tensor_scales()
    elif not scales.per_head:
        raise ScalesError(f"--granularity head needs per-head scales; {scales_path} has one per layer "
                          "(calibrate with --granularity head)")
    elif any(s.numel() != geometry["n_kv_heads"] for s in (*scales.keys, *scales.values)):
        raise ScalesError(f"{scales_path}: per-head scales must have {geometry['n_kv_heads']} entries per layer")
    if out.exists() and not (out.is_dir() and (out / "config.json").is_file()):
        raise ScalesError(f"--out {out} exists and is not a checkpoint folder kvlab would replace")
    block = quantization_config(granularity)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        linked = _copy_model(model_dir, staging)
        _write_scales(staging, scales)
        (staging / "config.json").write_text(json.dumps({**config, "quantization_config": block}, indent=2) + "\n")
        _update_index(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, scales, linked, block)


def _copy_model(model_dir: Path, target: Path) -> bool:
    """Every file of the model folder but config.json; weights hard-linked when possible."""
    linked = True
    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or path.name in ("config.json", COMPLETE_MARKER):
            continue
        if path.suffix == ".safetensors":
            try:
                os.link(path, target / path.name)
                continue
            except OSError:
                linked = False
        shutil.copy2(path, target / path.name)
    return linked


def _write_scales(target: Path, scales: KVScales) -> None:
    from safetensors.torch import save_file

    save_file(compressed_tensors.to_tensors(scales), str(target / SCALES_FILE),
              metadata={"format": "pt", compressed_tensors.FORMAT_KEY: scales.fp8_format})


def _update_index(target: Path) -> None:
    """A sharded model's index must list the scale tensors too (vLLM loads the files it names)."""
    index_path = target / INDEX_FILE
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    from safetensors import safe_open

    with safe_open(str(target / SCALES_FILE), framework="pt") as handle:
        names = list(handle.keys())  # noqa: SIM118
    index.setdefault("weight_map", {}).update({name: SCALES_FILE for name in names})
    index_path.write_text(json.dumps(index, indent=2) + "\n")
