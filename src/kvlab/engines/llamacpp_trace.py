"""Record a real llama.cpp run's attention (q, k, v, mask, output) into a GGUF trace, in ggml's layout.

The eval callback asks for the attention nodes of the chosen layers and reads them right after
they are computed, exactly as llama.cpp holds them (no copy through kvlab's own layouts):

- flash attention: the `FLASH_ATTN_EXT` node (its output `[head_dim, n_head, n_tokens]` F32 and
  its softmax scale in `op_params`) and its sources: src[0] q, a `ggml_permute(0, 2, 1, 3)` of
  the contiguous `[head_dim, n_head, n_tokens]`; src[1] / src[2] K and V, permuted views of the
  cache rows `[n_embd_k_gqa, n_kv]` (stored as those rows, in the cache type: F16, Q8_0, ...);
  src[3] the F16 mask `[n_kv, n_tokens padded]`. With a quantized cache this llama.cpp
  Hadamard-rotates q, k and v: the q attention reads is this node's src[0] (an unnamed
  MUL_MAT result), not `Qcur-N`, and the output is in the rotated V basis; the check is
  unaffected (q·k and the weights are invariant under the same rotation of q and k).
- without flash attention: `kq-N` (src[0] K, src[1] q), `kq_soft_max-N` (src[1] the F32 mask,
  the scale in `op_params`), `kqv-N` (src[0] V, stored transposed in the cache: one row per
  channel, recorded as `[n_kv, n_embd_v_gqa]`) and `kqv_out-N` (`[n_embd, n_tokens]`).

The file names its role layout (`kvlab.layout` = `llama.cpp` or `llama.cpp-noflash`), the engine,
its settings and the thread count (the kernel's split over positions depends on it), so
`kvlab trace check` reads it and replays the kernel's rounding without options.
"""

from __future__ import annotations

import ctypes
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvlab.engines import LLAMA_CPP
from kvlab.engines.ggml_graph import GgmlTensor, GraphCallback, libggml
from kvlab.errors import KvlabError
from kvlab.trace.format import layer_key, step_key, tensor_name

if TYPE_CHECKING:
    from kvlab.runspec import RunSpec

_CACHE_LAYER = re.compile(r"cache_[kv]_l(\d+)")
_NAMED = re.compile(r"^(kq|kq_soft_max|kqv|kqv_out)-(\d+)$")


@dataclass
class EngineTraceSummary:
    path: Path
    run: str
    layers: list[int]
    steps: list[int]
    tensors: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "run": self.run, "layers": self.layers, "steps": self.steps,
                "tensors": self.tensors, "bytes": self.bytes, "seconds": self.seconds}


def _tensor(ptr: int) -> GgmlTensor:
    return GgmlTensor.from_address(ptr)


def _src(ptr: int, i: int) -> int:
    s = _tensor(ptr).src[i]
    return ctypes.addressof(s.contents) if s else 0


def _unpermute(ptr: int) -> int:
    """The tensor a chain of PERMUTE / TRANSPOSE views was taken of."""
    lib = libggml()
    while ptr and lib.ggml_op_name(_tensor(ptr).op).decode() in ("PERMUTE", "TRANSPOSE"):
        ptr = _src(ptr, 0)
    return ptr


def _type(ptr: int) -> str:
    return libggml().ggml_type_name(_tensor(ptr).type).decode().upper()


def _contiguous_bytes(ptr: int, nbytes: int | None = None) -> np.ndarray:
    t = _tensor(ptr)
    size = libggml().ggml_nbytes(ptr) if nbytes is None else nbytes
    return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(t.data)).copy()


def _rows(ptr: int) -> tuple[np.ndarray, list[int], str]:
    """A cache view `[head_dim, n_head_kv, n_kv]` (rows contiguous) as the cache rows `[n_embd_gqa, n_kv]`."""
    lib = libggml()
    t = _tensor(ptr)
    head_dim, heads, n_kv = int(t.ne[0]), int(t.ne[1]), int(t.ne[2])
    row = lib.ggml_row_size(t.type, head_dim * heads)
    if int(t.nb[1]) != lib.ggml_row_size(t.type, head_dim) or int(t.nb[2]) != row:
        raise KvlabError(f"llama.cpp K/V view {t.name.decode()} is not a run of whole cache rows "
                         f"(ne {list(t.ne)}, nb {list(t.nb)})")
    return _contiguous_bytes(ptr, row * n_kv), [head_dim * heads, n_kv], _type(ptr)


