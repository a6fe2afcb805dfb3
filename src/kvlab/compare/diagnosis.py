"""What a divergence means, given how the golden and test runs differ.

This is NxDI's accuracy-debugging decision table (reference model on CPU vs the port on CPU
deviates -> the model code is wrong; those agree but CPU vs device deviates -> lowering,
compiler, runtime or collectives) applied to kvlab's run-spec keys: a diff isolates a cause
only when the two runs differ in exactly one key.

Between transformers and another engine (llama.cpp) everything may differ at once, so the
verdict reads the cache itself, layer 0 first (`EngineEvidence`): layer 0's values depend only
on the embedding, a norm and W_v (no positions, no attention), its keys add RoPE, and every
later layer adds the attention of the layer before. Hence: layer 0 values scrambled -> layout;
values clean but keys off -> RoPE; layer 0 clean and a later layer off -> the attention kernel
(or, with a quantized cache, its rounding compounding: precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kvlab.runspec import ENGINE_KEYS, TRANSFORMERS_KEYS, RunSpec, value_text

_LABELS = {"dtype": "precision", "attn": "attention kernel", "cache": "cache policy", "tp": "tensor parallel",
           "device": "device", "engine": "engine", "fa": "flash attention", "rope_base": "RoPE base"}
LAYOUT_COSINE = 0.99  # rounding keeps a layer's cosine far above this; a scrambled layout does not


@dataclass(frozen=True)
class EngineEvidence:
    """Layer 0 of a test cache against the golden one, and the layer of the first divergence."""

    k_rel_l2: float  # largest rel-L2 of any layer-0 key row
    v_rel_l2: float  # largest rel-L2 of any layer-0 value row
    v_cosine: float  # cosine of the whole layer-0 values
    first_layer: int | None
    tol: float

    @classmethod
    def from_cache(cls, cache, tol: float, first_layer: int | None) -> "EngineEvidence":
        k = float(cache.maps["keys"]["rel_l2"][0].max())
        v = float(cache.maps["values"]["rel_l2"][0].max())
        return cls(k, v, float(cache.layer_errors("values")[0].cosine), first_layer, tol)


@dataclass(frozen=True)
class Diagnosis:
    differs_in: tuple[str, ...] | None  # run-spec keys that differ; None when a run spec is unreadable
    kind: str  # "same", "dtype", "attn", "cache", "tp", "device", "several", "unknown"
    text: str

    def to_dict(self) -> dict:
        return {"differs_in": None if self.differs_in is None else list(self.differs_in), "kind": self.kind,
                "text": self.text}


def run_differences(golden: RunSpec, test: RunSpec) -> tuple[str, ...]:
    """Run-spec keys whose values differ, with unset keys at kvlab's defaults (`engine` alone across engines)."""
    if golden.engine_name != test.engine_name:
        return ("engine",)
    g, t = golden.with_defaults(), test.with_defaults()
    keys = ENGINE_KEYS if g.is_engine else TRANSFORMERS_KEYS
    return tuple(key for key in keys if _text(g, key) != _text(t, key))


def change_label(golden: RunSpec | None, test: RunSpec | None) -> str | None:
    """The test run as its changes against the golden run, e.g. 'dtype=bfloat16' (None if unreadable)."""
    if golden is None or test is None:
        return None
    t = test.with_defaults()
    differs = run_differences(golden, test)
    if differs == ("engine",):
        return str(t)
    return ",".join(f"{key}={_text(t, key)}" for key in differs) if differs else "same run"


def diagnose(golden: RunSpec | None, test: RunSpec | None, diverged: bool, where: str = "",
             evidence: EngineEvidence | None = None) -> Diagnosis:
    """One verdict for the runs' difference and whether the cache diverged (`where` names the place).

    evidence: layer 0 of the caches, read for a change of engine (see the module docstring).
    """
    if golden is None or test is None:
        return Diagnosis(None, "unknown", "a run spec could not be read: the diff cannot say what the difference means")
    differs = run_differences(golden, test)
    at = f" ({where})" if where else ""
    if not differs:
        text = (f"same run spec, yet the caches differ{at}: nondeterminism or a capture bug" if diverged
                else "same run spec and the caches agree")
        return Diagnosis(differs, "same", text)
    if differs == ("engine",):
        verdict = _engine_verdict(golden.with_defaults(), test.with_defaults(), diverged, at, evidence)
        return replace(verdict, text=verdict.text + _fp8_note(test.with_defaults()))
    if len(differs) > 1:
        names = " and ".join(_LABELS[k] for k in differs)
        return Diagnosis(differs, "several", f"the runs differ in {names}: a divergence cannot be pinned on one "
                         "cause; diff one change at a time (one --test per key)")
    key = differs[0]
    g, t = golden.with_defaults(), test.with_defaults()
    before, after = _text(g, key), _text(t, key)
    if key == "cache" and diverged and not getattr(t.policy, "lossless", False):
        clean, broken = _VERDICTS["lossy cache"]
    else:
        clean, broken = _VERDICTS[key]
    return Diagnosis(differs, key, (broken if diverged else clean).format(g=before, t=after, at=at))


