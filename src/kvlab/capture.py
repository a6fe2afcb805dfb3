"""Capture: run a model greedily (or teacher-forced) under a RunSpec and record a Snapshot.

The loop is the one `model.generate` runs (prefill, then one token per step into the same
cache), kvlab's own (`kvlab.decode`), so that each step's full last-position logits can be kept
(`StepLog`, its callback) and, under teacher forcing, the token fed back can be the golden one
instead of the model's own choice.
Token index equals position: the K/V at position t were computed when token t was fed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvlab.decode import Step, decode_n_tokens, policy_cache
from kvlab.decode import eos_ids as _eos_ids
from kvlab.errors import KvlabError
from kvlab.model_facts import LoadedModel, model_shape
from kvlab.models import model_fingerprint
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot


DEFAULT_TOP_K = 20


def capture(
    model: "LoadedModel | Any",
    tokens: Sequence[int] | torch.Tensor | None,
    run: RunSpec | str | None = None,
    *,
    force: Snapshot | Sequence[int] | None = None,
    max_new_tokens: int = 32,
    top_k: int = DEFAULT_TOP_K,
    stop_at_eos: bool = True,
    on_step: Callable[[int], None] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Snapshot:
    """Generate greedily from `tokens` and return the final cache as a Snapshot.

    model: a `LoadedModel` (from `kvlab.load_model`) or a transformers causal LM.
    tokens: prompt token ids; may be None when `force` gives them.
    run: the RunSpec (or its text, parsed here); keys it leaves out are taken from the model as loaded.
    force: a golden Snapshot (or its full token id list) to teacher-force: the model is fed the
        golden tokens and runs as many steps as the golden run did; its own greedy choices are
        still recorded (`greedy_ids`).
    """
    hf_model, describe = _unwrap(model)
    run = (run if isinstance(run, RunSpec) else RunSpec.parse(run or "")).resolve(hf_model)
    if run.tp != 1 and not _in_tp_group(run.tp):
        raise KvlabError("tp > 1 runs on torch.distributed: use `kvlab capture --tp N` (kvlab.distributed.capture_tp)")
    prompt, forced, n_steps = _plan(tokens, force, max_new_tokens)
    check_forcing_model(force, describe, prompt + (forced or []))
    policy = run.policy
    eos = _eos_ids(hf_model) if stop_at_eos and forced is None else set()

    log = StepLog(top_k, on_step)
    with policy_cache(hf_model, policy, attention=run.attn, max_length=len(prompt) + n_steps) as cache:
        decoded = decode_n_tokens(hf_model, cache, prompt, n_steps, forced=forced, eos=eos, callback=log)
        layers, extras = policy.export(decoded.cache)
    ids = prompt + decoded.ids

    meta = run_meta(describe, str(run), ids, len(prompt), log.greedy, log.top_ids, log.top_values, force=force,
                    forced=forced is not None, extra_meta=extra_meta)
    logits = log.logits()
    layers = [(k.detach().to("cpu"), v.detach().to("cpu")) for k, v in layers]
    extras = {name: t.detach().to("cpu") for name, t in extras.items()}
    return Snapshot.from_layers(layers, meta, extras=extras, logits=logits)


def _in_tp_group(tp: int) -> bool:
    """True inside one rank of a `tp`-way process group (kvlab.distributed runs capture there)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() == tp


def _unwrap(model) -> tuple[Any, dict[str, Any]]:
    if isinstance(model, LoadedModel):
        return model.model, model.describe()
    spec = getattr(model.config, "name_or_path", "") or type(model).__name__
    return model, {"spec": spec, "fingerprint": model_fingerprint(model), **model_shape(model.config)}


