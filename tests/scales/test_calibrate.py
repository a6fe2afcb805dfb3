import json

import pytest
import torch
from safetensors import safe_open
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvlab.quant.fp8 import FP8_MAX
from kvlab.scales.calibrate import calibrate, calibration_samples
from tests.conftest import tiny


def direct_amax(loaded, samples):
    """K/V amax per layer and KV head, computed from the projections and RoPE, without any cache."""
    model = loaded.model
    cfg = model.config
    n_kv, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for which in ("k", "v"):
            proj = getattr(layer.self_attn, f"{which}_proj")
            hooks.append(proj.register_forward_hook(
                lambda mod, args, out, key=(i, which): captured.__setitem__(key, out.detach())))
    k_amax = [torch.zeros(n_kv) for _ in model.model.layers]
    v_amax = [torch.zeros(n_kv) for _ in model.model.layers]
    try:
        with torch.no_grad():
            for ids in samples:
                x = torch.tensor([ids])
                model(input_ids=x, use_cache=False)
                positions = torch.arange(len(ids)).unsqueeze(0)
                cos, sin = model.model.rotary_emb(model.model.embed_tokens(x), positions)
                for i in range(len(model.model.layers)):
                    k = captured[i, "k"].view(1, len(ids), n_kv, head_dim).transpose(1, 2)
                    v = captured[i, "v"].view(1, len(ids), n_kv, head_dim).transpose(1, 2)
                    k = apply_rotary_pos_emb(k, k, cos, sin)[0]
                    k_amax[i] = torch.maximum(k_amax[i], k.abs().amax(dim=(0, 2, 3)))
                    v_amax[i] = torch.maximum(v_amax[i], v.abs().amax(dim=(0, 2, 3)))
    finally:
        for hook in hooks:
            hook.remove()
    return k_amax, v_amax


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_amax_matches_a_direct_computation_over_the_same_text(name):
    loaded = tiny(name)
    cal = calibrate(loaded, samples=3, seq_len=96)
    samples, _ = calibration_samples(loaded, samples=3, seq_len=96)
    assert cal.n_samples == 3 and cal.n_tokens == sum(map(len, samples)) and all(len(s) <= 96 for s in samples)
    k_ref, v_ref = direct_amax(loaded, samples)
    for i in range(len(k_ref)):
        torch.testing.assert_close(cal.key_amax[i], k_ref[i], rtol=1e-6, atol=0)
        torch.testing.assert_close(cal.value_amax[i], v_ref[i], rtol=1e-6, atol=0)
    per_head = cal.scales("head", "e4m3fn")
    per_tensor = cal.scales("tensor", "e5m2")
    for i in range(len(k_ref)):
        torch.testing.assert_close(per_head.keys[i], k_ref[i] / 448.0)
        torch.testing.assert_close(per_tensor.values[i], v_ref[i].amax().reshape(1) / FP8_MAX["e5m2"])


def test_samples_from_a_data_file_are_consecutive_windows(tmp_path):
    loaded = tiny("tiny-llama")
    text = " ".join(f"Sentence number {i} is here." for i in range(200))
    (tmp_path / "cal.txt").write_text(text)
    samples, source = calibration_samples(loaded, tmp_path / "cal.txt", samples=3, seq_len=64, chat=False)
    decoded = [loaded.tokenizer.decode(s) for s in samples]
    assert source == str(tmp_path / "cal.txt") and len(samples) == 3
    assert decoded[0].startswith("Sentence number 0 is here.") and "Sentence number 1 " in decoded[0]
    assert text.startswith(" ".join(decoded).replace("  ", " ")[:150])
    few, _ = calibration_samples(loaded, tmp_path / "cal.txt", samples=500, seq_len=64, chat=False)
    assert 50 < len(few) < 500  # the file runs out before 500 windows


