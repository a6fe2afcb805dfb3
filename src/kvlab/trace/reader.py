"""Read trace files, kvlab's own and ggml-native ones, back into torch tensors.

`GGUFReader` gives each tensor's bytes and its `ne`; turning them into the tensor the trace
means takes the layout: where kvlab wrote the file, its `kvlab.tensor.*` metadata says it;
for a file a ggml program dumped, a role layout (`llama.cpp`, ...) says how q, k, v, mask
and out are laid out there. Float data come back in the dtype they were stored in (f32, f16,
bf16 exactly); q8_0 / q4_0 and other block formats are dequantized with `gguf.quants`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvlab.errors import first_line
from kvlab.trace import ggml
from kvlab.trace.gguf_scan import scan_gguf
from kvlab.trace.format import (
    LAYOUT_KEY,
    LAYOUTS,
    PAYLOAD_PART,
    ROLES,
    TensorLayout,
    TraceError,
    element_count,
    parse_name,
    layer_key,
    tensor_key,
    tensor_name,
)

# what GGUFReader raises on a malformed file
_PARSE_ERRORS = (ValueError, KeyError, IndexError, OverflowError, TypeError, struct.error, MemoryError,
                 NotImplementedError, AttributeError, RecursionError, OSError)
_NATIVE = frozenset({"F32", "F16", "F64", "I8", "I16", "I32", "I64"})  # numpy reads these typed


@dataclass
class AttentionStep:
    """One layer's attention at one step, as torch tensors in the usual layout.

    q `[batch, heads, q_len, head_dim]`, k / v `[batch, kv_heads, kv_len, head_dim]`,
    mask None or broadcastable to `[batch, heads, q_len, kv_len]`, out like q.
    """

    layer: int
    step: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    out: torch.Tensor
    scale: float | None
    softcap: float | None


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` for `path`, or a TraceError that says in one line what is wrong."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    if not path.is_file():
        raise TraceError(f"{path} is not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError as err:
        raise TraceError(f"{path} cannot be read: {err.strerror or err}") from None
    if size == 0:
        raise TraceError(f"{path} is empty")
    if head[:4] != b"GGUF":
        raise TraceError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
    if size < 24:
        raise TraceError(f"{path} is truncated: {size} bytes, shorter than a GGUF header (24)")
    version = struct.unpack_from("<I", head, 4)[0]
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        version = struct.unpack_from(">I", head, 4)[0]
    if version not in (2, 3):
        raise TraceError(f"{path} is GGUF version {version}; this reader knows versions 2 and 3")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        scan_gguf(path, mapped)
    try:
        return GGUFReader(path)
    except _PARSE_ERRORS as err:
        raise TraceError(f"{path} is a corrupt or truncated GGUF file: {_reason(err)}") from None


def _reason(err: BaseException) -> str:
    """GGUFReader's exception, said in terms of the file."""
    text = first_line(err)
    if isinstance(err, IndexError) or "size must be a divisor" in text:
        return "it ends in the middle of its header, or a count or length in the header is wrong"
    for kind, what in (("GGMLQuantizationType", "a tensor has an unknown ggml type"),
                       ("GGUFValueType", "a metadata value has an unknown type")):
        if kind in text:
            return f"{what} ({text.split(' is not')[0].replace('np.uint32(', '').rstrip(')')})"
    if "cannot reshape array" in text:
        return "its tensor data end before the last tensor does, or a tensor's dimensions are wrong"
    return text[:200]


