"""`kvlab hw` and hw_metrics.json, and the `auto` splits that read it."""

from __future__ import annotations

import json

import pytest

import kvlab
from kvlab.errors import KvlabError
from kvlab.offload import costmodel as cm
from kvlab.offload import hw
from tests.conftest import tiny

QUICK = dict(size_mb=1, gemm_n=32, repeats=1)
# CPU-like figures: no overlap, a fast link relative to the GEMM rate
CPU_METRICS = {"device": "cpu", "h2d_pinned_bytes_per_s": None, "h2d_pageable_bytes_per_s": 6e9,
               "d2h_bytes_per_s": 6e9, "device_copy_bytes_per_s": 9e9, "disk_read_bytes_per_s": 1.5e9,
               "gemm_flops_per_s": {"float32": 3e10}, "device_memory_bytes": 8 * 2**30}


def test_measure_records_every_figure_and_saves_them(hw_home, tmp_path):
    metrics = hw.measure("cpu", disk_dir=tmp_path, **QUICK)
    for key in ("h2d_pageable_bytes_per_s", "d2h_bytes_per_s", "device_copy_bytes_per_s", "disk_read_bytes_per_s",
                "disk_read_cached_bytes_per_s", "device_memory_bytes"):
        assert metrics[key] > 0, key
    assert metrics["h2d_pinned_bytes_per_s"] is None  # no pinned memory without CUDA
    assert metrics["gemm_flops_per_s"]["float32"] > 0
    path = hw.save_metrics(metrics)
    assert path == hw_home / "hw_metrics.json"
    assert hw.load_metrics("cpu")["gemm_n"]["float32"] == 32
    hw.save_metrics({**metrics, "device": "cuda:0"})  # entries merge, one per device
    assert set(json.loads(path.read_text())["devices"]) == {"cpu", "cuda:0"}
    assert hw.load_metrics("cuda")["device"] == "cuda:0"
    assert [p.name for p in hw_home.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_missing_or_corrupt_metrics_are_clear_errors(hw_home):
    with pytest.raises(KvlabError, match=r"run `kvlab hw --device cpu` first"):
        hw.load_metrics("cpu")
    (hw_home / "hw_metrics.json").write_text("{not json")
    with pytest.raises(KvlabError, match="not readable JSON"):
        hw.load_metrics("cpu")
    (hw_home / "hw_metrics.json").write_text('{"format": "other"}')
    with pytest.raises(KvlabError, match="not a kvlab.hw/1 file"):
        hw.load_metrics("cpu")


def test_measuring_a_missing_cuda_device_is_an_error(hw_home):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KvlabError, match="no CUDA device"):
        hw.measure("cuda:0", **QUICK)


def test_hw_command_writes_the_file(cli, hw_home, tmp_path):
    code, out, err = cli("hw", "--size-mb", "1", "--gemm-n", "32", "--repeats", "1", "--disk-dir", tmp_path,
                         "--json", "-")
    assert code == 0, err
    assert json.loads(out)["device"] == "cpu"
    assert (hw_home / "hw_metrics.json").is_file()
    code, _, err = cli("hw", "--device", "tpu")
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


PROMPT = "Auto splits read the hardware figures."


def test_auto_without_figures_says_which_command_to_run(hw_home):
    loaded = tiny("tiny-mha")
    for run in ("cache=kvpr:auto", "cache=flexgen:auto"):
        with pytest.raises(KvlabError, match="kvlab hw"):
            kvlab.capture(loaded, loaded.encode(PROMPT), run, max_new_tokens=2)


def test_kvpr_auto_takes_the_cost_models_length(hw_home):
    loaded = tiny("tiny-mha")
    ids = loaded.encode(PROMPT)
    golden = kvlab.capture(loaded, ids, max_new_tokens=3)
    # a slow link and a fast GEMM on an overlapping device: the balance says l/s = p v / (2 h v_com + p v)
    hw.save_metrics({**CPU_METRICS, "device": "cpu", "h2d_pageable_bytes_per_s": 1e8,
                     "gemm_flops_per_s": {"float32": 1.28e10}})
    shape = cm.ModelShape.from_model(loaded.model)
    expected = cm.kvpr_split(len(ids), shape, cm.Hardware.from_metrics(hw.load_metrics("cpu"), dtype="float32"))
    assert expected.recompute_len == len(ids)  # no overlap on cpu: all or nothing, and recompute is cheap here
    snap = kvlab.capture(loaded, ids, "cache=kvpr:recompute_len=auto", max_new_tokens=3)
    assert snap.token_ids == golden.token_ids
    assert float((snap.logits() - golden.logits()).abs().max()) <= 1e-5
    from kvlab.runspec import RunSpec

    policy = RunSpec.parse("cache=kvpr:auto").policy
    cache = policy.build(loaded.model)
    assert cache.resolve_split(len(ids)) == len(ids) and "cheaper" in cache.split_reason
    hw.save_metrics(CPU_METRICS)  # a fast link: recomputing does not pay, l = 0
    cache = policy.build(loaded.model)
    assert cache.resolve_split(len(ids)) == 0 and "do not overlap" in cache.split_reason


def test_flexgen_auto_fits_the_budget(hw_home):
    from kvlab.runspec import RunSpec

    loaded = tiny("tiny-mha")
    shape = cm.ModelShape.from_model(loaded.model)
    weights = cm.weight_bytes(loaded.model)
    total = 100
    # room for weights, no reserve, staging (3 x 100 rows) and 40 resident positions in each of 4 layers
    budget = weights + 3 * total * shape.kv_row_bytes + 40 * (shape.layers - 2) * shape.kv_row_bytes
    gb = budget / 2**30
    policy = RunSpec.parse(f"cache=flexgen:auto,budget_gb={gb!r},reserve_gb=0").policy
    cache = policy.build(loaded.model, max_length=total)
    assert cache.resolve_split(20) == 40 and "40 of 100" in cache.split_reason
    hw.save_metrics(CPU_METRICS)  # without budget_gb: the device memory kvlab hw measured (here 8 GiB)
    big = RunSpec.parse("cache=flexgen:auto").policy.build(loaded.model, max_length=total)
    assert big.resolve_split(20) == total
    ids = loaded.encode(PROMPT)
    golden = kvlab.capture(loaded, ids, max_new_tokens=3)
    snap = kvlab.capture(loaded, ids, f"cache=flexgen:auto,budget_gb={gb!r},reserve_gb=0", max_new_tokens=3)
    assert snap.token_ids == golden.token_ids
    assert float((snap.logits() - golden.logits()).abs().max()) <= 1e-5
