import json

import pytest
import torch
from safetensors.torch import save_file

from kvlab.scales.extract import extract
from kvlab.scales.rank_heads import heads_of_rank
from kvlab.scales.scales import ScalesError
from tests.scales.checkpoints import ammo_scale, write_ammo, write_hf


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "pt"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ammo_extracted_exactly(tmp_path, fmt, tp):
    name = "llama_tp{tp}_rank{r}" if fmt == "npz" else "rank{r}"
    folder = write_ammo(tmp_path / "ckpt", tp, n_layers=3, fmt=fmt, name=name)
    found = extract(folder, load_format=fmt)
    assert found.kind == "ammo" and found.model_type == "llama" and found.tp == tp
    assert found.ranks == {r: {i: ammo_scale(r, i) for i in range(3)} for r in range(tp)}
    assert extract(folder).ranks == found.ranks  # auto finds the same files


def test_rank_comes_from_the_file_name_not_the_folder(tmp_path):
    folder = write_ammo(tmp_path / "rank3", 1, ranks=[0])  # folder "rank3" holding rank0.safetensors
    assert extract(folder).ranks == {0: {i: ammo_scale(0, i) for i in range(3)}}
    other = write_ammo(tmp_path / "rank7" / "export", 2, name="part_rank{r}")
    assert sorted(extract(other).ranks) == [0, 1]


def test_lone_file_without_rank_is_rank_zero_and_json_is_optional(tmp_path):
    folder = write_ammo(tmp_path / "c", 1, name="model", json_tp=None)
    (tmp_path / "c" / "config.json").unlink()
    found = extract(folder)
    assert found.ranks == {0: {i: ammo_scale(0, i) for i in range(3)}} and found.model_type is None


def test_tp_size_from_trtllm_mapping(tmp_path):
    folder = write_ammo(tmp_path / "c", 2, json_tp=None)
    (folder / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM", "mapping": {"tp_size": 4}}))
    with pytest.raises(ScalesError, match="no file for rank"):
        extract(folder)


@pytest.mark.parametrize("naming", ["compressed-tensors", "output_scale", "modelopt"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_hf_checkpoints_extracted_exactly(tmp_path, naming, per_head, tp):
    keys, values = write_hf(tmp_path / "hf", naming, n_layers=3, n_heads=8, n_kv=4, per_head=per_head)
    found = extract(tmp_path / "hf", tp_size=tp)
    assert found.tp == tp and found.model_type == "llama"
    assert found.kind == {"compressed-tensors": "compressed-tensors",
                          "output_scale": "compressed-tensors (output_scale)", "modelopt": "modelopt"}[naming]
    # separate K and V scales, exactly as stored
    assert [k.tolist() for k in found.scales.keys] == [k.tolist() for k in keys]
    assert [v.tolist() for v in found.scales.values] == [v.tolist() for v in values]
    # vLLM: per rank and layer, the largest K or V scale of the heads the rank holds
    for rank, held in enumerate(heads_of_rank(tp, 8, 4)):
        for i in range(3):
            both = torch.maximum(keys[i].expand(4), values[i].expand(4))
            assert found.ranks[rank][i] == float(both[held].max())


def test_hf_per_head_needs_the_config_to_fold(tmp_path):
    write_hf(tmp_path / "hf", per_head=True, config=False)
    assert extract(tmp_path / "hf").tp == 1
    with pytest.raises(ScalesError, match="num_key_value_heads"):
        extract(tmp_path / "hf", tp_size=2)


def test_all_ones_is_noted(tmp_path):
    folder = tmp_path / "mo"
    folder.mkdir()
    save_file({f"model.layers.{i}.self_attn.{p}_proj.{p}_scale": torch.ones(1) for i in range(2) for p in "kv"},
              str(folder / "model.safetensors"))
    found = extract(folder)
    assert found.kind == "modelopt" and "1.0" in found.notes[0]


# ---- every error case -----------------------------------------------------------------------
def _errors():
    def missing_rank(p):
        write_ammo(p, 4, ranks=[0, 1, 3])
        return [], "no file for rank(s) 2"

    def duplicate_rank(p):
        write_ammo(p, 2)
        write_ammo(p, 1, name="copy_rank{r}", json_tp=2)
        return [], "both tensor-parallel rank 0"

    def duplicate_layer(p):
        write_ammo(p, 1, extra={"transformer.layers.1.mlp.kv_cache_scaling_factor": torch.tensor([1.0])})
        return [], "two scales for layer 1"

    def tp_mismatch_flag(p):
        write_ammo(p, 2)
        return ["--tp-size", "4"], "--tp-size 4 but the checkpoint's JSON says tp size 2"

    def tp_mismatch_files(p):
        write_ammo(p, 4, json_tp=2)
        return [], "tp size is 2 but found files for rank(s) 2, 3"

    def non_scalar(p):
        write_ammo(p, 1, extra={"transformer.layers.9.attention.kv_cache_scaling_factor": torch.ones(2)})
        return [], "AMMO KV scales must be scalars"

    def none_at_all(p):
        p.mkdir()
        save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)}, str(p / "model.safetensors"))
        return [], "no KV cache scales"

    def no_tensor_files(p):
        p.mkdir()
        (p / "config.json").write_text("{}")
        return [], "no tensor files"

    def missing_layer(p):
        write_ammo(p, 2, scale=ammo_scale)
        save_file({"transformer.layers.0.attention.kv_cache_scaling_factor": torch.tensor([0.5])},
                  str(p / "rank1.safetensors"))
        return [], "rank 1 has no scale for layer(s) 1, 2"

    def rank_not_in_name(p):
        write_ammo(p, 2, name="shard{r}")
        return [], "cannot tell the tensor-parallel rank of shard0.safetensors"

    def ambiguous_layer(p):
        write_ammo(p, 1, extra={"transformer.layers.1.experts.2.kv_cache_scaling_factor": torch.tensor([1.0])})
        return [], "cannot tell the layer"

    def k_without_v(p):
        p.mkdir()
        save_file({"model.layers.0.self_attn.k_scale": torch.ones(1)}, str(p / "model.safetensors"))
        return [], "no V scale for layer 0"

    def bad_head_shape(p):
        p.mkdir()
        save_file({f"model.layers.0.self_attn.{w}_scale": torch.ones(4, 2) for w in "kv"}, str(p / "model.safetensors"))
        return [], "KV scales are (1,) per tensor or (num_kv_heads, 1, 1) per head"

    def mixed_families(p):
        write_ammo(p, 1, extra={"model.layers.0.self_attn.k_scale": torch.ones(1)})
        return [], "mixes AMMO"

    def missing_folder(p):
        return [], "does not exist"

    return [missing_rank, duplicate_rank, duplicate_layer, tp_mismatch_flag, tp_mismatch_files, non_scalar,
            none_at_all, no_tensor_files, missing_layer, rank_not_in_name, ambiguous_layer, k_without_v,
            bad_head_shape, mixed_families, missing_folder]