class TraceFile:
    """A trace opened for reading; tensors are read (and copied) on demand.

    layout: how tensors without kvlab metadata are laid out: "kvlab" (ne reversed, the
        default), "llama.cpp" (llama.cpp's attention graph: q_cur, K/V cache rows,
        flash-attention output), "llama.cpp-views" (the same, each permuted view dumped with
        its own ne), or a dict role -> TensorLayout. A tensor's kvlab metadata always wins.
    deinterleave_qk: q and k carry LLaMA GGUF's interleaved RoPE channel order; put them back
        in Hugging Face's order (attention is the same either way; the K cache is not).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        layout: str | dict[str, TensorLayout] | None = None,
        deinterleave_qk: bool = False,
    ) -> None:
        self.path = Path(path)
        self._reader = open_gguf(self.path)
        self.meta = self._read_meta()
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.layout_given = layout is not None
        if layout is None:  # the file's own word (`kvlab.layout`, written by kvlab's engine recorder), else kvlab
            layout = self.meta.get(LAYOUT_KEY) or "kvlab"
        self.layout_name = layout if isinstance(layout, str) else "custom"
        if isinstance(layout, str):
            if layout not in LAYOUTS:
                raise TraceError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
            layout = LAYOUTS[layout]
        self.role_layout = dict(layout)
        self.deinterleave_qk = deinterleave_qk

    # ---- what is in the file ---------------------------------------------------------------
    def _read_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if not key.startswith("kvlab."):
                continue
            try:
                meta[key] = field.contents()
            except (*_PARSE_ERRORS, UnicodeDecodeError) as err:
                raise TraceError(f"{self.path}: metadata {key} cannot be read ({type(err).__name__})") from None
        return meta

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def ggml_type(self, name: str) -> str:
        return self._tensor_info(name).tensor_type.name

    def stored_ne(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._tensor_info(name).shape)

    def steps(self) -> list[tuple[int, int]]:
        """(layer, step) pairs that have attention tensors, sorted by step then layer."""
        found = {(p.layer, p.step) for p in map(parse_name, self._tensors) if p is not None and p.role in ROLES}
        return sorted(found, key=lambda ls: (ls[1], ls[0]))

    def _tensor_info(self, name: str):
        info = self._tensors.get(name)
        if info is None:
            raise TraceError(f"{self.path} has no tensor {name}")
        return info

    # ---- reading tensors -------------------------------------------------------------------
    def layout_of(self, name: str) -> TensorLayout:
        """The tensor's layout: its kvlab metadata, else its role's layout, else plain ggml."""
        permute = self.meta.get(tensor_key(name, "ggml_permute"))
        shape = self.meta.get(tensor_key(name, "torch_shape"))
        source = self.meta.get(tensor_key(name, "source_ne"))
        view = self.meta.get(tensor_key(name, "ne_is_view"))
        if any(v is not None for v in (permute, shape, source, view)):
            try:
                return TensorLayout(
                    permute=ggml.check_axes(permute) if permute is not None else None,
                    ne_is_view=bool(view),
                    source_ne=tuple(int(n) for n in source) if source is not None else None,
                    torch_shape=tuple(int(n) for n in shape) if shape is not None else None,
                )
            except (TypeError, ValueError) as err:
                raise TraceError(f"{self.path}: bad layout metadata for {name}: {err}") from None
        parsed = parse_name(name)
        if parsed is not None and parsed.part is None and parsed.role in self.role_layout:
            return self.role_layout[parsed.role]
        return TensorLayout()

    def tensor(self, name: str, *, head_dim: int | None = None) -> torch.Tensor:
        """The torch tensor stored under `name`, through its layout (see `layout_of`)."""
        info = self._tensor_info(name)
        layout = self.layout_of(name)
        stored = self.stored_ne(name)
        flat = self._elements(name, info)
        count = element_count(stored)
        if stored and flat.numel() != count and count % max(flat.numel(), 1) == 0:
            # raw bytes read back as a wider dtype: ne[0] counted bytes
            stored = (stored[0] * flat.numel() // count, *stored[1:])
        try:
            source = layout.resolve_source(stored, head_dim)
            view = ggml.permuted_view(flat, source, layout.permute)
            if layout.torch_shape is not None:
                return view.reshape(layout.torch_shape).clone()
            ne = ggml.ggml_ne(view.shape)
            return view.reshape(ggml.torch_shape(ne)).clone()
        except (ValueError, RuntimeError) as err:
            raise TraceError(f"{self.path}: tensor {name} (ne {list(stored)}) does not fit its layout: {err}") from None

    def _elements(self, name: str, info) -> torch.Tensor:
        """The stored elements, flat, in storage order, in their own dtype."""
        from gguf.quants import dequantize

        kind = info.tensor_type.name
        data = info.data
        try:
            if kind in _NATIVE:
                array = np.ascontiguousarray(data.reshape(-1)).astype(data.dtype.newbyteorder("="), copy=True)
                flat = torch.from_numpy(array)
                wanted = self.meta.get(tensor_key(name, "dtype"))
                if kind == "I8" and wanted not in (None, "int8"):
                    flat = flat.view(torch.uint8).view(_torch_dtype(wanted, name))
                return flat
            if kind == "BF16":
                raw = np.ascontiguousarray(data.reshape(-1)).view(np.int16).copy()
                return torch.from_numpy(raw).view(torch.bfloat16)
            with np.errstate(all="ignore"):  # corrupt blocks may hold inf / NaN scales
                values = dequantize(np.asarray(data), info.tensor_type)
        except NotImplementedError:
            raise TraceError(f"{self.path}: tensor {name} has ggml type {kind}, which cannot be dequantized") from None
        except (ValueError, TypeError, RuntimeError) as err:
            raise TraceError(f"{self.path}: tensor {name} ({kind}) cannot be decoded: {err}") from None
        return torch.from_numpy(np.ascontiguousarray(values.reshape(-1), dtype=np.float32))

    def quant_parts(self, layer: int, step: int, role: str) -> dict[str, torch.Tensor]:
        """A quantized cache's raw payload of `role` ("k" or "v") at one step, named as the cache
        policy's `export` names it: `{"q": payload, "scale": ..., ...}`; {} when there is none."""
        if role not in ("k", "v"):
            raise ValueError(f"role is 'k' or 'v', got {role!r}")
        base = tensor_name(layer, step, f"{role}_quant")
        parts = {}
        for name in self._tensors:
            if name == base:
                parts[PAYLOAD_PART] = self.tensor(name)
            elif name.startswith(base + "."):
                parts[name[len(base) + 1:]] = self.tensor(name)
        return parts

    # ---- attention steps -------------------------------------------------------------------
    def attention_step(self, layer: int, step: int) -> AttentionStep:
        """q, k, v, mask and out of one layer at one step, checked to fit together."""
        try:
            return self._attention_step(layer, step)
        except TraceError as err:
            if self.layout_given or self.layout_name != "kvlab" or "kvlab.format" in self.meta:
                raise
            text = str(err) if str(err).startswith(str(self.path)) else f"{self.path}: {err}"
            raise TraceError(f"{text}; this file has no kvlab metadata, so its tensors were read in kvlab's layout: "
                             "if a ggml program (llama.cpp) wrote it, give its layout with --layout llama.cpp "
                             "(or llama.cpp-views, llama.cpp-noflash)") from None

    def _attention_step(self, layer: int, step: int) -> AttentionStep:
        names = {role: tensor_name(layer, step, role) for role in ROLES}
        missing = [role for role in ("q", "k", "v", "out") if names[role] not in self._tensors]
        if missing:
            raise TraceError(f"{self.path}: layer {layer} step {step} has no {', '.join(missing)}")
        q = _four(self.tensor(names["q"]), names["q"])
        head_dim = q.shape[-1]
        k = _four(self.tensor(names["k"], head_dim=head_dim), names["k"])
        v = _four(self.tensor(names["v"], head_dim=head_dim), names["v"])
        out = _four(self.tensor(names["out"], head_dim=head_dim), names["out"])
        if self.deinterleave_qk:
            q, k = ggml.deinterleave_channels(q), ggml.deinterleave_channels(k)
        mask = None
        if names["mask"] in self._tensors:
            mask = _fit_mask(_four(self.tensor(names["mask"]), names["mask"]), q, k, f"{self.path}: {names['mask']}")
        _check_shapes(q, k, v, out, f"{self.path}: layer {layer} step {step}")
        return AttentionStep(layer, step, q, k, v, mask, out,
                             scale=self._float(layer_key(layer, "scale"), "kvlab.scale"),
                             softcap=self._float(layer_key(layer, "softcap"), "kvlab.softcap"))

    def _float(self, *keys: str) -> float | None:
        for key in keys:
            value = self.meta.get(key)
            if value is not None:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise TraceError(f"{self.path}: metadata {key} is not a number")
                return float(value)
        return None