def _transposed_v(ptr: int) -> tuple[np.ndarray, list[int], str]:
    """The transposed V cache view `[n_kv, n_head_kv, head_dim]` (channel rows of kv_size) as `[n_kv, n_embd_v]`."""
    t = _tensor(ptr)
    n_kv, heads, head_dim = int(t.ne[0]), int(t.ne[1]), int(t.ne[2])
    es = int(t.nb[0])
    span = (heads - 1) * int(t.nb[1]) + (head_dim - 1) * int(t.nb[2]) + n_kv * es
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(t.data))
    out = np.empty((heads, head_dim, n_kv * es), dtype=np.uint8)
    for h in range(heads):
        for d in range(head_dim):
            at = h * int(t.nb[1]) + d * int(t.nb[2])
            out[h, d] = raw[at:at + n_kv * es]
    return out.reshape(-1), [n_kv, head_dim * heads], _type(ptr)


def _float_param(ptr: int, i: int) -> float:
    return struct.unpack("<f", struct.pack("<i", _tensor(ptr).op_params[i]))[0]


class AttentionRecorder:
    """The eval callback's two halves: which nodes to see, and what to keep of them."""

    def __init__(self, layers: Sequence[int], flash_attn: bool) -> None:
        self.layers = set(layers)
        self.flash_attn = flash_attn
        self.step: int | None = None  # the step being recorded (None: not recording)
        self.tensors: dict[str, tuple[np.ndarray, list[int], str]] = {}
        self.scales: dict[int, float] = {}
        self.softcaps: dict[int, float] = {}
        self.callback = GraphCallback(self._want, self._seen)

    def _layer(self, node) -> int | None:
        if self.flash_attn:
            if node.op != "FLASH_ATTN_EXT":
                return None
            found = [int(m.group(1)) for name in node.src for m in [_CACHE_LAYER.search(name)] if m]
            return found[0] if found else None
        m = _NAMED.match(node.name)
        return int(m.group(2)) if m else None

    def _want(self, node) -> bool:
        if self.step is None:
            return False
        layer = self._layer(node)
        return layer is not None and layer in self.layers

    def _keep(self, layer: int, role: str, value: tuple[np.ndarray, list[int], str]) -> None:
        self.tensors[tensor_name(layer, self.step, role)] = value

    def _seen(self, node, ptr: int) -> None:
        layer = self._layer(node)
        if self.flash_attn:
            q = _unpermute(_src(ptr, 0))
            self._keep(layer, "q", (_contiguous_bytes(q), _ne(q), _type(q)))
            self._keep(layer, "k", _rows(_unpermute(_src(ptr, 1))))
            self._keep(layer, "v", _rows(_unpermute(_src(ptr, 2))))
            mask = _src(ptr, 3)
            if mask:
                self._keep(layer, "mask", (_contiguous_bytes(mask), _ne(mask), _type(mask)))
            self._keep(layer, "out", (_contiguous_bytes(ptr), _ne(ptr), _type(ptr)))
            self.scales[layer] = _float_param(ptr, 0)
            if _float_param(ptr, 2):
                self.softcaps[layer] = _float_param(ptr, 2)
            return
        kind = _NAMED.match(node.name).group(1)
        if kind == "kq":
            q = _unpermute(_src(ptr, 1))
            self._keep(layer, "q", (_contiguous_bytes(q), _ne(q), _type(q)))
            self._keep(layer, "k", _rows(_unpermute(_src(ptr, 0))))
        elif kind == "kq_soft_max":
            mask = _src(ptr, 1)
            if mask:
                self._keep(layer, "mask", (_contiguous_bytes(mask), _ne(mask), _type(mask)))
            self.scales[layer] = _float_param(ptr, 0)
        elif kind == "kqv":
            self._keep(layer, "v", _transposed_v(_unpermute(_src(ptr, 0))))
        elif kind == "kqv_out":
            self._keep(layer, "out", (_contiguous_bytes(ptr), _ne(ptr), _type(ptr)))


def _ne(ptr: int) -> list[int]:
    """A tensor's ne without ggml's trailing 1s (kept down to two dimensions)."""
    ne = [int(n) for n in _tensor(ptr).ne]
    while len(ne) > 2 and ne[-1] == 1:
        ne.pop()
    return ne


