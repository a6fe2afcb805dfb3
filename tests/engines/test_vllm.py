"""vLLM as a test engine, run for real (its own Python; skipped where it is missing).

Few vLLM starts (each tens of seconds): one `kvlab diff` with an auto and an fp8 vLLM test run,
one greedy `kvlab capture`, one fp8 run on a checkpoint with a planted x4 layer (read through the
Python API, so its codes and inputs serve several checks), and two `kvlab scales verify` runs on
checkpoints whose scales vLLM drops or refuses.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvlab.engines import vllm as engine

pytestmark = [
    pytest.mark.engine,
    pytest.mark.slow,
    pytest.mark.skipif(not engine.available(), reason="vLLM's Python not found (make .venv-vllm, or set "
                                                      "KVLAB_VLLM_PYTHON)"),
]

PROMPT = "What is the capital of France?"
PLANTED_LAYER = 7


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from kvlab import embedded

    return embedded.ensure_converted()


@pytest.fixture(scope="module")
def scales_dir(work, smollm2) -> Path:
    """kvlab's per-head calibration of smollm2 (compressed-tensors files)."""
    from kvlab.scales.api import calibrate_to_files

    calibrate_to_files(smollm2, work / "scales", samples=2, seq_len=128, granularity="head", fmt="compressed-tensors")
    return work / "scales"


@pytest.fixture(scope="module")
def tensor_checkpoint(work, scales_dir, model_dir) -> Path:
    from kvlab.scales.vllm_export import export_checkpoint

    return export_checkpoint(scales_dir, model_dir, work / "ckpt-tensor", granularity="tensor").path


@pytest.fixture(scope="module")
def head_checkpoint(work, scales_dir, model_dir) -> Path:
    from kvlab.scales.vllm_export import export_checkpoint

    return export_checkpoint(scales_dir, model_dir, work / "ckpt-head", granularity="head").path


@pytest.fixture(scope="module")
def study(work, tensor_checkpoint):
    """`kvlab diff`: float32 golden, vLLM auto and vLLM fp8 with kvlab's scales, teacher-forced."""
    from kvlab.cli import main

    code = main(["diff", "--model", "smollm2", "--chat", "--prompt", PROMPT, "--golden", "dtype=float32",
                 "--test", "engine=vllm", "--test", f"engine=vllm,kv_cache_dtype=fp8,scales={tensor_checkpoint}",
                 "-n", "12", "--ignore-eos", "--out", str(work / "study"), "--json", str(work / "study.json"),
                 "--quiet"])
    assert code == 0
    return json.loads((work / "study.json").read_text())


def _snapshot(work: Path, i: int):
    from kvlab.snapshot import Snapshot

    (path,) = (work / "study").glob(f"test{i}-*")
    return Snapshot.load(path)


def test_vllm_auto_cache_equals_the_float32_golden(study, work):
    """Both float32, the same weights: rows agree to float32 rounding (measured <= 3e-6 per layer)."""
    auto = study["tests"][0]
    assert auto["first_divergence"] is None and auto["tolerance"]["rel_l2"] == 1e-4
    for layer in auto["layers"]:
        assert layer["keys"]["rel_l2"] < 1e-5 and layer["values"]["rel_l2"] < 1e-5
    assert max(auto["positions"]["keys"]["rel_l2_max"] + auto["positions"]["values"]["rel_l2_max"]) < 1e-4
    assert auto["logits"]["kl_mean"] < 1e-8 and auto["logits"]["top1_agreement"] == 1.0
    assert auto["diagnosis"]["kind"] == "engine:precision" and "vllm" in auto["diagnosis"]["text"]
    snap = _snapshot(work, 1)
    assert snap.meta["engine"]["name"] == "vllm" and snap.meta["engine"]["version"] == engine.PINNED_VERSION
    assert snap.keys(0).shape == (1, 3, len(snap.token_ids) - 1, 64) and snap.keys(0).dtype == torch.float32


def test_vllm_fp8_cache_against_the_golden(study, work, tensor_checkpoint):
    """e4m3 rounded toward zero: at most one e4m3 step (1/8 relative) per element, so layers stay
    within 0.2 rel-L2 (measured 0.09 K, 0.15 V) and no row passes the lossy tolerance."""
    fp8 = study["tests"][1]
    assert fp8["first_divergence"] is None
    for layer in fp8["layers"]:
        assert layer["keys"]["rel_l2"] < 0.2 and layer["values"]["rel_l2"] < 0.2
        assert layer["keys"]["rel_l2"] > 1e-3  # really quantized
    assert fp8["logits"]["kl_mean"] < 0.05
    text = fp8["diagnosis"]["text"]
    assert fp8["diagnosis"]["kind"].startswith("engine:") and "fp8 rows" in text and str(tensor_checkpoint) in text
    snap = _snapshot(work, 2)
    expected = load_file(str(tensor_checkpoint / "kv_cache_scales.safetensors"))
    for i in (0, 15, 29):
        scale = snap.tensor(f"layers.{i}.keys.scale")
        assert scale.item() == expected[f"model.layers.{i}.self_attn.k_scale"].item()  # bit for bit
        codes = snap.tensor(f"layers.{i}.keys.q")
        assert codes.dtype == torch.uint8
        assert torch.equal(snap.keys(i), codes.view(torch.float8_e4m3fn).float() * scale)