def test_calibrate_cli_writes_both_formats_that_reload_exactly(cli, tmp_path):
    code, out, err = cli("scales", "calibrate", "-m", "tiny-llama", "--samples", "2", "--seq-len", "64",
                         "--granularity", "head", "--tp", "2", "--out", tmp_path / "s", "--json", tmp_path / "c.json",
                         "-q")
    assert code == 0, err
    summary = json.loads((tmp_path / "c.json").read_text())
    k_amax = [torch.tensor(layer["key_amax"]) for layer in summary["layers"]]
    v_amax = [torch.tensor(layer["value_amax"]) for layer in summary["layers"]]
    with safe_open(str(tmp_path / "s" / "kv_cache_scales.safetensors"), "pt") as f:
        assert f.metadata()["kvlab.fp8_format"] == "e4m3fn"
        for i in range(4):
            k, v = f.get_tensor(f"model.layers.{i}.self_attn.k_scale"), f.get_tensor(f"model.layers.{i}.self_attn.v_scale")
            assert k.shape == (2, 1, 1) and v.shape == (2, 1, 1)
            torch.testing.assert_close(k.reshape(-1), k_amax[i] / 448.0)
            torch.testing.assert_close(v.reshape(-1), v_amax[i] / 448.0)
    scheme = json.loads((tmp_path / "s" / "kv_cache_scheme.json").read_text())["kv_cache_scheme"]
    assert scheme == {"num_bits": 8, "type": "float", "strategy": "attn_head", "dynamic": False, "symmetric": True}
    factors = json.loads((tmp_path / "s" / "kv_cache_scales.json").read_text())["kv_cache"]["scaling_factor"]
    # tiny-llama: 2 KV heads on tp=2 -> rank r holds head r; one scale for K and V
    for r in range(2):
        for i in range(4):
            want = float(torch.maximum(k_amax[i][r], v_amax[i][r]) / 448.0)
            assert factors[str(r)][str(i)] == pytest.approx(want, rel=1e-6)
    code, out, err = cli("scales", "check", tmp_path / "s" / "kv_cache_scales.json", "-m", "tiny-llama", "--tp", "2")
    assert code == 0 and "valid under vLLM's schema" in out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--fp8", "e5m2", "--format", "vllm"], "float8_e4m3fn scales only"),
        (["--fp8", "e5m2", "--format", "compressed-tensors"], "cannot say e5m2"),
        (["--fp8", "e4m3fnuz", "--format", "compressed-tensors"], "cannot say e4m3fnuz"),
        (["--fp8", "e4m3fnuz"], "float8_e4m3fn scales only"),
        (["--data", "{tmp}/missing.txt"], "does not exist"),
        (["--model", "nope"], "unknown model"),
        (["--granularity", "channel"], "Invalid value for '--granularity'"),
    ],
)
def test_calibrate_errors(cli, tmp_path, args, fragment):
    code, _, err = cli("scales", "calibrate", "-m", "tiny-llama", "--samples", "1", "--seq-len", "32",
                       "--out", tmp_path / "o", "-q", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert not (tmp_path / "o" / "kv_cache_scales.json").exists()
    assert not (tmp_path / "o" / "kv_cache_scales.safetensors").exists()


def test_calibrate_for_a_tp_vllm_cannot_run_warns_with_the_reason(cli, tmp_path):
    """tiny-llama has 4 heads and 2 KV heads: kvlab's layouts fold to tp 3 (convert-to-MHA), vLLM refuses it."""
    code, out, err = cli("scales", "calibrate", "-m", "tiny-llama", "--samples", "1", "--seq-len", "32",
                         "--tp", "3", "--out", tmp_path / "o", "-q", "--json", tmp_path / "c.json")
    assert code == 0, err
    warning = ("warning: kv_cache_scales.json for tp 3, but vLLM refuses tp 3 for this model: "
               "tp must divide the 4 attention heads")
    assert [line for line in err.splitlines() if line.strip()][0].startswith(warning)
    assert json.loads((tmp_path / "c.json").read_text())["warnings"][0].startswith(warning.removeprefix("warning: "))
    code, out, _ = cli("scales", "check", tmp_path / "o" / "kv_cache_scales.json", "-m", "tiny-llama")
    assert code == 2 and "vLLM refuses tp 3" in out
    code, _, err = cli("scales", "calibrate", "-m", "tiny-llama", "--samples", "1", "--seq-len", "32",
                       "--tp", "2", "--out", tmp_path / "o2", "-q")
    assert code == 0 and "warning" not in err
