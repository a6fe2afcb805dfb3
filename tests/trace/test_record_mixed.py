"""Traces of a mixed-cache run: k / v are everything flash-decoding attended to, out is what the
model used, and k_quant / v_quant (with their parts) dequantize to the cold part of k / v."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import pytest
import torch

from kvlab.attention import flash_decoding
from kvlab.caches.mixed import MixedPolicy
from kvlab.runspec import RunSpec
from kvlab.trace import TraceFile, check_trace, record_trace
from tests.conftest import tiny

PROMPT = "Mixed traces."  # 13 byte tokens
LAYERS = [0, 3]
STEPS = 3
# hot and group tiny so that blocks fill; split=8 makes flash-decoding read several cold parts
SCHEMES = ["bits=2", "bits=4", "scheme=q8_0", "scheme=q4_0", "scheme=fp8"]


def _run(scheme: str) -> RunSpec:
    return RunSpec.parse(f"cache=mixed:{scheme},hot=4,group=4,split=8")


def _reaching_o_proj(model, layer: int) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    seen: list[torch.Tensor] = []
    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].clone()))
    return seen, handle


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_mixed_trace_is_what_flash_decoding_attended_to(model, scheme, tmp_path):
    from kvlab.capture import capture

    loaded, run = tiny(model), _run(scheme)
    ids = loaded.encode(PROMPT)
    seen, handle = _reaching_o_proj(loaded.model, 3)
    try:
        summary = record_trace(loaded, ids, run, layers=LAYERS, steps=STEPS, out=tmp_path / "m.gguf")
    finally:
        handle.remove()
    snap = capture(loaded, ids, run, max_new_tokens=STEPS + 1)  # the same run, its cache after the last step
    assert summary.token_ids == snap.token_ids

    trace = TraceFile(summary.path)
    report = check_trace(trace, max_abs=1e-5)  # flash-decoding vs the float64 reference, float32 tolerance
    assert report.ok, report.worst()
    assert report.types == {"q": "F32", "k": "F32", "v": "F32", "out": "F32"}
    assert len(report.entries) == len(LAYERS) * STEPS * loaded.config.num_attention_heads

    policy = RunSpec.parse(trace.meta["kvlab.run"]).policy
    assert isinstance(policy, MixedPolicy)
    head_dim = trace.meta["kvlab.head_dim"]
    codecs = {"k": policy.scheme_spec().codec("keys", head_dim), "v": policy.scheme_spec().codec("values", head_dim)}
    n = len(ids)
    for layer in LAYERS:
        for step in range(1, STEPS + 1):
            att = trace.attention_step(layer, step)
            assert att.k.shape[2] == n + step and att.mask.shape[-1] == n + step  # the whole cache, not the hot window
            for role, recorded in (("k", att.k), ("v", att.v)):
                parts = trace.quant_parts(layer, step, role)
                assert "hot" not in parts
                blocks = codecs[role].decode(parts, recorded.dtype)
                cold = blocks.reshape(*blocks.shape[:2], -1, head_dim)
                assert 0 < cold.shape[2] < recorded.shape[2]
                assert torch.equal(cold, recorded[:, :, :cold.shape[2]])  # bit for bit
            if layer == 3:  # the output is what the layer passed on to o_proj
                assert torch.equal(att.out.transpose(1, 2).reshape(1, 1, -1), seen[step])
    last = {layer: trace.attention_step(layer, STEPS) for layer in LAYERS}
    for layer in LAYERS:
        assert torch.equal(last[layer].k, snap.keys(layer)) and torch.equal(last[layer].v, snap.values(layer))


def test_payload_parts_take_the_export_names(tmp_path):
    loaded = tiny("tiny-llama")
    expected = {"bits=4": {"", ".scale", ".zero"}, "scheme=q8_0": {""}, "scheme=fp8": {"", ".scale"}}
    for scheme, suffixes in expected.items():
        path = tmp_path / f"{scheme}.gguf"
        record_trace(loaded, loaded.encode(PROMPT), _run(scheme), layers=[1], steps=1, out=path)
        names = set(TraceFile(path).names)
        for role in ("k_quant", "v_quant"):
            assert {n.removeprefix(f"blk.1.step.1.{role}") for n in names if f".{role}" in n} == suffixes


def test_mixed_prefill_records_the_prompt_as_attended(tmp_path):
    loaded = tiny("tiny-mha")
    ids = loaded.encode(PROMPT)
    path = tmp_path / "p.gguf"
    record_trace(loaded, ids, _run("bits=4"), layers=[2], steps=1, out=path, prefill=True)
    trace = TraceFile(path)
    assert check_trace(trace, max_abs=1e-5).ok
    # the prompt attends to itself in full precision (KIVI); its older tokens are then stored as blocks
    assert trace.attention_step(2, 0).k.shape[2] == len(ids)
    assert trace.quant_parts(2, 0, "k")["q"].shape[2] == (len(ids) - 4) // 4


def test_cli_mixed_record_then_check(cli, tmp_path):
    out = tmp_path / "tm.gguf"
    code, _, err = cli("trace", "record", "--model", "tiny-llama", "--layers", "0,2", "--steps", "4", "--prompt",
                       "hello world, a longer prompt to fill some blocks of the cache",
                       "--run", "cache=mixed:bits=4,hot=8,group=8", "--out", out, "-q")
    assert code == 0, err
    code, stdout, err = cli("trace", "check", out, "--json", "-")
    assert code == 0, err
    assert json.loads(stdout)["ok"] is True


# ---- a broken kernel is caught where it is broken ---------------------------------------------
BROKEN = "kvlab_split_k_test_broken"
BROKEN_LAYER, BROKEN_HEAD = 2, 1


def _broken_split_k(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Flash-decoding, except that one head of one layer merges its parts without rescaling each
    by e^(m_c - M): the classic wrong merge, which only shows once there are two parts."""
    out, weights = flash_decoding.flash_decoding_attention(module, query, key, value, attention_mask,
                                                           scaling=scaling, **kwargs)
    source = flash_decoding.bound_source(module, query)
    if source is None or module.layer_idx != BROKEN_LAYER:
        return out, weights
    b, heads, _, d = query.shape
    kv = key.shape[1]
    grouped = query.reshape(b, kv, heads // kv, d)
    partials = [flash_decoding.explicit_partial(grouped, k, v, scaling, None)
                for k, v in [*source.cold_parts(key.dtype), (key, value)]]
    wrong = sum(p.l * p.o for p in partials) / sum(p.l for p in partials)
    out = out.clone()
    out[:, 0, BROKEN_HEAD] = wrong.reshape(b, heads, d)[:, BROKEN_HEAD]
    return out, weights


@dataclass(frozen=True)
class BrokenMixed(MixedPolicy):
    """The mixed cache with `_broken_split_k` in place of flash-decoding."""

    name = "mixed-broken-test"

    def session(self, model):
        @contextlib.contextmanager
        def broken():
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(BROKEN, _broken_split_k)
            AttentionMaskInterface.register(BROKEN, sdpa_mask)
            with super(BrokenMixed, self).session(model):
                previous = model.config._attn_implementation
                model.set_attn_implementation(BROKEN)
                try:
                    yield
                finally:
                    model.set_attn_implementation(previous)

        return broken()


def test_check_finds_a_wrong_merge_at_its_layer_step_and_head(cli, tmp_path):
    loaded = tiny("tiny-llama")
    ids = loaded.encode("hello!")  # 6 tokens, hot=4, group=4: step 1 has no block yet, steps 2 and 3 have one
    path = tmp_path / "broken.gguf"
    record_trace(loaded, ids, RunSpec(cache=BrokenMixed(hot=4, group=4)), layers=[0, BROKEN_LAYER], steps=3, out=path)
    report = check_trace(path)
    failed = {(e.layer, e.step, e.head) for e in report.failures}
    assert failed == {(BROKEN_LAYER, 2, BROKEN_HEAD), (BROKEN_LAYER, 3, BROKEN_HEAD)}
    assert min(e.rel_l2 for e in report.failures) > 1e-2
    assert max(e.rel_l2 for e in report.entries if e not in report.failures) < 1e-5
    code, stdout, _ = cli("trace", "check", path)
    assert code == 1 and "FAIL" in stdout
