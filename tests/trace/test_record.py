"""Recording traces from real runs: what is stored is what the model computed, in ggml conventions."""

from dataclasses import dataclass

import gguf
import pytest
import torch

from kvlab.caches.registry import CachePolicy
from kvlab.runspec import RunSpec
from kvlab.trace import TraceFile, TraceRecorder, check_trace, record_trace
from kvlab.trace.record import ATTENTION_NAME, additive_mask
from tests.conftest import TINY_FAMILIES, tiny

PROMPT = "Traces record attention."


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_recorded_tensors_are_the_runs_own(name, tmp_path):
    # imported here: importing the kvlab.capture module early would hide kvlab.capture, the function
    from kvlab.capture import capture

    loaded = tiny(name)
    ids = loaded.encode(PROMPT)
    path = tmp_path / "t.gguf"
    reaching_o_proj = []
    o_proj = loaded.model.model.layers[3].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda module, args: reaching_o_proj.append(args[0].clone()))
    try:
        summary = record_trace(loaded, ids, layers=[0, 3], steps=2, out=path, prefill=True)
    finally:
        handle.remove()
    snap = capture(loaded, ids, max_new_tokens=3)
    assert summary.token_ids == snap.token_ids  # recording changes nothing in the run
    trace = TraceFile(path)
    assert trace.steps() == [(0, 0), (3, 0), (0, 1), (3, 1), (0, 2), (3, 2)]
    n, heads = len(ids), loaded.config.num_attention_heads
    for layer in (0, 3):
        for step in range(3):
            att = trace.attention_step(layer, step)
            length = n + step  # the cache after this step's update
            assert torch.equal(att.k, snap.keys(layer)[:, :, :length])
            assert torch.equal(att.v, snap.values(layer)[:, :, :length])
            q_len = n if step == 0 else 1
            assert att.q.shape == (1, heads, q_len, att.k.shape[-1])
            assert att.scale == att.k.shape[-1] ** -0.5
            if layer == 3:  # the output is what the layer passed on to o_proj
                assert torch.equal(att.out.transpose(1, 2).reshape(1, q_len, -1), reaching_o_proj[step])
    prefill_mask = trace.attention_step(0, 0).mask[0, 0].float()
    assert torch.equal(torch.isneginf(prefill_mask), torch.ones(n, n, dtype=torch.bool).triu(1))
    assert not torch.isneginf(trace.attention_step(0, 2).mask).any()
    assert check_trace(trace).ok


def test_stored_in_ggml_conventions(tmp_path):
    loaded = tiny("tiny-qwen2")
    record_trace(loaded, loaded.encode(PROMPT), layers=[1], steps=1, out=tmp_path / "t.gguf", prefill=True)
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    ne = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    n, h, kv, d = len(loaded.encode(PROMPT)), 4, 2, 16
    assert ne["blk.1.step.0.k"] == [d, n, kv, 1]  # torch [1, kv, n, d] reversed
    assert ne["blk.1.step.0.q"] == [d, h, n, 1]  # stored as ggml holds q_cur: [head_dim, n_head, n_tokens]
    assert ne["blk.1.step.0.out"] == [d, h, n, 1]  # as ggml_flash_attn_ext returns it
    assert ne["blk.1.step.0.mask"] == [n, n, 1, 1] and types["blk.1.step.0.mask"] == "F16"
    assert types["blk.1.step.0.k"] == "F32"
    fields = {f: reader.fields[f].contents() for f in reader.fields if f.startswith("kvlab.tensor.blk.1.step.0.out")}
    assert fields["kvlab.tensor.blk.1.step.0.out.torch_shape"] == [1, h, n, d]
    assert fields["kvlab.tensor.blk.1.step.0.out.ggml_permute"] == [0, 2, 1, 3]


