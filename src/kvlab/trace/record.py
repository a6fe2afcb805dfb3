"""Record a trace: q, k, v, mask and attention output of chosen layers at each step.

The recording goes through transformers' own interface: an attention function registered
with `AttentionInterface` (and a mask function with `AttentionMaskInterface`) under the name
`kvlab_trace`, which lets the implementation the run uses compute the attention, keeps a copy
of its inputs and output for the chosen layers, and returns the output untouched. The model is
switched to it only inside `TraceRecorder`'s `with` block, which always switches it back; the
run's cache policy session (a quantized cache's own attention, say) stays underneath it.

Under the mixed cache's flash-decoding the kernel is handed only the hot window and reads the
quantized blocks itself; the record's k and v are then everything that call attended to (the
blocks dequantized as the kernel reads them, then the hot window: `flash_decoding.attended_kv`).

A quantized cache adds its raw payload the way it does for snapshots: its policy's `export`
returns extras `layers.{i}.keys.q` / `layers.{i}.values.q` and their parts `layers.{i}.keys.{part}`
(scale, zero, ...); they are stored as `blk.{i}.step.{n}.k_quant` / `v_quant` and
`.k_quant.{part}`. `layers.{i}.keys.hot`, the full-precision tail, is not stored again: the
recorded k ends with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvlab.decode import Step, decode_n_tokens, policy_cache
from kvlab.errors import KvlabError
from kvlab.intercept import current_attention, intercept, register_attention
from kvlab.model_facts import model_shape
from kvlab.runspec import RunSpec
from kvlab.trace.format import HOT_PART, PAYLOAD_PART, TraceError, layer_key, step_key, tensor_name
from kvlab.trace.writer import TraceWriter, check_writable
from kvlab.version import __version__

ATTENTION_NAME = "kvlab_trace"
_ACTIVE: contextvars.ContextVar["TraceRecorder | None"] = contextvars.ContextVar("kvlab_trace_recorder", default=None)
_QUANT_EXTRA = re.compile(r"^layers\.(\d+)\.(keys|values)\.([A-Za-z0-9_]+)$")
_GGML_PERMUTE = (0, 2, 1, 3)  # q and out are kept as ggml holds them: [head_dim, n_head, n_tokens]


@dataclass
class AttentionRecord:
    """What one layer's attention saw and produced at one step (torch layout, on CPU)."""

    q: torch.Tensor  # [batch, heads, q_len, head_dim]
    k: torch.Tensor  # [batch, kv_heads, kv_len, head_dim]
    v: torch.Tensor
    mask: torch.Tensor  # additive, [batch | 1, 1, q_len, kv_len]
    out: torch.Tensor  # [batch, heads, q_len, head_dim]
    scale: float | None
    softcap: float | None


def _traced_attention(module, query, key, value, attention_mask, **kwargs):
    recorder = _ACTIVE.get()
    if recorder is None:
        raise KvlabError(f"attn={ATTENTION_NAME} only works inside kvlab.trace.TraceRecorder")
    return recorder.attend(module, query, key, value, attention_mask, **kwargs)


def _traced_mask(*args, **kwargs):
    recorder = _ACTIVE.get()
    build = recorder.mask_function if recorder is not None else None
    return build(*args, **kwargs) if build is not None else None


