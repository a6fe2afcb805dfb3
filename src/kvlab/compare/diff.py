"""Diff a test snapshot against a golden one: cache errors, logits agreement, first divergence, diagnosis.

`diff_snapshots` checks that the two snapshots are comparable (same model, same token ids,
same cache shapes: one clear error line when not), streams the caches layer by layer
(`cachediff`), compares the per-step logits (`logitsdiff`), locates the first divergence
under a tolerance that follows the runs' precision (`tolerance`) and says what it means for
the way the runs differ (`diagnosis`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kvlab.compare.cachediff import CacheDiff, Divergence, diff_caches
from kvlab.compare.diagnosis import Diagnosis, EngineEvidence, change_label, diagnose
from kvlab.compare.logitsdiff import LogitsDiff, diff_logits
from kvlab.compare.source import TENSORS, SnapshotSource
from kvlab.compare.tolerance import Tolerance, ToleranceOverride, tolerance_for
from kvlab.engines.settings import own_arithmetic
from kvlab.errors import KvlabError
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot


class DiffError(KvlabError):
    """Two snapshots that cannot be compared position by position."""


@dataclass
class DiffResult:
    """Everything one golden-vs-test comparison found."""

    golden_run: str
    test_run: str
    n_prompt: int
    token_ids: list[int]
    tolerance: Tolerance
    cache: CacheDiff
    logits: LogitsDiff
    first_divergence: Divergence | None
    diagnosis: Diagnosis
    golden_path: str | None = None
    test_path: str | None = None
    label: str = ""  # the test run as its change against the golden run, e.g. "dtype=bfloat16"

    @property
    def n_positions(self) -> int:
        return self.cache.n_positions

    def describe_position(self, position: int) -> str:
        """'prompt token 12' or 'generated token 3' (the K/V at a position come from that token)."""
        if position < self.n_prompt:
            return f"prompt token {position}"
        return f"generated token {position - self.n_prompt}"

    def worst_layers(self, n: int = 5) -> list[int]:
        """Layers with the largest whole-layer rel-L2 (keys or values), worst first."""
        k, v = self.cache.layer_errors("keys"), self.cache.layer_errors("values")
        return sorted(range(len(k)), key=lambda i: -max(_num(k[i].rel_l2), _num(v[i].rel_l2)))[:n]

    def worst_heads(self, n: int = 5) -> list[tuple[int, int]]:
        """(layer, head) pairs with the largest rel-L2 over their positions, worst first."""
        k, v = self.cache.head_errors("keys"), self.cache.head_errors("values")
        pairs = [(i, h) for i in range(len(k)) for h in range(len(k[i]))]
        return sorted(pairs, key=lambda p: -max(_num(k[p[0]][p[1]].rel_l2), _num(v[p[0]][p[1]].rel_l2)))[:n]

    def to_dict(self) -> dict[str, Any]:
        """The `tests[]` entry of `kvlab diff --json` (DESIGN.md contract, plus more keys)."""
        layers_k, layers_v = self.cache.layer_errors("keys"), self.cache.layer_errors("values")
        heads_k, heads_v = self.cache.head_errors("keys"), self.cache.head_errors("values")
        return {
            "run": self.test_run,
            "label": self.label,
            "first_divergence": None if self.first_divergence is None else self.first_divergence.to_dict(),
            "layers": [
                {"layer": i, "keys": _errors_json(layers_k[i]), "values": _errors_json(layers_v[i])}
                for i in range(len(layers_k))
            ],
            "logits": self.logits.to_dict(),
            "tolerance": self.tolerance.to_dict(),
            "diagnosis": self.diagnosis.to_dict(),
            "heads": [
                {"layer": i, "head": h, "keys": _errors_json(heads_k[i][h]), "values": _errors_json(heads_v[i][h])}
                for i in range(len(heads_k)) for h in range(len(heads_k[i]))
            ],
            "total": {t: _errors_json(self.cache.total_errors(t)) for t in TENSORS},
            "positions": {t: {"rel_l2_max": [_clean(v) for v in self.cache.position_max(t).tolist()]}
                          for t in TENSORS},
            "worst_layers": self.worst_layers(),
            "worst_heads": [{"layer": i, "head": h} for i, h in self.worst_heads()],
            "nonfinite": {"rows": self.cache.nonfinite_rows, "locations": [n.to_dict() for n in self.cache.nonfinite]},
            "n_positions": self.n_positions,
            "n_prompt": self.n_prompt,
            "path": self.test_path,
        }


def diff_snapshots(
    golden: Snapshot,
    test: Snapshot,
    *,
    tol: ToleranceOverride | str | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> DiffResult:
    """Compare `test` with `golden` position by position (both must run on the same tokens)."""
    override = tol if isinstance(tol, ToleranceOverride) else ToleranceOverride.parse(tol)
    g_src, t_src = SnapshotSource(golden), SnapshotSource(test)
    check_comparable(golden, test, g_src, t_src)
    cache = diff_caches(g_src, t_src, golden.n_layers, on_layer=on_layer)
    logits = diff_logits(g_src, t_src)
    g_run, t_run = _parse_run(golden.run), _parse_run(test.run)
    precisions = [_precision(run, src) for run, src in ((g_run, g_src), (t_run, t_src))]
    lossy = t_run is not None and not getattr(t_run.policy, "lossless", True)
    across = g_run is not None and t_run is not None and g_run.engine_name != t_run.engine_name
    own = across and (own_arithmetic(g_run.engine_name) or own_arithmetic(t_run.engine_name))
    tolerance = tolerance_for(precisions, lossy, override, other_arithmetic=own)
    first = cache.first_divergence(tolerance.rel_l2)
    where = ""
    if first is not None:
        where = f"first at position {first.position}, layer {first.layer}, KV head {first.head}, {first.tensor}"
    evidence = None
    if across:
        evidence = EngineEvidence.from_cache(cache, tolerance.rel_l2, None if first is None else first.layer)
    return DiffResult(
        golden_run=golden.run,
        test_run=test.run,
        n_prompt=golden.n_prompt,
        token_ids=golden.token_ids,
        tolerance=tolerance,
        cache=cache,
        logits=logits,
        first_divergence=first,
        diagnosis=diagnose(g_run, t_run, first is not None, where, evidence),
        golden_path=str(golden.path) if golden.path else None,
        test_path=str(test.path) if test.path else None,
        label=change_label(g_run, t_run) or test.run,
    )


def check_comparable(golden: Snapshot, test: Snapshot, g_src: SnapshotSource, t_src: SnapshotSource) -> None:
    """One DiffError line if the two snapshots are of different models, tokens or cache shapes."""
    for run in (golden.run, test.run):
        refuse_evicting(_parse_run(run))
    g_model, t_model = golden.model, test.model
    g_fp, t_fp = g_model.get("fingerprint"), t_model.get("fingerprint")
    if g_fp and t_fp and g_fp != t_fp:
        raise DiffError(f"the snapshots come from different models: golden {g_model.get('spec')} (fingerprint {g_fp}) "
                        f"vs test {t_model.get('spec')} (fingerprint {t_fp})")
    g_ids, t_ids = golden.token_ids, test.token_ids
    if g_ids != t_ids or golden.n_prompt != test.n_prompt:
        at = next((i for i, (a, b) in enumerate(zip(g_ids, t_ids)) if a != b), min(len(g_ids), len(t_ids)))
        detail = (f"they differ at token {at}" if g_ids != t_ids
                  else f"prompt lengths differ ({golden.n_prompt} vs {test.n_prompt})")
        raise DiffError(f"the snapshots hold different token ids (golden {len(g_ids)}, test {len(t_ids)} tokens; "
                        f"{detail}): capture the test teacher-forced on the golden run "
                        "(kvlab capture --force-tokens GOLDEN)")
    if golden.n_layers != test.n_layers:
        raise DiffError(f"the snapshots have different layer counts: golden {golden.n_layers}, test {test.n_layers}")
    if golden.n_layers == 0:
        raise DiffError("the snapshots hold no layers")
    for layer in range(golden.n_layers):
        for name, g_shape, t_shape in (
            ("keys", g_src.shape(layer), t_src.shape(layer)),
            ("values", g_src.value_shape(layer), t_src.value_shape(layer)),
        ):
            if g_shape != t_shape:
                hint = _shard_hint(golden, test)
                raise DiffError(f"layer {layer} {name} shapes differ: golden {list(g_shape)} vs test {list(t_shape)} "
                                f"[batch, kv_heads, seq, head_dim]{hint}")
            if len(g_shape) != 4:
                raise DiffError(f"layer {layer} {name} has shape {list(g_shape)}; a cache layer is "
                                "[batch, kv_heads, seq, head_dim]")
    g_vocab, t_vocab = g_src.vocab(), t_src.vocab()
    if g_vocab is not None and t_vocab is not None and g_vocab != t_vocab:
        raise DiffError(f"the snapshots' logits have different vocabularies: golden {g_vocab}, test {t_vocab}")


def _shard_hint(golden: Snapshot, test: Snapshot) -> str:
    for label, snap in (("golden", golden), ("test", test)):
        layout = snap.layout
        if layout:
            return (f"; the {label} snapshot is one tensor-parallel shard (rank {layout.get('rank')} of "
                    f"tp={layout.get('tp')}): reconstruct the full cache first (kvlab reconstruct)")
    return ""


def refuse_evicting(run: RunSpec | None) -> None:
    """A diff compares every position of two caches; an evicting cache (streaming, snapkv) holds only
    some positions, chosen per KV head and step, so it is refused before any run or read."""
    from kvlab.caches.eviction import EvictionPolicy

    policy = run.cache if run is not None else None
    if isinstance(policy, EvictionPolicy):
        raise DiffError(f"cache={policy.spec()} evicts tokens: its cache keeps only some positions (per KV head), "
                        "so kvlab diff cannot compare it position by position with the golden one; measure its "
                        "accuracy with `kvlab fuse eval --evict` instead")


def _parse_run(text: str) -> RunSpec | None:
    """The run spec a snapshot records, or None when it cannot be read.

    Its attn value was checked when the run was captured and is taken as written: checking it
    again would import transformers (about 100 MB and seconds) only to read a name.
    """
    kept, attn = [], None
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "attn":
            attn = value.strip()
        else:
            kept.append(item)
    try:
        spec = RunSpec.parse(",".join(kept), check_device=False)
    except KvlabError:
        return None
    return replace(spec, attn=attn) if attn else spec


def _precision(run: RunSpec | None, source: SnapshotSource) -> str:
    if run is not None and run.dtype:
        return run.dtype
    if run is not None and run.is_engine and getattr(run.policy, "precision", None):
        return run.policy.precision
    return str(source.dtype()).removeprefix("torch.")


def _num(value: float) -> float:
    return value if not math.isnan(value) else math.inf


def _clean(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _errors_json(errors) -> dict[str, float | None]:
    return {k: _clean(v) for k, v in errors.to_dict().items()}
