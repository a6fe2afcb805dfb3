"""vLLM engine pieces that need no vLLM: cache layout, fp8 rounding, run specs, export, verify's verdicts."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvlab.engines import vllm as engine
from kvlab.errors import KvlabError
from kvlab.runspec import RunSpec, RunSpecError
from kvlab.scales import compressed_tensors
from kvlab.scales.scales import KVScales, ScalesError
from kvlab.scales.vllm_export import export_checkpoint
from kvlab.scales.vllm_verify import LayerCheck, check_layers

E4M3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


# ---- vLLM's CPU cache layout --------------------------------------------------------------------

def _paged(keys: torch.Tensor, values: torch.Tensor, block_size: int) -> torch.Tensor:
    """What vLLM's CPU cache write does (isa vec): per (block, head) keys transposed, then values."""
    heads, seq, dim = keys.shape
    n_blocks = -(-seq // block_size)
    pad = n_blocks * block_size - seq
    k = torch.nn.functional.pad(keys, (0, 0, 0, pad)).reshape(heads, n_blocks, block_size, dim)
    v = torch.nn.functional.pad(values, (0, 0, 0, pad)).reshape(heads, n_blocks, block_size, dim)
    k_part = k.permute(1, 0, 3, 2).reshape(n_blocks, heads, dim * block_size)  # [head_dim, block_size]
    v_part = v.permute(1, 0, 2, 3).reshape(n_blocks, heads, block_size * dim)
    return torch.cat([k_part, v_part], dim=2).reshape(n_blocks, heads, block_size, 2 * dim)


def test_cache_from_blocks_undoes_the_cpu_layout():
    keys, values = torch.randn(3, 70, 64), torch.randn(3, 70, 64)
    got_k, got_v = engine.cache_from_blocks(_paged(keys, values, 32), 70, "vec")
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)


def test_cache_from_blocks_refuses_a_layout_it_does_not_know():
    with pytest.raises(KvlabError, match="isa=amx"):
        engine.cache_from_blocks(torch.zeros(1, 1, 32, 128), 4, "amx")


# ---- fp8 rounding -------------------------------------------------------------------------------

def _toward_zero_oracle(x: torch.Tensor) -> torch.Tensor:
    """The e4m3fn code of the largest magnitude not above |x| (sign kept), by search over all codes."""
    finite = torch.isfinite(E4M3)
    out = torch.empty(x.shape, dtype=torch.uint8)
    for i, value in enumerate(x.flatten().tolist()):
        candidates = finite & (E4M3.abs() <= min(abs(value), 448.0)) & ((E4M3 >= 0) if value >= 0 else (E4M3 <= 0))
        best = torch.where(candidates, E4M3.abs(), torch.tensor(-1.0)).argmax()
        out.view(-1)[i] = int(best)
    return out


def test_quantize_toward_zero_matches_a_search_over_all_codes():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(400) * 30, torch.randn(100) * 1e-2, torch.tensor([500.0, -1000.0, 448.0, 0.3125])])
    got = engine.quantize_toward_zero(x, 1.0)
    want = _toward_zero_oracle(x)
    assert torch.equal(got.view(torch.float8_e4m3fn).float(), want.view(torch.float8_e4m3fn).float())
    scaled = engine.quantize_toward_zero(x * 0.05, 0.05)
    assert torch.equal(scaled.view(torch.float8_e4m3fn).float(), _toward_zero_oracle(x * 0.05 / 0.05)
                       .view(torch.float8_e4m3fn).float())


# ---- run specs ----------------------------------------------------------------------------------

def test_vllm_run_spec_reads_and_writes_its_own_keys():
    spec = RunSpec.parse("engine=vllm,kv_cache_dtype=fp8,scales=runs/scales")
    assert (spec.engine_name, spec.policy.spec(), spec.scales) == ("vllm", "fp8", "runs/scales")
    assert str(spec) == "engine=vllm,kv_cache_dtype=fp8,scales=runs/scales"
    assert RunSpec.parse(str(spec)) == spec
    assert str(RunSpec.parse("engine=vllm").with_defaults()) == "engine=vllm,kv_cache_dtype=auto"
    assert RunSpec.parse("engine=vllm").policy.precision == "float32"
    assert spec.policy.precision == "float8_e4m3fn" and not spec.policy.lossless