def _torch_dtype(name: Any, tensor: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise TraceError(f"tensor {tensor}: unknown dtype {name!r} in its metadata")
    return dtype


def _four(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() > 4:
        raise TraceError(f"tensor {name} has {t.dim()} dimensions; attention tensors have at most 4")
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _fit_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, name: str) -> torch.Tensor:
    """Crop ggml's padding (extra query rows, extra key columns) and check the mask broadcasts."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if mask.shape[2] < q_len or mask.shape[3] < kv_len:
        raise TraceError(f"mask {name} {tuple(mask.shape)} is smaller than q_len {q_len} x kv_len {kv_len}")
    mask = mask[:, :, :q_len, :kv_len]
    for dim, want in ((0, q.shape[0]), (1, q.shape[1])):
        if mask.shape[dim] not in (1, want):
            raise TraceError(f"mask {name} {tuple(mask.shape)} does not broadcast to q {tuple(q.shape)}")
    return mask


def _check_shapes(q, k, v, out, where: str) -> None:
    b, h, t, d = q.shape
    problems = []
    if k.shape[0] != b or k.shape[3] != d:
        problems.append(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if v.shape[:3] != k.shape[:3]:
        problems.append(f"v {tuple(v.shape)} does not match k {tuple(k.shape)}")
    if k.shape[1] == 0 or h % k.shape[1]:
        problems.append(f"{h} query heads cannot share {k.shape[1]} KV heads")
    if out.shape != (b, h, t, v.shape[3]):
        problems.append(f"out {tuple(out.shape)} is not [batch, heads, q_len, head_dim] = {(b, h, t, v.shape[3])}")
    if problems:
        raise TraceError(f"{where}: {'; '.join(problems)}")
