"""Read KV cache scales out of quantized checkpoints.

Two families:

- TensorRT-LLM / AMMO per-rank checkpoints (what vLLM's ROCm `extract_scales.py` read): one
  tensor file per tensor-parallel rank, the rank being the digits after "rank" in the file's
  own name (never its folder's); scalar tensors whose name contains `kv_cache_scaling_factor`;
  the layer is the single all-digit component of the name (`.`-delimited, `:` in npz files);
  model type and tp size from the JSON beside them (`layers[0].decoder_type`,
  `tensor_parallel`, or TensorRT-LLM's `mapping.tp_size`).
- Hugging Face checkpoints: compressed-tensors `self_attn.k_scale` / `v_scale` (shape `(1,)` or
  `(num_kv_heads, 1, 1)`), the older `k_proj.output_scale` / `v_proj.output_scale`, ModelOpt's
  `k_proj.k_scale` / `v_proj.v_scale`, and the older single `self_attn.kv_scale` that serves both
  K and V (what vLLM and TGI read from early FP8 checkpoints); global (not per rank).

The scales are FP8 scales for float8_e4m3fn unless the checkpoint says otherwise: a
`kv_cache_scheme` (config.json's `quantization_config`, or kvlab's `kv_cache_scheme.json`) that
is not 8-bit float is refused (an INT8 KV cache's scales are integer steps, not FP8 scales), and
a `kvlab.fp8_format` entry in a safetensors header (files kvlab wrote for e5m2 or e4m3fnuz)
labels the scales with that format.

Anything ambiguous or incomplete is a ScalesError naming the file, rank or layer. Things that
are valid but that an engine would refuse (no model type; a tp vLLM cannot run the model at)
are warnings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import first_line
from kvlab.quant.fp8 import FORMATS, fp8_max
from kvlab.scales.engine_tp import vllm_tp_problem
from kvlab.scales.scales import KVScales, RankScales, ScalesError

LOAD_FORMATS = ("auto", "safetensors", "npz", "pt")
_EXTENSIONS = {"safetensors": (".safetensors",), "npz": (".npz",), "pt": (".pt", ".bin")}
_SKIP = {"training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}
AMMO_MARK = "kv_cache_scaling_factor"
_RANK = re.compile(r"rank(\d+)")
# Longest suffix first: `k_proj.k_scale` (ModelOpt) also ends in `.k_scale`.
_HF_NAMES: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"(^|\.)k_proj\.output_scale$"), "k", "compressed-tensors (output_scale)"),
    (re.compile(r"(^|\.)v_proj\.output_scale$"), "v", "compressed-tensors (output_scale)"),
    (re.compile(r"(^|\.)k_proj\.k_scale$"), "k", "modelopt"),
    (re.compile(r"(^|\.)v_proj\.v_scale$"), "v", "modelopt"),
    (re.compile(r"(^|\.)k_scale$"), "k", "compressed-tensors"),
    (re.compile(r"(^|\.)v_scale$"), "v", "compressed-tensors"),
    (re.compile(r"(^|\.)kv_scale$"), "kv", "kv_scale (one scale for K and V)"),
]
FP8_FORMAT_KEY = "kvlab.fp8_format"  # safetensors header entry of the files kvlab writes


@dataclass
class Extracted:
    """What a checkpoint holds, in vLLM's form and, for Hugging Face checkpoints, per K/V."""

    kind: str
    model_type: str | None
    ranks: RankScales
    scales: KVScales | None
    files: list[Path]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # valid, but an engine would refuse it

    @property
    def tp(self) -> int:
        return len(self.ranks)

    @property
    def n_layers(self) -> int:
        return len(self.ranks[0])

    def to_dict(self, out: str | Path | None = None) -> dict[str, Any]:
        """What the checkpoint holds; `out`: the kv_cache_scales.json it was written to."""
        return {"kind": self.kind, "model_type": self.model_type, "tp": self.tp, "n_layers": self.n_layers,
                "files": [str(p) for p in self.files], "out": None if out is None else str(out),
                "scaling_factor": self.ranks, "notes": self.notes, "warnings": self.warnings}