@pytest.mark.parametrize("run", ["attn=eager", "dtype=bfloat16", "dtype=float16,attn=eager"])
def test_other_kernels_and_dtypes_check_within_their_tolerance(run, tmp_path):
    loaded = tiny("tiny-llama", run)
    record_trace(loaded, loaded.encode(PROMPT), RunSpec.parse(run), layers=[1], steps=1, out=tmp_path / "t.gguf",
                 prefill=True)
    report = check_trace(tmp_path / "t.gguf")
    assert report.ok, report.worst()
    kind = {"attn=eager": "F32", "dtype=bfloat16": "BF16", "dtype=float16,attn=eager": "F16"}[run]
    assert report.types["out"] == kind
    assert loaded.model.config._attn_implementation == RunSpec.parse(run).with_defaults().attn


def test_the_recorder_always_gives_the_model_its_attention_back():
    loaded = tiny("tiny-mha")
    before = loaded.model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with TraceRecorder(loaded.model, [0]):
            assert loaded.model.config._attn_implementation == ATTENTION_NAME
            raise RuntimeError("boom")
    assert loaded.model.config._attn_implementation == before
    with torch.no_grad():  # and the model still runs without a recorder
        loaded.model(torch.tensor([loaded.encode("ok")]))


def test_additive_mask_from_each_kind_of_kernel_mask():
    causal = additive_mask(None, 2, 4)
    assert torch.equal(torch.isneginf(causal[0, 0]), torch.tensor([[False, False, False, True], [False] * 4]))
    allowed = torch.tensor([[[[True, False, True]]]])
    assert torch.equal(additive_mask(allowed, 1, 3), torch.tensor([[[[0.0, float("-inf"), 0.0]]]]))
    eager = torch.tensor([[[[0.0, torch.finfo(torch.float16).min, 0.0, 0.0]]]], dtype=torch.float16)
    assert torch.equal(additive_mask(eager, 1, 3), torch.tensor([[[[0.0, float("-inf"), 0.0]]]]))


# ---- a quantized cache's raw payload ----------------------------------------------------------
def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    return torch.round(x / scale).to(torch.int8), scale


def _int8_layer_class():
    from transformers.cache_utils import DynamicLayer

    class Int8Layer(DynamicLayer):
        """Keeps int8 codes with per-token scales; attends to their dequantized values."""

        codes: dict[str, torch.Tensor]

        def update(self, key_states, value_states, *args, **kwargs):
            parts = {}
            for role, states in (("keys", key_states), ("values", value_states)):
                codes, scale = _quantize(states)
                old = getattr(self, "codes", {})
                parts[role] = (codes, scale)
                self.codes = {**old}
                for name, t in ((role, codes), (role + ".scale", scale)):
                    self.codes[name] = torch.cat([old[name], t], dim=-2) if name in old else t
            return super().update(*(c.float() * s for c, s in parts.values()))

    return Int8Layer


@dataclass(frozen=True)
class Int8Policy(CachePolicy):
    """A small quantized cache that exports its raw blocks the way a snapshot stores them."""

    name = "int8-test"
    lossless = False

    def build(self, model, *, batch_size=1, max_length=None):
        from transformers.cache_utils import Cache

        layer = _int8_layer_class()
        return Cache(layers=[layer() for _ in range(model.config.num_hidden_layers)])

    def export(self, cache):
        layers, _ = super().export(cache)
        extras = {}
        for i, layer in enumerate(cache.layers):
            extras[f"layers.{i}.keys.q"] = layer.codes["keys"]
            extras[f"layers.{i}.keys.scale"] = layer.codes["keys.scale"]
            extras[f"layers.{i}.values.q"] = layer.codes["values"]
            extras[f"layers.{i}.values.scale"] = layer.codes["values.scale"]
        return layers, extras