def test_greedy_capture_cli(cli, work, study):
    """Left alone, vLLM in float32 writes the golden's greedy tokens."""
    golden = json.loads((work / "study" / "golden" / "meta.json").read_text())
    code, out, err = cli("capture", "--engine", "vllm", "--model", "smollm2", "--chat", "--prompt", PROMPT,
                         "-n", "6", "--out", work / "greedy", "--json", "-", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["engine"]["name"] == "vllm" and not summary["teacher_forced"]
    meta = json.loads((work / "greedy" / "meta.json").read_text())
    assert meta["token_ids"] == golden["token_ids"][: len(meta["token_ids"])]
    assert meta["greedy_ids"] == meta["token_ids"][meta["n_prompt"]:]


@pytest.fixture(scope="module")
def planted(work, head_checkpoint, study):
    """A per-head checkpoint with layer 7's scales x4, run by vLLM fp8 on the golden tokens."""
    from kvlab.engines.vllm import Settings, read_layers, run_worker

    target = work / "ckpt-x4"
    _copy_checkpoint(head_checkpoint, target)
    tensors = load_file(str(head_checkpoint / "kv_cache_scales.safetensors"))
    for which in ("k", "v"):
        name = f"model.layers.{PLANTED_LAYER}.self_attn.{which}_scale"
        tensors[name] = tensors[name] * 4
    save_file(tensors, str(target / "kv_cache_scales.safetensors"))
    golden = json.loads((work / "study" / "golden" / "meta.json").read_text())
    ids, n_prompt = golden["token_ids"], golden["n_prompt"]
    run = run_worker(target, ids[:n_prompt], ids[n_prompt:], Settings("fp8"), work / "x4-run")
    return target, read_layers(run, len(ids) - 1)


def _copy_checkpoint(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    target.mkdir()
    for path in source.iterdir():
        if path.name in skip:
            continue
        (os.link if path.name == "model.safetensors" else shutil.copy)(path, target / path.name)


def test_per_head_scales_load_and_the_codes_are_vllms_rounding_of_its_inputs(planted):
    """vLLM loads per-head scales bit for bit; its CPU kernel quantizes with the largest of them,
    rounding toward zero: every code equals that rounding of the K/V the layer was given."""
    from kvlab.scales.files import load_scales

    checkpoint, layers = planted
    scales = load_scales(checkpoint, n_layers=30, n_heads=9, n_kv_heads=3)
    for i, layer in enumerate(layers):
        assert layer.k_scale_loaded == scales.keys[i].tolist() and layer.v_scale_loaded == scales.values[i].tolist()
        assert layer.k_scale_used == max(scales.keys[i].tolist())
        assert torch.equal(layer.key_codes, engine.quantize_toward_zero(layer.key_inputs, layer.k_scale_used))
        assert torch.equal(layer.value_codes, engine.quantize_toward_zero(layer.value_inputs, layer.v_scale_used))


def test_vllm_codes_against_kvlabs_fp8_quantization(planted):
    """kvlab's fp8 rounds to nearest: under the same scale a code differs from vLLM's by at most one
    step, and only where rounding to nearest went away from zero."""
    from kvlab.quant.fp8 import quantize

    _, layers = planted
    for layer in layers:
        for inputs, codes, scale in ((layer.key_inputs, layer.key_codes, layer.k_scale_used),
                                     (layer.value_inputs, layer.value_codes, layer.v_scale_used)):
            nearest = quantize(inputs, scale).view(torch.uint8)
            steps = (nearest & 0x7F).int() - (codes & 0x7F).int()
            assert steps.min() >= 0 and steps.max() <= 1
            away = nearest.view(torch.float8_e4m3fn).float().abs() > (inputs / scale).abs()
            assert torch.equal(steps == 1, away)


def test_verify_catches_the_x4_layer(planted):
    from kvlab.scales.files import load_scales
    from kvlab.scales.vllm_verify import check_layers

    checkpoint, layers = planted
    checks = check_layers(load_scales(checkpoint, n_layers=30, n_heads=9, n_kv_heads=3), layers)
    assert [c.layer for c in checks if not c.ok] == [PLANTED_LAYER]
    assert checks[PLANTED_LAYER].status == "range" and checks[PLANTED_LAYER].k.range_use < 0.4


def test_verify_cli_catches_dropped_scales(cli, work, tensor_checkpoint, model_dir):
    """A stale weight index that does not name the scale file: vLLM skips the file and runs at 1.0."""
    from safetensors import safe_open

    dropped = work / "ckpt-dropped"
    _copy_checkpoint(tensor_checkpoint, dropped)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())  # noqa: SIM118
    (dropped / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}))
    code, out, err = cli("scales", "verify", dropped, "--tokens", "64", "--json", "-")
    assert code == 2 and "fallback 1.0" in err and err.count("\n") == 1
    report = json.loads(out)
    assert not report["ok"] and {layer["status"] for layer in report["layers"]} == {"fallback 1.0"}
    assert all(layer["k"]["used"] == 1.0 and layer["k"]["match_one"] == 1.0 for layer in report["layers"])


def test_verify_cli_wrong_tensor_names(cli, work, tensor_checkpoint):
    """Scale tensors under another prefix: today's vLLM refuses to load them (one error line)."""
    wrong = work / "ckpt-wrong-names"
    _copy_checkpoint(tensor_checkpoint, wrong, skip=("kv_cache_scales.safetensors",))
    tensors = load_file(str(tensor_checkpoint / "kv_cache_scales.safetensors"))
    save_file({n.replace("model.layers.", "model.decoder.layers."): t for n, t in tensors.items()},
              str(wrong / "kv_cache_scales.safetensors"))
    code, out, err = cli("scales", "verify", wrong, "--tokens", "32")
    assert code == 2 and err.count("\n") == 1 and "decoder" in err
