"""What a divergence means, given how the golden and test runs differ.

This is NxDI's accuracy-debugging decision table (reference model on CPU vs the port on CPU
deviates -> the model code is wrong; those agree but CPU vs device deviates -> lowering,
compiler, runtime or collectives) applied to kvlab's run-spec keys: a diff isolates a cause
only when the two runs differ in exactly one key.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.runspec import KEYS, RunSpec

_LABELS = {"dtype": "precision", "attn": "attention kernel", "cache": "cache policy", "tp": "tensor parallel",
           "device": "device"}


@dataclass(frozen=True)
class Diagnosis:
    differs_in: tuple[str, ...] | None  # run-spec keys that differ; None when a run spec is unreadable
    kind: str  # "same", "dtype", "attn", "cache", "tp", "device", "several", "unknown"
    text: str

    def as_dict(self) -> dict:
        return {"differs_in": None if self.differs_in is None else list(self.differs_in), "kind": self.kind,
                "text": self.text}


def run_differences(golden: RunSpec, test: RunSpec) -> tuple[str, ...]:
    """Run-spec keys whose values differ, with unset keys at kvlab's defaults."""
    g, t = golden.with_defaults(), test.with_defaults()
    return tuple(key for key in KEYS if _text(g, key) != _text(t, key))


def change_label(golden: RunSpec | None, test: RunSpec | None) -> str | None:
    """The test run as its changes against the golden run, e.g. 'dtype=bfloat16' (None if unreadable)."""
    if golden is None or test is None:
        return None
    t = test.with_defaults()
    differs = run_differences(golden, test)
    return ",".join(f"{key}={_text(t, key)}" for key in differs) if differs else "same run"


def diagnose(golden: RunSpec | None, test: RunSpec | None, diverged: bool, where: str = "") -> Diagnosis:
    """One verdict for the runs' difference and whether the cache diverged (`where` names the place)."""
    if golden is None or test is None:
        return Diagnosis(None, "unknown", "a run spec could not be read: the diff cannot say what the difference means")
    differs = run_differences(golden, test)
    at = f" ({where})" if where else ""
    if not differs:
        text = (f"same run spec, yet the caches differ{at}: nondeterminism or a capture bug" if diverged
                else "same run spec and the caches agree")
        return Diagnosis(differs, "same", text)
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
}


def _text(spec: RunSpec, key: str) -> str:
    value = getattr(spec, key)
    return value.spec() if key == "cache" else str(value)