def test_a_quantized_cache_adds_its_raw_payload(tmp_path):
    loaded = tiny("tiny-llama")
    run = RunSpec(cache=Int8Policy())
    summary = record_trace(loaded, loaded.encode(PROMPT), run, layers=[1, 2], steps=2, out=tmp_path / "q.gguf")
    trace = TraceFile(tmp_path / "q.gguf")
    assert "blk.1.step.2.k_quant" in summary.tensors and "blk.3.step.1.k_quant" not in trace.names
    assert trace.ggml_type("blk.1.step.1.k_quant") == "I8" and trace.meta["kvlab.run"].endswith("cache=int8-test,tp=1,device=cpu")
    for layer in (1, 2):
        for step in (1, 2):
            att = trace.attention_step(layer, step)
            for role, recorded in (("k", att.k), ("v", att.v)):
                codes = trace.tensor(f"blk.{layer}.step.{step}.{role}_quant")
                scale = trace.tensor(f"blk.{layer}.step.{step}.{role}_quant.scale")
                assert codes.dtype == torch.int8 and codes.shape == recorded.shape
                # the payload dequantizes to exactly what attention attended to
                assert torch.equal(codes.float() * scale, recorded)
    assert check_trace(trace).ok


def test_raw_payload_dtypes_without_a_ggml_type_round_trip(tmp_path):
    from kvlab.trace import TraceWriter

    writer = TraceWriter(tmp_path / "raw.gguf")
    packed = torch.randint(0, 256, (1, 2, 5, 8), dtype=torch.uint8)
    fp8 = torch.randn(1, 2, 5, 16).to(torch.float8_e4m3fn)
    bf16 = torch.randn(3, 4).to(torch.bfloat16)
    writer.add_tensor("blk.0.step.1.k_quant", packed)
    writer.add_tensor("blk.0.step.1.v_quant", fp8)
    writer.add_tensor("blk.0.step.1.v_quant.scale", bf16)
    writer.write()
    trace = TraceFile(tmp_path / "raw.gguf")
    assert torch.equal(trace.tensor("blk.0.step.1.k_quant"), packed)
    assert torch.equal(trace.tensor("blk.0.step.1.v_quant").view(torch.uint8), fp8.view(torch.uint8))
    assert torch.equal(trace.tensor("blk.0.step.1.v_quant.scale"), bf16)


def test_tensors_with_more_than_four_dims_are_stored_in_ggmls_four(tmp_path):
    from kvlab.trace import TraceWriter

    writer = TraceWriter(tmp_path / "5d.gguf")
    codes = torch.randint(0, 256, (1, 2, 3, 8, 4), dtype=torch.uint8)  # kivi blocks [b, kv, n_blocks, tokens, bytes]
    scale = torch.randn(1, 2, 3, 1, 16).to(torch.float16)
    fp8 = torch.randn(2, 2, 3, 4, 16).to(torch.float8_e4m3fn)
    six = torch.randn(2, 1, 3, 2, 2, 32)
    writer.add_tensor("blk.0.step.1.k_quant", codes)
    writer.add_tensor("blk.0.step.1.k_quant.scale", scale)
    writer.add_tensor("blk.0.step.1.v_quant", fp8)
    writer.add_tensor("six", six)
    writer.add_tensor("six_q8", six, store="q8_0")
    writer.write()
    ne = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(tmp_path / "5d.gguf").tensors}
    assert ne["blk.0.step.1.k_quant"] == [4, 8, 3, 2]  # the innermost three kept, the outer ones merged
    assert ne["six"] == [32, 2, 2, 6]
    trace = TraceFile(tmp_path / "5d.gguf")
    assert torch.equal(trace.tensor("blk.0.step.1.k_quant"), codes)
    assert torch.equal(trace.tensor("blk.0.step.1.k_quant.scale"), scale)
    assert torch.equal(trace.tensor("blk.0.step.1.v_quant").view(torch.uint8), fp8.view(torch.uint8))
    assert torch.equal(trace.tensor("six"), six)
    q8 = trace.tensor("six_q8")
    assert q8.shape == six.shape and (q8 - six).abs().max() <= six.abs().max() / 127


