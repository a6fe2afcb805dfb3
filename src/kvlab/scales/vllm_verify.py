"""`kvlab scales verify CHECKPOINT --engine vllm`: prove from vLLM's own fp8 cache which scales it used.

vLLM's most common fp8 failure is silent: scales it cannot find (a wrong tensor name, a
`quantization_config` it does not read) leave every layer at scale 1.0 with only a log line.
So the proof reads the cache itself: vLLM runs the checkpoint with `kv_cache_dtype="fp8"` on a
text, and for every layer kvlab has the K/V the layer was given and the e4m3 codes vLLM stored.
vLLM's CPU cache write rounds x / scale toward zero (measured: every code of every layer), so the
codes under a scale s are known exactly; per layer and for K and V:

- `checkpoint`: the codes are those of the checkpoint's scale (per head: vLLM's CPU kernel uses
  one scale per layer, the largest of the heads, as its loader reduces them), and the scales vLLM
  loaded equal the checkpoint's;
- `fallback 1.0`: the codes are those of scale 1.0 although the checkpoint has another scale;
- `other`: neither (then the scale that best explains the codes is reported).

A scale vLLM uses can still be wrong for the data: `range` flags a layer whose scale leaves the
codes using less than `MIN_RANGE_USE` of e4m3's range on this text (a scale several times too
large: 2-3 mantissa bits lost; a x4 scale uses about a quarter), or clips more than
`MAX_CLIPPED` of the values at 448 (a scale too small). Anything but `checkpoint` within range
fails the verification.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvlab.errors import KvlabError
from kvlab.scales.scales import KVScales, ScalesError

if TYPE_CHECKING:
    from kvlab.engines.vllm import LayerCache

MATCH = 0.999  # fraction of codes that must equal the prediction (measured: all of them)
MIN_RANGE_USE = 0.4
MAX_CLIPPED = 1e-3
DEFAULT_TOKENS = 256


@dataclass(frozen=True)
class SideCheck:
    """K or V of one layer."""

    checkpoint: list[float]  # the checkpoint's scale(s) for this layer
    loaded: list[float]  # what vLLM loaded
    used: float  # the scale vLLM's kernel reports using
    match_checkpoint: float  # fraction of stored codes equal to those of the checkpoint's scale
    match_one: float  # ... of scale 1.0
    fitted: float  # the scale that best explains the codes (least squares)
    range_use: float  # amax of the inputs / (448 x the checkpoint's scale)
    clipped: float  # fraction of inputs beyond 448 x the checkpoint's scale

    @property
    def expected(self) -> float:
        return max(self.checkpoint)

    @property
    def status(self) -> str:
        if self.match_checkpoint >= MATCH and _same(self.loaded, self.checkpoint):
            if self.range_use < MIN_RANGE_USE or self.clipped > MAX_CLIPPED:
                return "range"
            return "checkpoint"
        if self.match_one >= MATCH:
            return "fallback 1.0"
        return "other"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "checkpoint": self.checkpoint, "loaded": self.loaded, "used": self.used,
                "match_checkpoint": self.match_checkpoint, "match_one": self.match_one, "fitted": self.fitted,
                "range_use": self.range_use, "clipped": self.clipped}


@dataclass(frozen=True)
class LayerCheck:
    layer: int
    k: SideCheck
    v: SideCheck

    @property
    def status(self) -> str:
        for status in ("fallback 1.0", "other", "range"):
            if status in (self.k.status, self.v.status):
                return status
        return "checkpoint"

    @property
    def ok(self) -> bool:
        return self.status == "checkpoint"


@dataclass
class VerifyResult:
    checkpoint: Path
    layers: list[LayerCheck]
    n_tokens: int
    vllm_version: str
    granularity: str
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "ok": self.ok,
            "engine": {"name": "vllm", "version": self.vllm_version},
            "granularity": self.granularity,
            "n_tokens": self.n_tokens,
            "notes": self.notes,
            "failed_layers": [layer.layer for layer in self.layers if not layer.ok],
            "layers": [{"layer": layer.layer, "status": layer.status, "k": layer.k.to_dict(),
                        "v": layer.v.to_dict()} for layer in self.layers],
        }


def _same(loaded: list[float], checkpoint: list[float]) -> bool:
    return len(loaded) == len(checkpoint) and all(
        abs(a - b) <= 1e-6 * max(abs(b), 1e-30) for a, b in zip(loaded, checkpoint))


def checkpoint_scales(checkpoint: Path) -> tuple[KVScales, list[str]]:
    """The checkpoint's KV scales (under any name kvlab knows) and notes on its quantization_config."""
    from kvlab.scales.extract import extract

    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise ScalesError(f"{checkpoint}: no config.json (expected a checkpoint folder from kvlab scales export)")
    found = extract(checkpoint)
    if found.scales is None:
        raise ScalesError(f"{checkpoint}: its KV scales are per tensor-parallel rank; verify reads "
                          "compressed-tensors checkpoints")
    notes = []
    block = json.loads(config_path.read_text()).get("quantization_config")
    if block is None:
        notes.append("config.json has no quantization_config: vLLM reads no KV scales from this checkpoint")
    elif block.get("quant_method") != "compressed-tensors":
        notes.append(f"quantization_config.quant_method is {block.get('quant_method')!r}, not compressed-tensors")
    return found.scales, notes


