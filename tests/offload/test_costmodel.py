"""The cost model against numbers worked out by hand (see each test's comments)."""

from __future__ import annotations

import pytest

from kvlab.errors import KvlabError
from kvlab.offload import costmodel as cm
from tests.conftest import tiny

GIB, MIB, KIB = 2**30, 2**20, 2**10

# MHA, h = 32 heads x 125 = 4000, fp16; GPU 100 TFLOP/s, link 25 GB/s
MHA = cm.ModelShape(layers=32, hidden=4000, heads=32, kv_heads=32, head_dim=125, bytes_per_value=2, batch=1)
GPU = cm.Hardware(gemm_flops_per_s=1e14, link_bytes_per_s=25e9, d2h_bytes_per_s=25e9, mem_bytes_per_s=2e12,
                  overlap=True)


def test_balance_ratio_by_hand():
    # p v_gpu = 2 * 1e14 = 2e14; 2 h v_com = 2 * 4000 * 25e9 = 2e14  ->  l*/s = 2e14 / 4e14
    assert cm.kvpr_balance_ratio(2, 4000, 1e14, 25e9) == pytest.approx(0.5)


def test_kvpr_split_balances_recompute_and_transfer():
    split = cm.kvpr_split(1000, MHA, GPU)
    assert split.recompute_len == 500 and split.ratio == pytest.approx(0.5)
    t = cm.kvpr_layer_seconds(500, 1000, MHA, GPU)
    # t_X = 500*4000*2 / 25e9 = 1.6e-4; t_rec = 4*500*4000*4000 / 1e14 = 3.2e-4; t_KV = 2*500*4000*2 / 25e9 = 3.2e-4
    assert t["t_x"] == pytest.approx(1.6e-4)
    assert t["t_rec"] == pytest.approx(3.2e-4) == pytest.approx(t["t_kv"])
    assert t["wait"] == pytest.approx(4.8e-4)
    # and it is the best length: every other l waits longer
    waits = {l: cm.kvpr_layer_seconds(l, 1000, MHA, GPU)["wait"] for l in range(0, 1001, 10)}
    assert min(waits, key=waits.get) == 500
    assert waits[0] == pytest.approx(2 * 1000 * 4000 * 2 / 25e9)  # everything as K/V: 6.4e-4


def test_kvpr_split_is_zero_when_an_activation_row_is_larger_than_the_kv_row():
    # SmolLM2: h = 576 > 2 x 3 KV heads x 64 = 384
    smol = cm.ModelShape(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, bytes_per_value=4)
    split = cm.kvpr_split(4096, smol, GPU)
    assert split.recompute_len == 0 and "larger than" in split.reason and "384" in split.reason
    # group size 2: as large as, still nothing to gain
    gqa2 = cm.ModelShape(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, bytes_per_value=4)
    assert cm.kvpr_split(100, gqa2, GPU).recompute_len == 0
    assert "as large as" in cm.kvpr_split(100, gqa2, GPU).reason


def test_kvpr_split_without_overlap_is_all_or_nothing():
    shape = cm.ModelShape(layers=8, hidden=1024, heads=8, kv_heads=8, head_dim=128, bytes_per_value=4)
    # CPU-like: per row X 4096 B / 6e9 + recompute 4*1024*1024 / 3e10 = 1.4e-4 s  >>  K/V 8192 B / 6e9 = 1.4e-6 s
    cpu = cm.Hardware(3e10, 6e9, 6e9, 1e10, overlap=False)
    split = cm.kvpr_split(512, shape, cpu)
    assert split.recompute_len == 0 and "do not overlap" in split.reason
    # slow link, fast GEMM: X 4096/1e8 + 4.2e6/1e15 = 4.1e-5 s  <  K/V 8192/1e8 = 8.2e-5 s per row
    slow_link = cm.Hardware(1e15, 1e8, 1e8, 1e10, overlap=False)
    assert cm.kvpr_split(512, shape, slow_link).recompute_len == 512


def test_flexgen_split_from_a_memory_budget_by_hand():
    # 8 layers x 32 KV heads x 128, batch 8, fp16: k = 2 * 8 * 4096 * 2 = 128 KiB per position and layer
    shape = cm.ModelShape(layers=8, hidden=4096, heads=32, kv_heads=32, head_dim=128, bytes_per_value=2, batch=8)
    assert shape.kv_row_bytes == 128 * KIB
    w, r = 1 * GIB, GIB // 2
    # all resident: 1.5 GiB + (8 + 1) * 2048 * 128 KiB = 1.5 + 2.25 GiB = 3.75 GiB
    full = cm.flexgen_split(2048, shape, budget=4 * GIB, weights=w, reserve=r)
    assert full.gpu_len == 2048 and full.device_bytes == int(3.75 * GIB)
    # 3 GiB: spare = 3 - 1.5 - 3 * 2048 * 128 KiB (0.75) = 0.75 GiB; g = 768 MiB / (6 * 128 KiB) = 1024
    half = cm.flexgen_split(2048, shape, budget=3 * GIB, weights=w, reserve=r)
    assert half.gpu_len == 1024 and half.fits and half.ratio == 0.5
    # check: 1.5 + 1024*8*128 KiB (1) + 2*1024*128 KiB (0.25) + 2048*128 KiB (0.25) = 3 GiB exactly
    assert half.device_bytes == 3 * GIB
    # 1.6 GiB: even nothing resident needs 1.5 + 0.5 + 0.25 = 2.25 GiB
    none = cm.flexgen_split(2048, shape, budget=int(1.6 * GIB), weights=w, reserve=r)
    assert none.gpu_len == 0 and not none.fits and "exceed" in none.reason