# per key: (the caches agree, the caches diverge); {g} / {t} are the key's golden / test values
_VERDICTS = {
    "dtype": (
        "precision only ({g} -> {t}): every row within the rounding budget of {t}",
        "precision only ({g} -> {t}): the cache drifts past what {t} rounding explains{at}; look for a range "
        "overflow (float16) or a sum accumulated in low precision in the layers up to there",
    ),
    "attn": (
        "attention kernel only ({g} -> {t}): the kernels agree, so model code is not the cause of a device "
        "deviation (NxDI table: look at lowering/compiler/runtime/collectives)",
        "attention kernel only ({g} -> {t}), same weights and dtype: the kernels disagree{at}, so the kernel or "
        "its mask / scaling / GQA repeat is wrong (NxDI table: model code wrong)",
    ),
    "cache": (
        "cache policy only ({g} -> {t}): within tolerance",
        "cache policy only ({g} -> {t}): a lossless policy changed the cache{at}: a bug in its cache layers "
        "(update / export)",
    ),
    "lossy cache": (
        "cache policy only ({g} -> {t}): within tolerance",
        "cache policy only ({g} -> {t}): the lossy cache exceeds the tolerance{at}; compare with its stated error "
        "bound (--tol) or tune the policy",
    ),
    "tp": (
        "tensor parallel only (tp={g} -> tp={t}): the shards reconstruct to the golden cache up to all-reduce order",
        "tensor parallel only (tp={g} -> tp={t}): beyond all-reduce reordering{at}: a sharding, layout or "
        "collective bug (NxDI table: lowering/compiler/runtime/collectives); check the replica and padding "
        "report of `kvlab reconstruct`",
    ),
    "device": (
        "device only ({g} -> {t}): the device run matches the CPU run",
        "device only ({g} -> {t}), same model code: CPU vs device deviates{at}, so per NxDI's table the cause is "
        "lowering, compiler, runtime or collectives (rule out model code with an attn-only diff on CPU)",
    ),
    "fa": (
        "flash attention only ({g} -> {t}): the engine's two attention graphs agree",
        "flash attention only ({g} -> {t}): the engine's attention graphs disagree{at}: its kernel, mask or the V "
        "layout of one of them (V is stored transposed without flash attention)",
    ),
    "rope_base": (
        "RoPE base only ({g} -> {t}): the caches agree, so the base is not applied: check the engine's override",
        "RoPE base only ({g} -> {t}): keys move{at}, as a changed base must; a divergence in layer 0 keys with "
        "clean values is the signature of a RoPE difference",
    ),
}


def _engine_verdict(golden: RunSpec, test: RunSpec, diverged: bool, at: str,
                    evidence: EngineEvidence | None) -> Diagnosis:
    """transformers vs an engine (or two engines): layout, RoPE, precision or kernel, read from layer 0."""
    change = f"engine ({golden.engine_name} -> {test.engine_name}, {test})"
    cache = test.policy if test.is_engine else golden.policy
    lossy = not getattr(cache, "lossless", True)
    if evidence is None:
        text = (f"{change}: the caches diverge{at}" if diverged else f"{change}: every row within tolerance")
        return Diagnosis(("engine",), "engine", text)
    layer0 = (f"layer 0: keys rel-L2 up to {evidence.k_rel_l2:.3g}, values up to {evidence.v_rel_l2:.3g} "
              f"(cosine {evidence.v_cosine:.6f})")
    if not math.isfinite(evidence.v_cosine) or evidence.v_cosine < LAYOUT_COSINE:
        return Diagnosis(("engine",), "engine:layout", (
            f"{change}: layout: layer 0 values already disagree ({layer0}); they depend on no position and no "
            "attention, so heads, channels or positions are read in another order (KV head order, the GGUF Q/K "
            "channel interleave, a V cache stored transposed)"))
    if evidence.v_rel_l2 <= evidence.tol < evidence.k_rel_l2:
        return Diagnosis(("engine",), "engine:rope", (
            f"{change}: RoPE: layer 0 keys diverge while its values are clean{at} ({layer0}); the values prove the "
            "weights and the input agree, so the position encoding differs (RoPE base, scaling, type or channel "
            "pairing)"))
    if not diverged:
        return Diagnosis(("engine",), "engine:precision", (
            f"{change}: precision: every row within tolerance ({layer0}); the engine rounds differently "
            "(its cache type, quantized matmul activations) and no more"))
    if lossy:
        return Diagnosis(("engine",), "engine:precision", (
            f"{change}: precision: layer 0 within tolerance ({layer0}), the divergence starts deeper{at}: the "
            f"{cache.spec()} cache's rounding compounds through the layers; compare with the f16 cache to "
            "separate it from the kernel"))
    return Diagnosis(("engine",), "engine:kernel", (
        f"{change}: kernel: layer 0 keys and values agree ({layer0}) but layer {evidence.first_layer} diverges"
        f"{at}: the attention of the layers before it (kernel, mask, softmax scale, accumulation) differs; "
        "record a trace of that layer (kvlab trace record --engine llama.cpp) and check it"))


def _fp8_note(run: RunSpec) -> str:
    """What a vLLM fp8 cache adds to an engine verdict: how it rounds and whose scales it ran with."""
    if run.engine_name != "vllm" or run.policy.spec() != "fp8":
        return ""
    scales = (f"scales from {run.scales}" if run.scales
              else "no scales given, so scale 1.0 (check a checkpoint with kvlab scales verify)")
    return (f"; fp8 rows: vLLM's e4m3 cache rounds x / scale toward zero (up to one e4m3 step, 1/8 relative, "
            f"per element), {scales}")


def _text(spec: RunSpec, key: str) -> str:
    value = getattr(spec, key)
    return "None" if value is None else value_text(key, value)
