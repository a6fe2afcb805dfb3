"""`kvlab bench decode`: the forward-only benchmark's figures, checked where they can be."""

from __future__ import annotations

import json

import pytest

from kvlab.errors import KvlabError
from kvlab.offload.bench import bench_decode, method_policies
from tests.conftest import tiny
from tests.offload.test_hw import CPU_METRICS

DESIGN_KEYS = {"method", "prefill_s", "step_p50_s", "step_p90_s", "tokens_per_s", "peak_bytes", "bytes_moved_per_step"}


def test_every_method_matches_the_baseline_and_moves_what_it_should(hw_home):
    loaded = tiny("tiny-mha")
    prompt, gen, batch, g = 24, 3, 2, 10
    policies = method_policies(["baseline", "offload", "flexgen", "kvpr"], tier="disk",
                               params={"flexgen": f"gpu_len={g}", "kvpr": "recompute_len=8"})
    report = bench_decode(loaded, policies, batch=batch, prompt_len=prompt, gen_len=gen)
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == ["baseline", "offload", "flexgen", "kvpr"]
    for r in results.values():
        assert DESIGN_KEYS <= set(r)
        assert r["max_logit_diff"] <= 1e-5  # lossless, checked on every step's logits
        assert r["step_p50_s"] > 0 and r["step_p90_s"] >= r["step_p50_s"]
        assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0
        assert r["peak_bytes_source"] == "accounted" and r["predicted_step_s"] is None  # no hw figures here
    assert results["baseline"]["bytes_moved_per_step"] == 0
    assert results["baseline"]["speedup_vs_baseline"] == 1.0
    assert results["flexgen"]["cache"] == f"flexgen:gpu_len={g},tier=disk"
    # flexgen per step: lands every far row of every layer (P + t - g, layer 0 one step ahead) and writes one row
    layers, row = 4, 2 * batch * 64 * 4
    per_step = [((layers - 1) * (prompt + t - g) + (prompt + t + 1 - g) + layers) * row for t in range(gen)]
    assert results["flexgen"]["bytes_moved_per_step"] == pytest.approx(sum(per_step) / gen)
    # memory kept on the device: everything for the baseline, less for every offloaded method
    for method in ("offload", "flexgen", "kvpr"):
        assert results[method]["peak_bytes"] < results["baseline"]["peak_bytes"]
    assert "no prediction" in report["hw_metrics"]


def test_predicted_step_time_appears_with_hardware_figures(hw_home):
    from kvlab.offload import hw

    hw.save_metrics(CPU_METRICS)
    loaded = tiny("tiny-llama")
    report = bench_decode(loaded, method_policies(["baseline", "kvpr"], auto=True), batch=1, prompt_len=12, gen_len=2)
    kvpr = report["results"][1]
    assert all(r["predicted_step_s"] > 0 for r in report["results"])
    assert kvpr["cache"] == "kvpr:auto" and kvpr["split"] == 0
    assert "K/V row it replaces" in kvpr["split_reason"]  # tiny-llama: GQA 4/2, activation row as large


def test_unknown_method_and_bad_parameters_are_errors():
    with pytest.raises(KvlabError, match="unknown method"):
        method_policies(["baseline", "fast"])
    with pytest.raises(KvlabError, match="between 0 and 1"):
        method_policies(["flexgen"], params={"flexgen": "gpu_ratio=3"})


def test_bench_decode_command(cli, tmp_path, hw_home):
    out = tmp_path / "bench.json"
    code, stdout, err = cli("bench", "decode", "--model", "random:llama-mha,hidden=64,layers=2", "--methods",
                            "baseline,flexgen,kvpr", "--prompt-len", "16", "--gen-len", "2", "--tier", "disk",
                            "--json", out, "--quiet")
    assert code == 0, err
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["results"]] == ["baseline", "flexgen", "kvpr"]
    assert all(DESIGN_KEYS <= set(r) for r in data["results"])
    assert "kvpr" in stdout and "x base" in stdout
    for args, why in ((("--methods", "baseline,warp"), "unknown method"), (("--run", "cache=dynamic"), "--methods"),
                      (("--kvpr", "ratio=2"), "between 0 and 1")):
        code, _, err = cli("bench", "decode", "--model", "tiny-llama", "--prompt-len", "4", "--gen-len", "1",
                           "--quiet", *args)
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1