def _plan(tokens, force, max_new_tokens: int) -> tuple[list[int], list[int] | None, int]:
    """Prompt ids, the forced continuation (or None) and the number of steps."""
    prompt = None if tokens is None else [int(t) for t in (tokens.reshape(-1).tolist() if isinstance(tokens, torch.Tensor) else tokens)]
    if force is None:
        if not prompt:
            raise KvlabError("capture needs at least one prompt token")
        if max_new_tokens < 1:
            raise KvlabError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        return prompt, None, max_new_tokens
    if isinstance(force, Snapshot):
        golden_ids, n_prompt = force.token_ids, force.n_prompt
    else:
        golden_ids, n_prompt = [int(t) for t in force], len(prompt or [])
    if prompt is None:
        prompt = golden_ids[:n_prompt]
    if not prompt:
        raise KvlabError("teacher forcing needs the golden run's prompt")
    if golden_ids[: len(prompt)] != prompt:
        raise KvlabError("the prompt differs from the golden run's prompt: teacher forcing needs the same tokens")
    forced = golden_ids[len(prompt):]
    if not forced:
        raise KvlabError("the golden run has no generated tokens to force")
    return prompt, forced, len(forced)


def check_forcing_model(force: Snapshot | Sequence[int] | None, model: dict[str, Any], ids: Sequence[int]) -> None:
    """Refuse teacher forcing from another model's run: its cache positions would mean other tokens.

    `model` is the snapshot `model` block of the model about to run. A golden snapshot must carry
    the same fingerprint; any forced token must lie inside the model's vocabulary.
    """
    if isinstance(force, Snapshot):
        golden = force.model or {}
        want, have = golden.get("fingerprint"), model.get("fingerprint")
        if want and have and want != have:
            where = f" ({force.path})" if force.path is not None else ""
            raise KvlabError(f"cannot teacher-force model {model.get('spec', '?')} (fingerprint {have}) on the golden "
                             f"run{where} of model {golden.get('spec', '?')} (fingerprint {want}): "
                             "capture the golden run with the same model")
    vocab = model.get("vocab_size")
    outside = [t for t in ids if t < 0 or (vocab and t >= vocab)]
    if outside:
        raise KvlabError(f"cannot teacher-force model {model.get('spec', '?')}: token id {outside[0]} is outside its "
                         f"vocabulary of {vocab}")


class StepLog:
    """The decode loop's callback for a capture: the model's own token, top-k logits and whole
    logits row of every step; the same for every engine."""

    def __init__(self, top_k: int, on_step: Callable[[int], None] | None = None) -> None:
        self.top_k, self.on_step = top_k, on_step
        self.greedy: list[int] = []
        self.top_ids: list[list[int]] = []
        self.top_values: list[list[float]] = []
        self.rows: list[torch.Tensor] = []

    def __call__(self, step: Step) -> None:
        last = step.logits[0].float()
        values, indices = torch.topk(last, min(self.top_k, last.numel()))
        self.greedy.append(int(step.greedy[0]))
        self.top_ids.append(indices.tolist())
        self.top_values.append(values.tolist())
        self.rows.append(last.cpu())
        if self.on_step is not None:
            self.on_step(1)

    def logits(self) -> torch.Tensor | None:
        """Every kept row, `[steps, vocab]` float32 on CPU (None when none was kept)."""
        return torch.stack(self.rows) if self.rows else None


def run_meta(model: dict[str, Any], run: str, ids: list[int], n_prompt: int, greedy: list[int],
             top_ids: list[list[int]], top_values: list[list[float]], *, force: Any = None, forced: bool = False,
             extra_meta: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    """The `meta.json` of a greedy or teacher-forced run, whoever ran it (`more`: e.g. an engine block)."""
    meta: dict[str, Any] = {
        "model": model,
        "run": run,
        **more,
        "token_ids": ids,
        "n_prompt": n_prompt,
        "n_steps": len(greedy),
        "teacher_forced": forced,
        "greedy_ids": greedy,
        "logits": {"top_k": len(top_ids[0]) if top_ids else 0, "ids": top_ids, "values": top_values},
        "layout": None,
    }
    if isinstance(force, Snapshot):
        meta["forced_from"] = {"run": force.run, "path": str(force.path) if force.path else None}
    meta.update(extra_meta or {})
    return meta