class TraceRecorder:
    """`with TraceRecorder(model, layers):` records the attention of `layers` while `active`.

    The attention implementation the model had on entry keeps computing; on exit (error or
    not) the model gets it back. `step` names the forward pass the records belong to. Called
    with a `kvlab.decode.Step`, the recorder is the decode loop's observer: the pass after it
    is step `step.index + 1`, recorded.
    """

    def __init__(self, model, layers: Sequence[int]) -> None:
        self.model = model
        self.layers = set(int(layer) for layer in layers)
        self.step = 0
        self.active = True
        self.records: dict[tuple[int, int], AttentionRecord] = {}
        self._previous: str | None = None
        self._exit: contextlib.ExitStack | None = None
        self.mask_function: Callable | None = None
        self._modules = {id(m) for m in model.modules()}

    def __enter__(self) -> "TraceRecorder":
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        register_attention(ATTENTION_NAME, _traced_attention, _traced_mask)
        self._previous = current_attention(self.model)
        if self._previous == ATTENTION_NAME:
            raise KvlabError("a trace is already being recorded on this model")
        self.mask_function = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(self._previous)
        with contextlib.ExitStack() as stack:
            stack.callback(_ACTIVE.reset, _ACTIVE.set(self))
            stack.enter_context(intercept(self.model, attention=ATTENTION_NAME))
            self._exit = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()

    def __call__(self, step: Step) -> None:
        self.step, self.active = step.index + 1, True

    def _delegate(self, module) -> Callable:
        from transformers import AttentionInterface

        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        return AttentionInterface().get_interface(self._previous, eager)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        from kvlab.attention.flash_decoding import attended_kv

        out, weights = self._delegate(module)(module, query, key, value, attention_mask, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if self.active and layer in self.layers and id(module) in self._modules:
            key, value = attended_kv(module, query, key, value)
            self.records[(layer, self.step)] = AttentionRecord(
                q=_copy(query),
                k=_copy(key),
                v=_copy(value),
                mask=additive_mask(attention_mask, query.shape[2], key.shape[2]),
                out=_copy(out.transpose(1, 2)),  # attention functions return [batch, q_len, heads, head_dim]
                scale=_number(kwargs.get("scaling", getattr(module, "scaling", None))),
                softcap=_number(kwargs.get("softcap")),
            )
        return out, weights


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _number(value) -> float | None:
    return None if value is None else float(value)


def additive_mask(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor:
    """The mask an attention kernel got, as an additive float32 `[b, 1, q_len, kv_len]` (0 or -inf).

    None (the kernel's own causal rule) becomes the causal mask of the last q_len positions;
    boolean masks (True = attend) and additive ones (eager's dtype minimum) become 0 / -inf.
    """
    if mask is None:
        positions = torch.arange(q_len)[:, None] + (kv_len - q_len)
        allowed = torch.arange(kv_len)[None, :] <= positions
        return torch.zeros(1, 1, q_len, kv_len).masked_fill(~allowed, float("-inf"))
    mask = mask.detach().to("cpu")[..., -q_len:, :kv_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    return mask.to(torch.float32).masked_fill(blocked, float("-inf"))


# ---- the recording run --------------------------------------------------------------------------
@dataclass
class TraceSummary:
    """What `record_trace` wrote."""

    path: Path
    run: str
    layers: list[int]
    steps: list[int]
    token_ids: list[int]
    n_prompt: int
    tensors: dict[str, list[int]] = field(default_factory=dict)  # name -> torch shape
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.path), "run": self.run, "layers": self.layers, "steps": self.steps,
                "token_ids": self.token_ids, "n_prompt": self.n_prompt, "n_tensors": len(self.tensors),
                "bytes": self.bytes, "seconds": self.seconds}


def record_trace(
    model,
    tokens: Sequence[int],
    run: RunSpec | None = None,
    *,
    layers: Sequence[int],
    steps: int,
    out: str | os.PathLike,
    prefill: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TraceSummary:
    """Generate `steps` tokens greedily after the prompt and write the chosen layers' attention.

    Step 0 is the prompt's forward pass (recorded only with `prefill`), steps 1..`steps` the
    decode steps, each feeding the previous greedy token. The trace is written atomically to
    `out` in ggml conventions (see kvlab.trace.format). Keys `run` leaves out (all, when None)
    are the model's as loaded.
    """
    from kvlab.capture import _unwrap

    hf_model, describe = _unwrap(model)
    run = (RunSpec() if run is None else run).resolve(hf_model)
    if run.tp != 1:
        raise KvlabError("traces are recorded with tp=1")
    prompt = [int(t) for t in tokens]
    if not prompt:
        raise KvlabError("recording a trace needs at least one prompt token")
    if steps < 1:
        raise KvlabError(f"steps must be at least 1, got {steps}")
    shape = model_shape(hf_model.config)
    layers = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in layers if not 0 <= layer < shape["n_layers"]]
    if bad or not layers:
        raise KvlabError(f"layers {bad or '(none)'}: the model has layers 0..{shape['n_layers'] - 1}")
    check_writable(Path(out))
    started = time.perf_counter()
    ids, records, payloads = _decode(hf_model, run, prompt, layers, steps, prefill, on_step)

    recorded_steps = list(range(0 if prefill else 1, steps + 1))
    writer = TraceWriter(out)
    meta = {
        "kvlab.version": __version__,
        "kvlab.model": describe["spec"],
        "kvlab.model.fingerprint": describe["fingerprint"],
        "kvlab.model.family": shape["family"],
        "kvlab.run": str(run),
        "kvlab.n_heads": shape["n_heads"],
        "kvlab.n_kv_heads": shape["n_kv_heads"],
        "kvlab.head_dim": shape["head_dim"],
        "kvlab.layers": layers,
        "kvlab.steps": recorded_steps,
        "kvlab.token_ids": ids,
        "kvlab.n_prompt": len(prompt),
    }
    for step in recorded_steps:
        meta[step_key(step, "position")] = len(prompt) + step - 1 if step else 0
        meta[step_key(step, "n_tokens")] = len(prompt) if step == 0 else 1
    for key, value in meta.items():
        writer.add_meta(key, value)
    summary = TraceSummary(path=Path(out), run=str(run), layers=layers, steps=recorded_steps, token_ids=ids,
                           n_prompt=len(prompt))
    summary.tensors = _add_records(writer, records, payloads, layers)
    writer.write()
    summary.bytes = summary.path.stat().st_size
    summary.seconds = time.perf_counter() - started
    return summary


def _decode(hf_model, run: RunSpec, prompt: list[int], layers: list[int], steps: int, prefill: bool,
            on_step: Callable[[int], None] | None):
    """Prompt pass + `steps` greedy decode steps under the run, recording `layers`.

    Returns the token ids, the attention records by (layer, step) and the cache's raw quantized
    payloads by (layer, step).
    """
    policy = run.policy
    payloads: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    with policy_cache(hf_model, policy, attention=run.attn, max_length=len(prompt) + steps + 1) as cache, \
            TraceRecorder(hf_model, layers) as recorder:

        def observe(step: Step) -> None:
            if recorder.active:
                payloads.update(_quant_payloads(policy, step.cache, layers, step.index))
            recorder(step)
            if on_step is not None:
                on_step(1)

        recorder.step, recorder.active = 0, prefill
        decoded = decode_n_tokens(hf_model, cache, prompt, steps + 1, callback=observe)
    return prompt + decoded.ids, recorder.records, payloads


def _add_records(writer: TraceWriter, records: dict[tuple[int, int], AttentionRecord],
                 payloads: dict[tuple[int, int], dict[str, torch.Tensor]], layers: list[int]) -> dict[str, list[int]]:
    """Layer metadata and every recorded tensor, step by step; returns name -> torch shape."""
    for layer in layers:
        record = next((r for (at, _), r in records.items() if at == layer), None)
        if record is None:
            raise TraceError(f"layer {layer} never reached the attention function: nothing was recorded")
        if record.scale is not None:
            writer.add_meta(layer_key(layer, "scale"), record.scale)
        if record.softcap is not None:
            writer.add_meta(layer_key(layer, "softcap"), record.softcap)
    shapes: dict[str, list[int]] = {}
    for (layer, step), record in sorted(records.items(), key=lambda item: (item[0][1], item[0][0])):
        for role in ("q", "k", "v", "mask", "out"):
            tensor = getattr(record, role)
            name = tensor_name(layer, step, role)
            if role == "mask":
                writer.add_tensor(name, tensor, store="f16" if _fits_f16(tensor) else None)
            else:
                writer.add_tensor(name, tensor, permute=_GGML_PERMUTE if role in ("q", "out") else None)
            shapes[name] = list(tensor.shape)
        for name, tensor in payloads.get((layer, step), {}).items():
            writer.add_tensor(name, tensor)
            shapes[name] = list(tensor.shape)
    return shapes


def _fits_f16(mask: torch.Tensor) -> bool:
    """True when the mask survives f16 exactly (llama.cpp keeps its masks in f16)."""
    return bool(torch.equal(mask.to(torch.float16).to(mask.dtype), mask))


def _quant_payloads(policy, cache, layers: Sequence[int], step: int) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """The policy's raw quantized extras of the chosen layers after the step, under their trace names.

    `layers.{i}.keys.q` becomes `k_quant`, `layers.{i}.keys.{part}` `k_quant.{part}`; a policy
    without a payload (`.q`) for a layer adds nothing for it.
    """
    _, extras = policy.export(cache)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in (extras or {}).items():
        m = _QUANT_EXTRA.match(name)
        if m is None or int(m.group(1)) not in layers or m.group(3) == HOT_PART:
            continue
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    found: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for (layer, kind), named in parts.items():
        if PAYLOAD_PART not in named:
            continue
        role = "k_quant" if kind == "keys" else "v_quant"
        for part, tensor in named.items():
            name = tensor_name(layer, step, role, None if part == PAYLOAD_PART else part)
            found.setdefault((layer, step), {})[name] = _copy(tensor)
    return found