# ---- files -----------------------------------------------------------------------------
def tensor_files(folder: Path, load_format: str = "auto") -> tuple[list[Path], str]:
    """The tensor files to read and their format; auto prefers safetensors, then npz, then pt/bin."""
    if load_format not in LOAD_FORMATS:
        raise ScalesError(f"unknown load format {load_format!r}; allowed: {', '.join(LOAD_FORMATS)}")
    order = ("safetensors", "npz", "pt") if load_format == "auto" else (load_format,)
    for fmt in order:
        files = sorted(
            p for p in folder.iterdir()
            if p.is_file() and p.name.endswith(_EXTENSIONS[fmt]) and p.name not in _SKIP
        )
        if files:
            return files, fmt
    wanted = ", ".join(ext for fmt in order for ext in _EXTENSIONS[fmt])
    raise ScalesError(f"no tensor files ({wanted}) in {folder}")


def named_tensors(path: Path, fmt: str, wanted) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` for the names `wanted(name)` accepts, loading only those where the format allows."""
    try:
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    if wanted(name):
                        yield name, handle.get_tensor(name)
        elif fmt == "npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                for name in data.files:
                    if wanted(name):
                        yield name, torch.from_numpy(np.array(data[name]))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ScalesError(f"{path.name}: expected a dict of named tensors, found {type(state).__name__}")
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and wanted(str(name)):
                    yield str(name), value
    except ScalesError:
        raise
    except Exception as err:  # a truncated or foreign file: say which, in one line
        raise ScalesError(f"cannot read {path}: {first_line(err)}") from None


def layer_of(name: str, delimiter: str) -> int:
    """The layer index: the single all-digit component of a tensor name."""
    numbers = [part for part in name.split(delimiter) if part.isdecimal()]
    if len(numbers) != 1:
        raise ScalesError(f"cannot tell the layer of tensor {name!r}: it needs exactly one numeric component")
    return int(numbers[0])


def rank_of(path: Path, n_files: int) -> int:
    """The digits after "rank" in the file's own name; a lone file without them is rank 0."""
    match = _RANK.search(path.name)
    if match:
        return int(match.group(1))
    if n_files == 1:
        return 0
    raise ScalesError(f"cannot tell the tensor-parallel rank of {path.name}: its name has no 'rank<N>'")


def hf_kind(name: str) -> tuple[str, str] | None:
    """('k' | 'v' | 'kv', naming family) for a Hugging Face KV scale name, else None."""
    for pattern, which, family in _HF_NAMES:
        if pattern.search(name):
            return which, family
    return None


# ---- metadata --------------------------------------------------------------------------
def folder_metadata(folder: Path) -> dict[str, Any]:
    """model_type, tp size and attention geometry from the JSON files of a checkpoint folder."""
    found: dict[str, tuple[Any, str]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        for key, value in _metadata_of(data).items():
            if value is None:
                continue
            if key in found and found[key][0] != value:
                raise ScalesError(f"{folder}: {found[key][1]} says {key} = {found[key][0]!r} "
                                  f"but {path.name} says {value!r}")
            found.setdefault(key, (value, path.name))
    return {key: value for key, (value, _) in found.items()}


def _metadata_of(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    quant = data.get("quantization_config")
    scheme = quant.get("kv_cache_scheme") if isinstance(quant, dict) else data.get("kv_cache_scheme")
    if isinstance(scheme, dict):  # only what tells the number format apart
        out["kv_cache_scheme"] = {"type": scheme.get("type"), "num_bits": scheme.get("num_bits")}
    layers = data.get("layers")
    if isinstance(layers, list) and layers and isinstance(layers[0], dict):
        out["model_type"] = layers[0].get("decoder_type")
    elif isinstance(data.get("model_type"), str):
        out["model_type"] = data["model_type"]
    tp = data.get("tensor_parallel")
    mapping = data.get("mapping")
    if tp is None and isinstance(mapping, dict):
        tp = mapping.get("tp_size")
    if tp is not None:
        try:
            out["tp_size"] = int(tp)
        except (TypeError, ValueError):
            raise ScalesError(f"the checkpoint's tp size {tp!r} is not an integer") from None
    for key, names in (("n_layers", ("num_hidden_layers", "num_layers")),
                       ("n_heads", ("num_attention_heads",)),
                       ("n_kv_heads", ("num_key_value_heads", "num_kv_heads"))):
        for name in names:
            if isinstance(data.get(name), int):
                out[key] = data[name]
                break
    return out


# ---- extraction ------------------------------------------------------------------------
def extract(folder: str | Path, tp_size: int | None = None, load_format: str = "auto",
            model_type: str | None = None) -> Extracted:
    """All KV scales of a checkpoint folder, checked, in vLLM's per-(rank, layer) form.

    `model_type` names the model when the checkpoint does not (and must agree when it does).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ScalesError(f"checkpoint folder {folder} does not exist")
    if tp_size is not None and tp_size < 1:
        raise ScalesError(f"--tp-size must be a positive integer, got {tp_size}")
    files, fmt = tensor_files(folder, load_format)
    meta = folder_metadata(folder)
    check_scheme(meta.get("kv_cache_scheme"), folder)
    delimiter = ":" if fmt == "npz" else "."

    ammo: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    hf: list[tuple[Path, str, torch.Tensor]] = []
    for path in files:
        ammo[path] = []
        for name, tensor in named_tensors(path, fmt, lambda n: AMMO_MARK in n or hf_kind(n) is not None):
            if AMMO_MARK in name:
                ammo[path].append((name, tensor))
            else:
                hf.append((path, name, tensor))
    n_ammo = sum(len(v) for v in ammo.values())
    if n_ammo and hf:
        raise ScalesError(f"{folder} mixes AMMO {AMMO_MARK} tensors with Hugging Face k_scale/v_scale tensors")
    if not n_ammo and not hf:
        raise ScalesError(f"no KV cache scales in {folder} ({len(files)} {fmt} file(s); looked for {AMMO_MARK}, "
                          "self_attn.k_scale/v_scale, self_attn.kv_scale, k_proj.output_scale, k_proj.k_scale)")
    if n_ammo:
        found = _from_ammo(folder, ammo, delimiter, meta, tp_size, fmt)
    else:
        found = _from_hf(folder, hf, delimiter, meta, tp_size)
    if model_type is not None:
        if found.model_type is not None and found.model_type != model_type:
            raise ScalesError(f"--model-type {model_type} but the checkpoint says model type {found.model_type!r}")
        found.model_type = model_type
    found.warnings += engine_warnings(found.model_type, found.tp, meta.get("n_heads"), meta.get("n_kv_heads"))
    return found


def check_scheme(scheme: dict[str, Any] | None, where: Path | str) -> None:
    """Refuse a `kv_cache_scheme` whose scales are not FP8 scales (an INT8 KV cache's are integer steps)."""
    if scheme is None:
        return
    kind, bits = scheme.get("type"), scheme.get("num_bits")
    if kind == "float" and bits == 8:
        return
    if kind == "int":
        raise ScalesError(f"{where}: kv_cache_scheme says a {bits}-bit integer KV cache (type int): its k/v scales "
                          "are integer quantization steps, not FP8 scales; kvlab extracts FP8 KV scales only")
    raise ScalesError(f"{where}: kv_cache_scheme says type {kind!r}, num_bits {bits!r}; kvlab extracts FP8 KV "
                      "scales only (type float, num_bits 8)")


def engine_warnings(model_type: str | None, tp: int, n_heads: int | None, n_kv_heads: int | None) -> list[str]:
    """What an engine loading a kv_cache_scales.json with this model type and tp would refuse."""
    out = []
    if model_type is None:
        out.append("the checkpoint names no model type (config.json model_type, AMMO decoder_type): the file gets "
                   "model_type null, which vLLM and SGLang reject (they pass the model's type); give --model-type")
    if n_heads is not None and n_kv_heads is not None:
        problem = vllm_tp_problem(tp, n_heads, n_kv_heads)
        if problem is not None:
            out.append(f"scales for tp {tp}, but {problem}")
    return out


def header_fp8_format(path: Path) -> str | None:
    """The fp8 format a safetensors file's header names (`kvlab.fp8_format`), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            fmt = (handle.metadata() or {}).get(FP8_FORMAT_KEY)
    except Exception as err:  # a truncated or foreign file
        raise ScalesError(f"cannot read {path}: {first_line(err)}") from None
    if fmt is not None and fmt not in FORMATS:
        raise ScalesError(f"{path.name}: its header names fp8 format {fmt!r}; known: {', '.join(FORMATS)}")
    return fmt


def _from_ammo(folder: Path, per_file: dict[Path, list[tuple[str, torch.Tensor]]], delimiter: str,
               meta: dict[str, Any], tp_size: int | None, fmt: str) -> Extracted:
    meta_tp = meta.get("tp_size")
    if tp_size is not None and meta_tp is not None and tp_size != meta_tp:
        raise ScalesError(f"--tp-size {tp_size} but the checkpoint's JSON says tp size {meta_tp}")
    ranks: dict[int, dict[int, float]] = {}
    rank_file: dict[int, Path] = {}
    for path, tensors in per_file.items():
        rank = rank_of(path, len(per_file))
        if rank in rank_file:
            raise ScalesError(f"{path.name} and {rank_file[rank].name} are both tensor-parallel rank {rank}")
        rank_file[rank] = path
        if not tensors:
            raise ScalesError(f"{path.name} (rank {rank}) holds no {AMMO_MARK} tensors")
        layers: dict[int, float] = {}
        for name, tensor in tensors:
            layer = layer_of(name, delimiter)
            if layer in layers:
                raise ScalesError(f"{path.name}: two scales for layer {layer} (second: {name!r})")
            if tensor.numel() != 1:
                raise ScalesError(f"{path.name}: {name!r} has shape {tuple(tensor.shape)}; "
                                  "AMMO KV scales must be scalars")
            layers[layer] = float(tensor.reshape(()).float())
        ranks[rank] = layers
    expected = tp_size or meta_tp or max(ranks) + 1
    beyond = sorted(r for r in ranks if r >= expected)
    if beyond:
        raise ScalesError(f"tp size is {expected} but found files for rank(s) {', '.join(map(str, beyond))}")
    missing = [r for r in range(expected) if r not in ranks]
    if missing:
        raise ScalesError(f"tp size is {expected} but no file for rank(s) {', '.join(map(str, missing))} in {folder}")
    _check_layer_sets(ranks, meta.get("n_layers"))
    return Extracted("ammo", meta.get("model_type"), ranks, None, [rank_file[r] for r in sorted(rank_file)])


def _check_layer_sets(ranks: dict[int, dict[int, float]], n_layers: int | None) -> None:
    want = n_layers if n_layers is not None else max(max(layers) for layers in ranks.values()) + 1
    for rank in sorted(ranks):
        missing = [i for i in range(want) if i not in ranks[rank]]
        if missing:
            raise ScalesError(f"rank {rank} has no scale for layer(s) {', '.join(map(str, missing[:8]))} "
                              f"(expected layers 0..{want - 1})")
        extra = [i for i in ranks[rank] if i >= want]
        if extra:
            raise ScalesError(f"rank {rank} has scales for layer(s) {', '.join(map(str, extra))} "
                              f"beyond the model's {want} layers")


def hf_scales(entries: list[tuple[str, str, torch.Tensor]], delimiter: str = ".",
              n_layers: int | None = None, n_kv_heads: int | None = None,
              fp8_format: str = "e4m3fn") -> tuple[KVScales, str]:
    """KVScales from `(where, name, tensor)` Hugging Face scale tensors, and their naming family.

    A `kv_scale` serves both K and V.
    """
    found: dict[tuple[int, str], tuple[str, torch.Tensor]] = {}
    families: set[str] = set()
    for where, name, tensor in entries:
        kind, family = hf_kind(name)
        families.add(family)
        layer = layer_of(name, delimiter)
        vector = _scale_vector(tensor, f"{where}:{name}", n_kv_heads)
        for which in ("k", "v") if kind == "kv" else (kind,):
            if (layer, which) in found:
                raise ScalesError(f"two {which.upper()} scales for layer {layer}: {found[layer, which][0]} and "
                                  f"{where}:{name}")
            found[layer, which] = (f"{where}:{name}", vector.clone())
    layers = sorted({layer for layer, _ in found})
    want = n_layers if n_layers is not None else layers[-1] + 1
    for layer in range(want):
        for which in ("k", "v"):
            if (layer, which) not in found:
                raise ScalesError(f"no {which.upper()} scale for layer {layer} (expected layers 0..{want - 1})")
    extra = [layer for layer in layers if layer >= want]
    if extra:
        raise ScalesError(f"scales for layer(s) {', '.join(map(str, extra))} beyond the model's {want} layers")
    keys = tuple(found[layer, "k"][1] for layer in range(want))
    values = tuple(found[layer, "v"][1] for layer in range(want))
    return KVScales(keys, values, fp8_format), " + ".join(sorted(families))


def _scale_vector(tensor: torch.Tensor, where: str, n_kv_heads: int | None) -> torch.Tensor:
    """A scale tensor as `(1,)` (per tensor) or `(heads,)` (from `(heads,)` / `(heads, 1, 1)`)."""
    shape = tuple(tensor.shape)
    if tensor.numel() == 1:
        return tensor.detach().float().reshape(1)
    if len(shape) in (1, 3) and all(d == 1 for d in shape[1:]):
        if n_kv_heads is not None and shape[0] != n_kv_heads:
            raise ScalesError(f"{where} has {shape[0]} head scales but the model has {n_kv_heads} KV heads")
        return tensor.detach().float().reshape(-1)
    raise ScalesError(f"{where} has shape {shape}; KV scales are (1,) per tensor or (num_kv_heads, 1, 1) per head")


def _from_hf(folder: Path, entries: list[tuple[Path, str, torch.Tensor]], delimiter: str,
             meta: dict[str, Any], tp_size: int | None) -> Extracted:
    files = sorted({p for p, _, _ in entries})
    labels = {p.name: header_fp8_format(p) for p in files if p.suffix == ".safetensors"}
    named = {fmt for fmt in labels.values() if fmt is not None}
    if len(named) > 1:
        raise ScalesError(f"{folder}: the scale files' headers name different fp8 formats: "
                          + ", ".join(f"{name} {fmt}" for name, fmt in labels.items() if fmt))
    fp8_format = named.pop() if named else "e4m3fn"
    scales, family = hf_scales([(p.name, n, t) for p, n, t in entries], delimiter,
                               meta.get("n_layers"), meta.get("n_kv_heads"), fp8_format)
    tp = tp_size or 1
    notes = []
    n_heads, n_kv = meta.get("n_heads"), meta.get("n_kv_heads")
    if n_heads is None or n_kv is None:
        if tp > 1:
            raise ScalesError(f"{folder} has no config.json with num_attention_heads / num_key_value_heads: "
                              f"they are needed to fold scales to {tp} ranks")
        heads = max(s.numel() for s in (*scales.keys, *scales.values))
        n_heads = n_kv = heads
    if all(float(s.min()) == 1.0 and float(s.max()) == 1.0 for s in (*scales.keys, *scales.values)):
        notes.append("every scale is exactly 1.0: placeholders, or ModelOpt's clamp to >= 1.0")
    if fp8_format != "e4m3fn":
        notes.append(f"the scales are for {fp8_format} (scale = amax / {fp8_max(fp8_format):g}), as the files' "
                     f"{FP8_FORMAT_KEY} header says")
    ranks = scales.to_ranks(tp, n_heads, n_kv)
    return Extracted(family, meta.get("model_type"), ranks, scales, files, notes)
