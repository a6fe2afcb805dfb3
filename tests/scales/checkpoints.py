"""Synthetic quantized checkpoints, written the way their tools lay them out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def ammo_scale(rank: int, layer: int) -> float:
    """A distinct, float32-exact scale per (rank, layer)."""
    return float(torch.tensor(0.0123 * (rank + 1) + 0.00071 * layer, dtype=torch.float32))


def write_ammo(folder: Path, tp: int, n_layers: int = 3, fmt: str = "safetensors", name: str = "rank{r}",
               ranks=None, json_tp: int | None = -1, decoder_type: str = "llama", scale=ammo_scale,
               extra: dict | None = None) -> Path:
    """A TensorRT-LLM/AMMO export: a JSON config plus one tensor file per rank."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"layers": [{"decoder_type": decoder_type}], "dtype": "float16"}
    if json_tp is not None:
        config["tensor_parallel"] = tp if json_tp == -1 else json_tp
    (folder / "config.json").write_text(json.dumps(config))
    for r in (range(tp) if ranks is None else ranks):
        tensors = {}
        for i in range(n_layers):
            tensors[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"] = torch.tensor([scale(r, i)])
            tensors[f"transformer.layers.{i}.attention.qkv.weight"] = torch.randn(4, 4)
        tensors.update(extra or {})
        stem = name.format(r=r, tp=tp)
        if fmt == "safetensors":
            save_file(tensors, str(folder / f"{stem}.safetensors"))
        elif fmt == "npz":
            np.savez(folder / f"{stem}.npz", **{k.replace(".", ":"): v.numpy() for k, v in tensors.items()})
        else:
            torch.save(tensors, folder / f"{stem}.pt")
    return folder


HF_NAMES = {
    "compressed-tensors": ("model.layers.{i}.self_attn.k_scale", "model.layers.{i}.self_attn.v_scale"),
    "output_scale": ("model.layers.{i}.self_attn.k_proj.output_scale", "model.layers.{i}.self_attn.v_proj.output_scale"),
    "modelopt": ("model.layers.{i}.self_attn.k_proj.k_scale", "model.layers.{i}.self_attn.v_proj.v_scale"),
}


def hf_scales(n_layers: int, n_kv: int, per_head: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Distinct K and V scales per layer (and head), K larger on even heads, V on odd ones."""
    keys, values = [], []
    for i in range(n_layers):
        heads = torch.arange(n_kv, dtype=torch.float32)
        k = 0.02 + 0.001 * i + 0.004 * (heads % 2 == 0) + 0.0001 * heads
        v = 0.02 + 0.001 * i + 0.004 * (heads % 2 == 1) + 0.0002 * heads
        if not per_head:
            k, v = k[:1] + 0.5 * (i % 2), v[:1]
        keys.append(k)
        values.append(v)
    return keys, values


def write_hf(folder: Path, naming: str = "compressed-tensors", n_layers: int = 3, n_heads: int = 8, n_kv: int = 4,
             per_head: bool = False, shards: int = 2, config: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A Hugging Face checkpoint whose scales are spread over `shards` safetensors files."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, values = hf_scales(n_layers, n_kv, per_head)
    k_name, v_name = HF_NAMES[naming]
    files: list[dict] = [{} for _ in range(shards)]
    for i in range(n_layers):
        shape = (n_kv, 1, 1) if per_head else (1,)
        target = files[i % shards]
        target[k_name.format(i=i)] = keys[i].reshape(shape)
        target[v_name.format(i=i)] = values[i].reshape(shape)
        target[f"model.layers.{i}.self_attn.k_proj.weight"] = torch.randn(n_kv * 2, 8)
    for s, tensors in enumerate(files):
        save_file(tensors, str(folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    if config:
        (folder / "config.json").write_text(json.dumps({
            "model_type": "llama", "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "quantization_config": {"kv_cache_scheme": {"num_bits": 8, "type": "float", "dynamic": False,
                                                        "strategy": "attn_head" if per_head else "tensor"}},
        }))
    return keys, values
