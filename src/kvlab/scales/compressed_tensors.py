"""compressed-tensors KV scales (what llm-compressor writes and vLLM loads today).

Tensors `model.layers.{i}.self_attn.k_scale` / `v_scale`, shape `(1,)` per tensor or
`(num_kv_heads, 1, 1)` per head, plus the `kv_cache_scheme` block that goes into the
`quantization_config` of the model's `config.json`. kvlab also records the fp8 format the
scales were made for in the safetensors header (`kvlab.fp8_format`), which other readers ignore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvlab.atomic import atomic_file, write_text_atomic
from kvlab.errors import first_line
from kvlab.scales.extract import hf_kind, hf_scales
from kvlab.scales.scales import KVScales, ScalesError

TENSORS_FILE = "kv_cache_scales.safetensors"
SCHEME_FILE = "kv_cache_scheme.json"
FORMAT_KEY = "kvlab.fp8_format"


def tensor_name(layer: int, which: str) -> str:
    return f"model.layers.{layer}.self_attn.{which}_scale"


def kv_cache_scheme(granularity: str) -> dict[str, Any]:
    """The block for `config.json` -> `quantization_config.kv_cache_scheme`."""
    return {
        "num_bits": 8,
        "type": "float",
        "strategy": "attn_head" if granularity == "head" else "tensor",
        "dynamic": False,
        "symmetric": True,
    }


def to_tensors(scales: KVScales) -> dict[str, torch.Tensor]:
    """compressed-tensors names and shapes: `(1,)` per tensor, `(num_kv_heads, 1, 1)` per head."""
    out: dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(zip(scales.keys, scales.values)):
        for which, s in (("k", k), ("v", v)):
            out[tensor_name(i, which)] = (s.reshape(-1, 1, 1) if scales.per_head else s.reshape(1)).contiguous()
    return out


def write(folder: str | Path, scales: KVScales, extra_meta: dict[str, str] | None = None) -> list[Path]:
    """Write `kv_cache_scales.safetensors` and `kv_cache_scheme.json` into `folder`, atomically each."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {FORMAT_KEY: scales.fp8_format, **(extra_meta or {})}
    with atomic_file(folder / TENSORS_FILE) as handle:
        handle.write(save(to_tensors(scales), metadata=metadata))
    scheme = {"kv_cache_scheme": kv_cache_scheme(scales.granularity)}
    write_text_atomic(folder / SCHEME_FILE, json.dumps(scheme, indent=2) + "\n")
    return [folder / TENSORS_FILE, folder / SCHEME_FILE]


def read_file(path: str | Path, n_layers: int | None = None, n_kv_heads: int | None = None) -> KVScales:
    """KVScales from one safetensors file of Hugging Face KV scale tensors (any of the known names)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ScalesError(f"scales file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            entries = [(path.name, n, handle.get_tensor(n)) for n in handle.keys() if hf_kind(n)]  # noqa: SIM118
    except Exception as err:  # a truncated or foreign file
        raise ScalesError(f"cannot read {path}: {first_line(err)}") from None
    if not entries:
        raise ScalesError(f"{path} holds no KV scales (self_attn.k_scale/v_scale, self_attn.kv_scale, k_proj.output_scale, "
                          "k_proj.k_scale)")
    scales, _ = hf_scales(entries, ".", n_layers, n_kv_heads)
    fmt = metadata.get(FORMAT_KEY, "e4m3fn")
    return KVScales(scales.keys, scales.values, fmt, {"source": str(path)})