@pytest.mark.parametrize("text, message", [
    ("engine=vllm,kv_cache_dtype=int8", "kv_cache_dtype=int8 is not a vllm cache type; allowed: auto, fp8"),
    ("engine=vllm,fa=on", "fa= does not apply to engine=vllm; it takes kv_cache_dtype, scales"),
    ("engine=vllm,cache=fp8,kv_cache_dtype=fp8", "name the same setting"),
    ("engine=llama.cpp,scales=x", "scales= does not apply to engine=llama.cpp"),
    ("kv_cache_dtype=fp8", "use it with engine=vllm"),
    ("dtype=float32,scales=x", "use it with engine=vllm"),
])
def test_vllm_run_spec_errors(text, message):
    with pytest.raises(RunSpecError, match=message):
        RunSpec.parse(text)


def test_scales_need_an_fp8_cache():
    with pytest.raises(KvlabError, match="needs kv_cache_dtype=fp8"):
        engine.Settings.from_run(RunSpec.parse("engine=vllm,scales=x")).validate()


# ---- finding vLLM's Python ----------------------------------------------------------------------

def test_python_finder_order(tmp_path, monkeypatch):
    fake = tmp_path / "py"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(engine.PYTHON_ENV, str(fake))
    assert engine.find_python() == fake
    with pytest.raises(engine.EngineUnavailable, match="--engine-python .*nope: no such Python"):
        engine.find_python(tmp_path / "nope")
    monkeypatch.delenv(engine.PYTHON_ENV)
    monkeypatch.setattr(engine, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(engine.EngineUnavailable, match="make .venv-vllm"):
        engine.find_python()
    (tmp_path / ".venv-vllm" / "bin").mkdir(parents=True)
    os.link(fake, tmp_path / ".venv-vllm" / "bin" / "python")
    assert engine.find_python() == tmp_path / ".venv-vllm" / "bin" / "python"


def test_capture_cli_without_vllm_is_one_error_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(engine.PYTHON_ENV, "")  # --engine-python sets it: undone after the test
    code, out, err = cli("capture", "--engine", "vllm", "--engine-python", tmp_path / "none", "--model",
                         "smollm2", "--prompt", "hi", "--out", tmp_path / "snap")
    assert code == 2 and err.count("\n") == 1 and "no such Python" in err
    assert not (tmp_path / "snap").exists()


# ---- export -------------------------------------------------------------------------------------

N_LAYERS, N_HEADS, N_KV = 3, 8, 4


def _model(folder, sharded: bool = False):
    folder.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
              "num_key_value_heads": N_KV, "architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    weights = {f"model.layers.{i}.self_attn.k_proj.weight": torch.randn(8, 8) for i in range(N_LAYERS)}
    if sharded:
        save_file(weights, str(folder / "model-00001-of-00001.safetensors"))
        index = {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in weights}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(weights, str(folder / "model.safetensors"))
    return folder


def _scales(folder, per_head: bool = True) -> KVScales:
    heads = N_KV if per_head else 1
    scales = KVScales(tuple(torch.full((heads,), 0.01 * (i + 1)) + torch.arange(heads) * 1e-3 for i in range(N_LAYERS)),
                      tuple(torch.full((heads,), 0.002 * (i + 1)) for i in range(N_LAYERS)))
    compressed_tensors.write(folder, scales)
    return scales


def _tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("granularity", ["head", "tensor"])
def test_export_writes_what_vllm_loads(tmp_path, granularity):
    model = _model(tmp_path / "model")
    scales = _scales(tmp_path / "scales")
    result = export_checkpoint(tmp_path / "scales", model, tmp_path / "ckpt", granularity=granularity)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    block = config["quantization_config"]
    # vLLM refuses the block without quant_method; its per-head loader asserts without config_groups
    assert block["quant_method"] == "compressed-tensors" and block["config_groups"] == {}
    assert block["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "dynamic": False, "symmetric": True,
                                        "strategy": "attn_head" if granularity == "head" else "tensor"}
    tensors = _tensors(tmp_path / "ckpt" / "kv_cache_scales.safetensors")
    for i in range(N_LAYERS):
        k = tensors[f"model.layers.{i}.self_attn.k_scale"]
        if granularity == "head":
            assert k.shape == (N_KV, 1, 1) and torch.equal(k.flatten(), scales.keys[i])
        else:
            assert k.shape == (1,) and k.item() == scales.keys[i].max().item()
    assert os.path.samefile(tmp_path / "ckpt" / "model.safetensors", model / "model.safetensors")
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file() and result.linked
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_adds_the_scales_to_a_sharded_models_index(tmp_path):
    model = _model(tmp_path / "model", sharded=True)
    _scales(tmp_path / "scales")
    export_checkpoint(tmp_path / "scales", model, tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.2.self_attn.v_scale"] == "kv_cache_scales.safetensors"
    assert "model.layers.2.self_attn.v_scale" not in json.loads(
        (model / "model.safetensors.index.json").read_text())["weight_map"]


def test_export_refusals_leave_nothing(tmp_path):
    model = _model(tmp_path / "model")
    _scales(tmp_path / "scales", per_head=False)
    with pytest.raises(ScalesError, match="--granularity head needs per-head scales"):
        export_checkpoint(tmp_path / "scales", model, tmp_path / "ckpt", granularity="head")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ScalesError, match="already has a quantization_config"):
        export_checkpoint(tmp_path / "scales", model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "scales"]


def test_export_cli(cli, tmp_path):
    model = _model(tmp_path / "model")
    _scales(tmp_path / "scales")
    code, out, err = cli("scales", "export", tmp_path / "scales", "--into", model, "--out", tmp_path / "ckpt",
                         "--granularity", "tensor", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["quantization_config"]["kv_cache_scheme"]["strategy"] == "tensor"
    code, out, err = cli("scales", "export", tmp_path / "missing", "--into", model, "--out", tmp_path / "c2")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1


# ---- verify's verdicts --------------------------------------------------------------------------

def _layer(inputs: torch.Tensor, used: float, loaded: list[float]) -> engine.LayerCache:
    codes = engine.quantize_toward_zero(inputs, used)
    return engine.LayerCache(engine.decode_fp8(codes, used), engine.decode_fp8(codes, used), inputs, inputs,
                             codes, codes, used, used, loaded, loaded)


def test_verify_tells_the_checkpoints_scale_from_the_fallback_and_a_bad_range():
    torch.manual_seed(1)
    x = torch.randn(3, 40, 64)
    right = float(x.abs().max()) / 448
    scales = KVScales((torch.tensor([right]), torch.tensor([right]), torch.tensor([4 * right])),
                      (torch.tensor([right]), torch.tensor([right]), torch.tensor([4 * right])))
    layers = [_layer(x, right, [right]), _layer(x, 1.0, [right]), _layer(x, 4 * right, [4 * right])]
    checks: list[LayerCheck] = check_layers(scales, layers)
    assert [c.status for c in checks] == ["checkpoint", "fallback 1.0", "range"]
    assert checks[2].k.range_use == pytest.approx(0.25, rel=1e-6)
    assert checks[0].k.fitted == pytest.approx(right, rel=0.05)


def test_only_an_engine_with_its_own_arithmetic_takes_the_engine_tolerance():
    """llama.cpp multiplies GGUF weights with 8-bit activations; vLLM runs transformers' float weights in
    the same dtype, so its auto cache is held to the dtype's tolerance (it agrees to 3e-6 in float32)."""
    from kvlab.compare.tolerance import tolerance_for
    from kvlab.engines import LLAMA_CPP, VLLM, own_arithmetic

    assert own_arithmetic(LLAMA_CPP) and not own_arithmetic(VLLM) and not own_arithmetic("transformers")
    assert tolerance_for(["float32", "float32"], False, other_arithmetic=own_arithmetic(VLLM)).rel_l2 == 1e-4
    assert tolerance_for(["float32", "float16"], False, other_arithmetic=own_arithmetic(LLAMA_CPP)).rel_l2 == 0.25