def verify_checkpoint(checkpoint: str | Path, *, text: str | None = None, max_tokens: int = DEFAULT_TOKENS,
                      python: str | None = None) -> VerifyResult:
    """Run vLLM with an fp8 cache on `checkpoint` and check every layer's codes against its scales."""
    from kvlab.engines.vllm import Settings, read_layers, run_worker

    checkpoint = Path(checkpoint)
    scales, notes = checkpoint_scales(checkpoint)
    prompt = text if text is not None else _builtin_text()
    with tempfile.TemporaryDirectory(prefix="kvlab-verify-") as tmp:
        run = run_worker(checkpoint, prompt, [], Settings("fp8"), Path(tmp) / "run", max_prompt_tokens=max_tokens,
                         python=python)
        layers = read_layers(run, len(run.result["fed_ids"]))
    if len(layers) != scales.n_layers:
        raise KvlabError(f"vLLM ran {len(layers)} attention layers; {checkpoint} has scales for {scales.n_layers}")
    return VerifyResult(checkpoint, check_layers(scales, layers), len(run.result["fed_ids"]),
                        run.result["vllm_version"], scales.granularity, notes)


def check_layers(scales: KVScales, layers: list["LayerCache"]) -> list[LayerCheck]:
    """Each layer's stored codes and loaded scales against `scales` (see the module docstring)."""
    return [LayerCheck(i, _side(scales.keys[i], layer.key_inputs, layer.key_codes, layer.k_scale_loaded,
                                layer.k_scale_used),
                       _side(scales.values[i], layer.value_inputs, layer.value_codes, layer.v_scale_loaded,
                             layer.v_scale_used))
            for i, layer in enumerate(layers)]


def _side(checkpoint: torch.Tensor, inputs: torch.Tensor, codes: torch.Tensor, loaded: list[float],
          used: float) -> SideCheck:
    from kvlab.engines.vllm import FP8_MAX, decode_fp8, quantize_toward_zero

    expected = float(checkpoint.max())
    values = decode_fp8(codes, 1.0).flatten()
    x = inputs.flatten().float()
    fitted = float((values * x).sum() / (values * values).sum().clamp_min(1e-30))
    amax = float(x.abs().max())
    return SideCheck(
        checkpoint=[float(s) for s in checkpoint.tolist()],
        loaded=[float(s) for s in loaded],
        used=float(used),
        match_checkpoint=float((quantize_toward_zero(inputs, expected) == codes).float().mean()),
        match_one=float((quantize_toward_zero(inputs, 1.0) == codes).float().mean()),
        fitted=fitted,
        range_use=amax / (FP8_MAX * expected),
        clipped=float((x.abs() > FP8_MAX * expected).float().mean()),
    )


def _builtin_text() -> str:
    from kvlab.tasks.needle import essay_sentences

    return " ".join(essay_sentences()[:200])
