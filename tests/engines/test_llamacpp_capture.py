"""llama.cpp as a test engine, against the transformers golden on the default model (same GGUF weights)."""

import json

import numpy as np
import pytest
import torch

from kvlab.compare.diff import diff_snapshots
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot
from tests.engines.helpers import need_llama_cpp

pytestmark = [pytest.mark.engine, pytest.mark.slow]
PROMPT = "What is the capital of France?"
STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The float32 golden and llama.cpp runs teacher-forced on it, saved and reopened."""
    need_llama_cpp()
    from kvlab.capture import capture as hf_capture
    from kvlab.engines.llamacpp import capture, resolve_model
    from kvlab.models import load_model

    root = tmp_path_factory.mktemp("engine")
    loaded = load_model("smollm2")
    golden = hf_capture(loaded, loaded.encode(PROMPT, chat=True), "dtype=float32", max_new_tokens=STEPS,
                        stop_at_eos=False)
    golden.save(root / "golden")
    golden = Snapshot.load(root / "golden")
    model = resolve_model("smollm2")
    out = {"golden": golden, "model": model, "root": root}
    for name, run in [("f16", "cache=f16"), ("q8_0", "cache=q8_0"), ("q4_0", "cache=q4_0"),
                      ("noflash", "cache=f16,fa=off"), ("rope", "rope_base=1000")]:
        capture(model, None, RunSpec.parse(f"engine=llama.cpp,{run}"), force=golden).save(root / name)
        out[name] = Snapshot.load(root / name)
    return out


def test_f16_cache_follows_the_golden_within_the_engine_tolerance(runs):
    result = diff_snapshots(runs["golden"], runs["f16"])
    assert result.first_divergence is None and result.tolerance.rel_l2 == 0.25
    assert result.diagnosis.kind == "engine:precision"
    total_k, total_v = result.cache.total_errors("keys"), result.cache.total_errors("values")
    # measured: K 0.015, V 0.041 (transformers' own bfloat16 run: 0.009 / 0.023, float16 0.001 / 0.003)
    assert total_k.rel_l2 < 0.03 and total_v.rel_l2 < 0.06
    assert result.cache.layer_errors("values")[0].cosine > 0.999  # same weights, same layout
    assert result.logits.top1_agreement >= 0.75
    f16 = runs["f16"]
    assert f16.keys(0).dtype == torch.float16 and f16.keys(0).shape == runs["golden"].keys(0).shape
    assert not any(name.endswith(".q") for name in f16.tensor_names())


def test_cache_types_order_f16_q8_0_q4_0_overall_and_in_the_layers(runs):
    results = {name: diff_snapshots(runs["golden"], runs[name]) for name in ("f16", "q8_0", "q4_0")}
    for tensor in ("keys", "values"):
        totals = [results[n].cache.total_errors(tensor).rel_l2 for n in ("f16", "q8_0", "q4_0")]
        assert totals[0] < totals[1] < totals[2], (tensor, totals)
        f16 = results["f16"].cache.layer_errors(tensor)
        q4 = results["q4_0"].cache.layer_errors(tensor)
        assert all(b.rel_l2 > 2 * a.rel_l2 for a, b in zip(f16, q4)), tensor  # a cache type change, every layer


def test_raw_blocks_are_llamas_own_and_dequantize_to_the_stored_cache(runs):
    import gguf
    from gguf import quants

    from kvlab.engines.ggml_rows import deinterleave, unrotate

    for name, qtype in (("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0)):
        snap = runs[name]
        cache = snap.meta["engine"]["cache"]
        assert cache["k_type"] == name and cache["k_rotated"] and cache["v_rotated"]
        for layer in (0, 29):
            for which in ("keys", "values"):
                raw = snap.tensor(f"layers.{layer}.{which}.q")  # [1, kv_heads, seq, bytes]
                assert raw.dtype == torch.uint8 and raw.shape[:3] == snap.keys(layer).shape[:3]
                values = quants.dequantize(raw.numpy(), qtype)  # [1, kv_heads, seq, head_dim]
                values = torch.from_numpy(unrotate(values.reshape(-1, 64)).reshape(values.shape))
                if which == "keys":
                    values = deinterleave(values)
                assert torch.allclose(values, snap.tensor(f"layers.{layer}.{which}"), atol=1e-6)


def test_meta_records_the_engine_and_its_settings(runs):
    meta = runs["q8_0"].meta
    engine = meta["engine"]
    assert engine["name"] == "llama.cpp" and engine["version"] == "0.3.36" and engine["use_extra_bufts"] is False
    assert engine["settings"]["cache"] == "q8_0" and engine["settings"]["flash_attn"] is True
    assert engine["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert meta["run"] == "engine=llama.cpp,cache=q8_0,fa=on"
    assert meta["model"]["fingerprint"] == runs["golden"].model["fingerprint"]
    assert meta["token_ids"] == runs["golden"].token_ids and meta["teacher_forced"]
    assert runs["q8_0"].logits().shape == runs["golden"].logits().shape


def test_without_flash_attention_the_transposed_v_cache_reads_the_same(runs):
    on, off = runs["f16"], runs["noflash"]
    assert off.meta["engine"]["cache"]["v_transposed"] and not on.meta["engine"]["cache"]["v_transposed"]
    # layer 0's K and V are computed before any attention: the same numbers whatever the V layout
    assert torch.equal(on.keys(0), off.keys(0)) and torch.equal(on.values(0), off.values(0))
    later = diff_snapshots(on, off)
    assert later.cache.total_errors("values").rel_l2 < 0.05


def test_a_wrong_rope_base_is_a_first_divergence_in_layer_0_keys_with_values_clean(runs):
    result = diff_snapshots(runs["golden"], runs["rope"])
    first = result.first_divergence
    assert (first.layer, first.tensor) == (0, "keys")
    assert first.position > 0  # position 0 is not rotated at all
    tol = result.tolerance.rel_l2
    assert float(result.cache.maps["values"]["rel_l2"][0].max()) < tol  # layer 0 values clean
    assert result.diagnosis.kind == "engine:rope" and "RoPE" in result.diagnosis.text
    assert first.worst is not None and first.worst.layer > 0  # by then deeper layers are off more


def test_greedy_capture_follows_llamas_own_choices(runs):
    from kvlab.engines.llamacpp import capture

    snap = capture(runs["model"], runs["golden"].token_ids[:runs["golden"].n_prompt],
                   RunSpec.parse("engine=llama.cpp,cache=q8_0"),
                   max_new_tokens=4, stop_at_eos=False)
    assert snap.token_ids[snap.n_prompt:] == snap.greedy_ids and len(snap.greedy_ids) == 4
    assert not snap.meta["teacher_forced"]
    assert np.argmax(snap.logits()[0].numpy()) == snap.greedy_ids[0]


def test_cli_capture_and_diff_take_the_engine(runs, cli, tmp_path):
    golden = runs["root"] / "golden"
    code, out, err = cli("capture", "--engine", "llama.cpp", "--model", "smollm2", "--run", "cache=q4_0",
                         "--force-tokens", golden, "--out", tmp_path / "q4", "-q")
    assert code == 0, err
    assert "llama.cpp K q4_0" in out
    q4 = Snapshot.load(tmp_path / "q4")
    assert q4.meta["engine"]["settings"]["cache"] == "q4_0"
    # the bytes llama.cpp's q4_0 cache held (raw blocks), not the float32 view kvlab dequantized
    view = sum(q4.keys(i).nbytes + q4.values(i).nbytes for i in range(q4.n_layers))
    assert "held (dequantized view" in out and q4.cache_nbytes() < view / 4
    code, out, err = cli("diff", golden, tmp_path / "q4", "--json", tmp_path / "d.json", "-q")
    assert code == 0, err
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["tests"][0]["diagnosis"]["kind"].startswith("engine:")
    assert data["tests"][0]["label"] == "engine=llama.cpp,cache=q4_0,fa=on"
    code, out, err = cli("capture", "--engine", "llama.cpp", "--run", "dtype=float16", "--prompt", "x",
                         "--out", tmp_path / "bad", "-q")
    assert code == 2 and "dtype= does not apply to engine=llama.cpp" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("run", ["cache=q8_0", "cache=q4_0", "cache=f16,fa=off"])
def test_traces_recorded_from_llama_cpp_pass_the_check(run, cli, tmp_path):
    need_llama_cpp()
    path = tmp_path / "t.gguf"
    code, out, err = cli("trace", "record", "--engine", "llama.cpp", "--model", "smollm2", "--layers", "0,5",
                         "--steps", "2", "--prefill", "--run", run, "--out", path, "-q")
    assert code == 0, err
    code, out, err = cli("trace", "check", path, "--json", tmp_path / "c.json", "-q")
    assert code == 0, out + err
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["ok"] and data["rounding"] == "ggml-cpu" and len(data["entries"]) == 2 * 3 * 9
    assert max(e["rel_l2"] for e in data["entries"]) < 1e-4


def test_diff_captures_engine_test_runs_teacher_forced_on_the_golden(cli, tmp_path):
    need_llama_cpp()
    code, out, err = cli("diff", "--model", "smollm2", "--prompt", "The capital of France is", "-n", "4",
                         "--ignore-eos", "--test", "engine=llama.cpp,cache=q8_0", "--test", "dtype=float16",
                         "--json", tmp_path / "d.json", "-q")
    assert code == 0, err
    data = json.loads((tmp_path / "d.json").read_text())
    engine, half = data["tests"]
    assert engine["run"] == "engine=llama.cpp,cache=q8_0,fa=on" and engine["diagnosis"]["kind"] == "engine:precision"
    assert engine["tolerance"]["rel_l2"] == 0.5 and half["run"].startswith("dtype=float16")
    assert data["n_tokens"] == data["n_prompt"] + 4
