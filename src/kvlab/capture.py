"""Capture: run a model greedily (or teacher-forced) under a RunSpec and record a Snapshot.

The loop is the one `model.generate` runs (prefill, then one token per step into the same
cache) written out, so that each step's full last-position logits can be kept and, under
teacher forcing, the token fed back can be the golden one instead of the model's own choice.
Token index equals position: the K/V at position t were computed when token t was fed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvlab.errors import KvlabError
from kvlab.model_facts import LoadedModel, apply_attention, model_shape
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
    keep_logits: bool = True,
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

    previous_attn = hf_model.config._attn_implementation
    apply_attention(hf_model, run.attn)
    device = hf_model.device
    ids: list[int] = list(prompt)
    greedy: list[int] = []
    top_ids: list[list[int]] = []
    top_values: list[list[float]] = []
    logits_rows: list[torch.Tensor] = []
    try:
        cache = policy.build(hf_model, batch_size=1, max_length=len(prompt) + n_steps)
        with policy.session(hf_model), torch.no_grad():
            feed = torch.tensor([prompt], dtype=torch.long, device=device)
            mask = torch.ones_like(feed)
            for step in range(n_steps):
                out = hf_model(
                    input_ids=feed, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1
                )
                cache = out.past_key_values
                last = out.logits[0, -1].float()
                own = int(torch.argmax(last))
                values, indices = torch.topk(last, min(top_k, last.numel()))
                greedy.append(own)
                top_ids.append(indices.tolist())
                top_values.append(values.tolist())
                if keep_logits:
                    logits_rows.append(last.cpu())
                nxt = forced[step] if forced is not None else own
                ids.append(nxt)
                if on_step is not None:
                    on_step(1)
                if step == n_steps - 1 or nxt in eos:
                    break
                feed = torch.tensor([[nxt]], dtype=torch.long, device=device)
                mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            layers, extras = policy.export(cache)
    finally:
        if previous_attn != run.attn:
            apply_attention(hf_model, previous_attn)

    meta = run_meta(describe, str(run), ids, len(prompt), greedy, top_ids, top_values, force=force,
                    forced=forced is not None, extra_meta=extra_meta)
    logits = torch.stack(logits_rows) if logits_rows else None
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


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


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