@pytest.mark.parametrize("make", _errors(), ids=lambda f: f.__name__)
def test_extract_errors_are_one_line_and_write_nothing(cli, tmp_path, make):
    folder = tmp_path / "ckpt"
    args, fragment = make(folder)
    out = tmp_path / "out.json"
    code, _, err = cli("scales", "extract", folder, "--out", out, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not out.exists() and not (folder / "kv_cache_scales.json").exists()


def test_extract_cli_writes_a_valid_file(cli, tmp_path):
    folder = write_ammo(tmp_path / "ckpt", 2, fmt="npz", name="llama_tp2_rank{r}")
    code, out, err = cli("scales", "extract", folder, "--load-format", "npz", "--json", tmp_path / "x.json")
    assert code == 0, err
    data = json.loads((folder / "kv_cache_scales.json").read_text())
    assert data["model_type"] == "llama" and data["kv_cache"]["dtype"] == "float8_e4m3fn"
    assert data["kv_cache"]["scaling_factor"] == {str(r): {str(i): ammo_scale(r, i) for i in range(3)} for r in range(2)}
    summary = json.loads((tmp_path / "x.json").read_text())
    assert summary["tp"] == 2 and summary["kind"] == "ammo"
    code, out, err = cli("scales", "check", folder / "kv_cache_scales.json", "--tp", "2", "--layers", "3")
    assert code == 0 and "valid" in out


# ---- what the checkpoint says about its number format -------------------------------------------
def _set_scheme(folder, **scheme):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"].update(scheme)
    (folder / "config.json").write_text(json.dumps(config))


def test_an_int8_kv_cache_scheme_is_refused_not_read_as_fp8(cli, tmp_path):
    """llm-compressor's INT8 KV cache: its k/v scales are integer steps (about amax/127), not FP8 scales."""
    write_hf(tmp_path / "int8", n_layers=2)
    _set_scheme(tmp_path / "int8", type="int", num_bits=8, symmetric=True)
    with pytest.raises(ScalesError, match="8-bit integer KV cache"):
        extract(tmp_path / "int8")
    code, _, err = cli("scales", "extract", tmp_path / "int8", "--out", tmp_path / "o.json")
    assert code == 2 and "integer quantization steps, not FP8 scales" in err and not (tmp_path / "o.json").exists()
    write_hf(tmp_path / "fp4", n_layers=2)
    _set_scheme(tmp_path / "fp4", num_bits=4)
    with pytest.raises(ScalesError, match="num_bits 4"):
        extract(tmp_path / "fp4")


@pytest.mark.parametrize("fp8_format", ["e5m2", "e4m3fnuz"])
def test_scales_labelled_e5m2_or_e4m3fnuz_stay_so_and_never_become_e4m3fn(cli, tmp_path, fp8_format):
    from kvlab.scales.compressed_tensors import write as write_ct
    from kvlab.scales.files import load_scales
    from kvlab.scales.scales import KVScales

    folder = tmp_path / "ckpt"
    scales = KVScales.from_amax([torch.tensor([3.0])] * 2, [torch.tensor([5.0])] * 2, fp8_format)
    write_ct(folder, scales)  # the header records the format; kv_cache_scheme.json cannot
    found = extract(folder)
    assert found.scales.fp8_format == fp8_format and fp8_format in found.notes[-1]
    assert load_scales(folder, n_layers=2, n_heads=1, n_kv_heads=1).fp8_format == fp8_format
    code, _, err = cli("scales", "extract", folder, "--out", tmp_path / "o.json")
    assert code == 2 and f"holds {fp8_format} scales" in err and "float8_e4m3fn scales only" in err
    assert not (tmp_path / "o.json").exists()


def test_kv_scale_serves_k_and_v(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({f"model.layers.{i}.self_attn.kv_scale": torch.tensor([0.25 * (i + 1)]) for i in range(3)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3,
                                                    "num_attention_heads": 8, "num_key_value_heads": 4}))
    found = extract(folder, tp_size=2)
    assert found.kind == "kv_scale (one scale for K and V)"
    assert [k.tolist() for k in found.scales.keys] == [[0.25], [0.5], [0.75]]
    assert [v.tolist() for v in found.scales.values] == [[0.25], [0.5], [0.75]]
    assert found.ranks == {r: {0: 0.25, 1: 0.5, 2: 0.75} for r in range(2)}
    save_file({"model.layers.0.self_attn.k_scale": torch.ones(1)}, str(folder / "extra.safetensors"))
    with pytest.raises(ScalesError, match="two K scales for layer 0"):
        extract(folder)


def test_no_model_type_is_a_warning_and_model_type_fills_it(cli, tmp_path):
    write_hf(tmp_path / "hf", n_layers=2, config=False)
    code, out, err = cli("scales", "extract", tmp_path / "hf", "--out", tmp_path / "a.json",
                         "--json", tmp_path / "s.json")
    assert code == 0, err
    assert err.startswith("warning: the checkpoint names no model type") and "reject" in err
    assert json.loads((tmp_path / "a.json").read_text())["model_type"] is None
    assert json.loads((tmp_path / "s.json").read_text())["warnings"] == [err.strip().removeprefix("warning: ")]
    code, _, err = cli("scales", "check", tmp_path / "a.json")
    assert code == 2 and "model_type is null" in err + _
    code, _, err = cli("scales", "extract", tmp_path / "hf", "--out", tmp_path / "b.json", "--model-type", "llama")
    assert code == 0 and "warning" not in err
    assert json.loads((tmp_path / "b.json").read_text())["model_type"] == "llama"
    write_hf(tmp_path / "named", n_layers=2)
    code, _, err = cli("scales", "extract", tmp_path / "named", "--out", tmp_path / "c.json", "--model-type", "qwen2")
    assert code == 2 and "checkpoint says model type 'llama'" in err


def test_a_tp_vllm_cannot_run_the_model_at_is_a_warning_with_the_reason(cli, tmp_path):
    write_hf(tmp_path / "hf", n_layers=2, n_heads=9, n_kv=3)  # smollm2's heads
    code, _, err = cli("scales", "extract", tmp_path / "hf", "--tp-size", "2", "--out", tmp_path / "a.json")
    assert code == 0 and (tmp_path / "a.json").exists()
    assert err.strip() == ("warning: scales for tp 2, but vLLM refuses tp 2 for this model: tp must divide the "
                           "9 attention heads (9 % 2 = 1); it runs at tp 1, 3, 9")
    code, _, err = cli("scales", "extract", tmp_path / "hf", "--tp-size", "3", "--out", tmp_path / "b.json")
    assert code == 0 and err.strip() == ""