def test_the_writer_checks_what_it_wrote_with_the_readers_rules(tmp_path):
    from pathlib import Path

    from kvlab.trace import TraceError
    from kvlab.trace.writer import _check_readable

    corpus = Path(__file__).parent / "corpus"
    _check_readable(corpus / "valid.gguf", tmp_path / "t.gguf")
    with pytest.raises(TraceError, match="refusing to write a trace the reader cannot read: .*truncated"):
        _check_readable(corpus / "truncated_data.gguf", tmp_path / "t.gguf")


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    from kvlab.trace import TraceWriter

    writer = TraceWriter(tmp_path / "t.gguf")
    writer.add_tensor("blk.0.step.1.q", torch.ones(1, 2, 1, 4))
    writer.add_meta("kvlab.bad", {"not": "storable"})
    with pytest.raises(ValueError, match="cannot store dict"):
        writer.write()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="ne.0.=16 is not a multiple of the q8_0 block"):
        writer.add_tensor("blk.0.step.1.k", torch.ones(1, 1, 3, 16), store="q8_0")


# ---- the command line -------------------------------------------------------------------------
def test_cli_record_then_check(cli, tmp_path):
    out = tmp_path / "cli.gguf"
    code, stdout, err = cli("trace", "record", "-m", "tiny-mistral", "--layers", "0,2", "--steps", "2",
                            "--out", out, "-q")
    assert code == 0, err
    assert "trace written" in stdout
    code, stdout, err = cli("trace", "check", out, "--json", "-")
    assert code == 0, err
    import json

    report = json.loads(stdout)
    assert report["ok"] is True
    assert {(e["layer"], e["step"], e["head"]) for e in report["entries"]} == {
        (layer, step, head) for layer in (0, 2) for step in (1, 2) for head in range(4)}
    assert set(report["entries"][0]) >= {"layer", "step", "head", "max_abs", "rel_l2", "cosine"}
    # an impossible tolerance fails the check: exit status 1, the table says which heads
    code, stdout, err = cli("trace", "check", out, "--tol", "1e-12", "--per-head", "--plot", tmp_path / "c.png")
    assert code == 1 and "FAIL" in stdout and "16 of 16 heads exceed" in stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_error_grid_puts_each_head_in_its_cell():
    from kvlab.trace import CheckReport, HeadError
    from kvlab.trace.plot import error_grid

    report = CheckReport("x.gguf", 1e-4, None, entries=[
        HeadError(0, 1, 0, 0.1, 1e-7, 1.0), HeadError(0, 1, 1, 0.1, 2e-7, 1.0), HeadError(3, 1, 1, 0.1, 0.5, 0.9)])
    grid, rows, heads = error_grid(report)
    assert rows == [(0, 1), (3, 1)] and heads == 2
    assert grid[0].tolist() == [1e-7, 2e-7] and grid[1, 1] == 0.5 and grid[1, 0] != grid[1, 0]  # NaN: not recorded
    assert [(e.layer, e.head) for e in report.failures] == [(3, 1)]


@pytest.mark.slow
def test_smollm2_trace_checks(smollm2, tmp_path):
    summary = record_trace(smollm2, smollm2.encode("The capital of France is"), layers=[0, 29], steps=2,
                           out=tmp_path / "s.gguf")
    report = check_trace(summary.path)
    assert report.ok and len(report.entries) == 2 * 2 * 9
    assert max(e.rel_l2 for e in report.entries) < 1e-5


@pytest.mark.parametrize("args, message", [
    (["trace", "record", "-m", "tiny-llama", "--layers", "7", "-o", "{tmp}/x.gguf"], "the model has layers 0..3"),
    (["trace", "record", "-m", "tiny-llama", "--layers", "a,b", "-o", "{tmp}/x.gguf"], "layer numbers like 0,5"),
    (["trace", "check", "{tmp}/missing.gguf"], "no such file"),
    (["trace", "check", "{tmp}"], "is not a file"),
    (["trace", "record", "-m", "tiny-llama", "-o", "{tmp}"], "is a folder"),
])
def test_cli_bad_input_is_one_line(cli, tmp_path, args, message):
    code, _, err = cli(*[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()