def record_trace(
    model,
    tokens: Sequence[int] | None,
    run: "RunSpec | None" = None,
    *,
    layers: Sequence[int],
    steps: int,
    out: str | Path,
    prefill: bool = False,
    prompt_text: str | None = None,
    threads: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> EngineTraceSummary:
    """Run llama.cpp greedily from the prompt for `steps` decode steps, recording `layers`' attention.

    Step 0 is the prompt's forward pass (recorded with `prefill`), 1.. the decode steps; `run` is a
    parsed llama.cpp run (None: its defaults).
    """
    from kvlab.engines import engine_run
    from kvlab.engines.llamacpp import Session, Settings, resolve_model, session_threads, tokenize
    from kvlab.trace.format import LAYOUT_KEY
    from kvlab.trace.writer import TraceWriter, check_writable

    started = time.perf_counter()
    spec = engine_run(run, LLAMA_CPP).with_defaults()
    settings = Settings.from_run(spec, threads=threads)
    gguf = resolve_model(model) if isinstance(model, str) else model
    if tokens is None:
        tokens = gguf.encode(prompt_text or "") or tokenize(gguf.path, prompt_text or "")
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise KvlabError("trace record needs at least one prompt token")
    out = Path(out)
    check_writable(out)
    recorder = AttentionRecorder(layers, settings.flash_attn)
    ids = list(tokens)
    with Session(gguf.path, settings, n_ctx=len(tokens) + steps + 1, n_batch=len(tokens),
                 eval_callback=recorder.callback) as session:
        bad = [layer for layer in layers if not 0 <= layer < session.n_layers]
        if bad:
            raise KvlabError(f"layer {bad[0]} out of range: the model has {session.n_layers} layers")
        positions: dict[int, tuple[int, int]] = {}
        feed = list(tokens)
        for step in range(steps + 1):
            recorder.step = step if (step > 0 or prefill) else None
            recorder.callback.enabled = recorder.step is not None
            logits = session.decode(feed)
            if recorder.step is not None:
                positions[step] = (len(ids) - len(feed), len(feed))
            if on_step is not None:
                on_step(1)
            nxt = int(np.argmax(logits))
            ids.append(nxt)
            feed = [nxt]
        n_heads, n_kv_heads, head_dim = session.n_heads, session.n_kv_heads, session.head_dim
    missing = [(layer, step) for step in positions for layer in layers
               if tensor_name(layer, step, "out") not in recorder.tensors]
    if missing:
        raise KvlabError(f"llama.cpp's graph showed no attention of layer {missing[0][0]} at step {missing[0][1]}")
    writer = TraceWriter(out)
    writer.add_meta(LAYOUT_KEY, "llama.cpp" if settings.flash_attn else "llama.cpp-noflash")
    writer.add_meta("kvlab.model", gguf.spec)
    if gguf.describe.get("fingerprint"):
        writer.add_meta("kvlab.model.fingerprint", gguf.describe["fingerprint"])
    writer.add_meta("kvlab.run", str(spec))
    writer.add_meta("kvlab.engine", LLAMA_CPP)
    writer.add_meta("kvlab.engine.version", session.lib.__version__)
    writer.add_meta("kvlab.engine.threads", session_threads(settings))
    writer.add_meta("kvlab.n_heads", n_heads)
    writer.add_meta("kvlab.n_kv_heads", n_kv_heads)
    writer.add_meta("kvlab.head_dim", head_dim)
    writer.add_meta("kvlab.layers", [int(x) for x in layers])
    writer.add_meta("kvlab.steps", sorted(positions))
    writer.add_meta("kvlab.token_ids", ids)
    writer.add_meta("kvlab.n_prompt", len(tokens))
    for layer in layers:
        writer.add_meta(layer_key(layer, "scale"), float(recorder.scales[layer]))
        if layer in recorder.softcaps:
            writer.add_meta(layer_key(layer, "softcap"), float(recorder.softcaps[layer]))
    for step, (position, n_tokens) in positions.items():
        writer.add_meta(step_key(step, "position"), position)
        writer.add_meta(step_key(step, "n_tokens"), n_tokens)
    for name, (data, ne, ggml_type) in recorder.tensors.items():
        writer.add_raw(name, data, ne, ggml_type)
    path = writer.write()
    return EngineTraceSummary(path, str(spec), list(layers), sorted(positions), list(recorder.tensors),
                              path.stat().st_size, time.perf_counter() - started)