def test_ratio_forms():
    assert cm.length_from_ratio(0.3, 1000) == 300
    assert cm.length_from_ratio(1.0, 7) == 7 and cm.length_from_ratio(0.0, 7) == 0
    with pytest.raises(ValueError):
        cm.length_from_ratio(1.2, 10)


def test_predicted_step_by_hand():
    shape = cm.ModelShape(layers=2, hidden=100, heads=1, kv_heads=1, head_dim=100, bytes_per_value=4,
                          layer_params=10_000)
    hw = cm.Hardware(gemm_flops_per_s=1e12, link_bytes_per_s=1e9, d2h_bytes_per_s=1e9, mem_bytes_per_s=1e11,
                     overlap=False)
    # compute: flops 2*10000 + 4*100*1000 = 4.2e5 -> 4.2e-7 s; bytes 40000 + 1000*800 = 8.4e5 -> 8.4e-6 s
    assert cm.layer_compute_seconds(1000, shape, hw) == pytest.approx(8.4e-6)
    # plus assembling the layer's K/V for attention: read + write (1000 + 1) * 800 B at 1e11 B/s
    c = 8.4e-6 + 2 * 1001 * 800 / 1e11
    assert cm.predict_step("baseline", 1000, shape, hw) == pytest.approx(2 * c)
    assert cm.predict_step("flexgen", 1000, shape, hw, split=2000) == pytest.approx(2 * 8.4e-6)  # all resident
    # flexgen, 400 resident: far 600 * 800 B / 1e9 = 4.8e-4, new row 800 / 1e9 = 8e-7
    assert cm.predict_step("flexgen", 1000, shape, hw, split=400) == pytest.approx(2 * (c + 4.8e-4 + 8e-7))
    # offload: every layer in and out, (1000 + 1) * 800 B each way
    assert cm.predict_step("offload", 1000, shape, hw) == pytest.approx(2 * (c + 2 * 1001 * 800 / 1e9))
    # kvpr, l = 200: X 200*400/1e9 = 8e-5, recompute 4*200*100*100/1e12 = 8e-6, K/V 800*800/1e9 = 6.4e-4
    assert cm.predict_step("kvpr", 1000, shape, hw, split=200) == pytest.approx(
        2 * (c + 8e-5 + 8e-6 + 6.4e-4 + 8e-7))
    with pytest.raises(ValueError):
        cm.predict_step("nope", 10, shape, hw)


def test_shape_from_a_model():
    shape = cm.ModelShape.from_model(tiny("tiny-mha").model, batch=3)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (4, 64, 4, 4, 16)
    assert shape.bytes_per_value == 4 and shape.batch == 3
    # q, k, v, o: 4 * 64 * 64; gated MLP: 3 * 64 * 128; two RMSNorm weights: 2 * 64
    assert shape.layer_params == 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert shape.kv_row_bytes == 2 * 3 * 64 * 4 and shape.act_row_bytes == 3 * 64 * 4


def test_hardware_from_metrics_picks_the_tiers_link():
    cpu = {"device": "cpu", "h2d_pinned_bytes_per_s": None, "h2d_pageable_bytes_per_s": 6e9, "d2h_bytes_per_s": 6e9,
           "device_copy_bytes_per_s": 9e9, "disk_read_bytes_per_s": 1.5e9, "gemm_flops_per_s": {"float32": 3e10}}
    host = cm.Hardware.from_metrics(cpu, dtype="float32", tier="host")
    assert host.link_bytes_per_s == 6e9 and not host.overlap
    assert cm.Hardware.from_metrics(cpu, dtype="float32", tier="disk").link_bytes_per_s == 1.5e9
    assert cm.Hardware.from_metrics(cpu, dtype="bfloat16").gemm_flops_per_s == 3e10  # falls back to float32
    cuda = {**cpu, "device": "cuda:0", "h2d_pinned_bytes_per_s": 25e9, "disk_read_bytes_per_s": 3e9,
            "gemm_flops_per_s": {"float32": 5e13, "float16": 7e14}}
    gpu = cm.Hardware.from_metrics(cuda, dtype="float16", tier="host")
    assert gpu.link_bytes_per_s == 25e9 and gpu.gemm_flops_per_s == 7e14 and gpu.overlap
    assert cm.Hardware.from_metrics(cuda, dtype="float16", tier="disk").link_bytes_per_s == 3e9
    with pytest.raises(KvlabError, match="kvlab hw"):
        cm.Hardware.from_metrics({"device": "cpu"}, dtype="float32")
