"""The fp8 cache policy against the exact cache (DynamicCache) and transformers' own fp8 cache."""

import json

import pytest
import torch

import kvlab
from kvlab.caches import parse_policy
from kvlab.compare import kl_divergence, tensor_errors
from kvlab.model_facts import LoadedModel
from kvlab.models import model_fingerprint
from kvlab.quant import fp8
from kvlab.runspec import RunSpecError
from kvlab.scales import vllm_json
from kvlab.scales.compressed_tensors import write as write_ct
from kvlab.scales.scales import KVScales
from kvlab.snapshot import Snapshot
from kvlab.tinymodels import build_tiny
from tests.conftest import tiny
from tests.scales.checkpoints import write_ammo

PROMPT = list(b"The quick brown fox jumps over the lazy dog, again and again. ")
# e4m3fn keeps 3 mantissa bits: a normal number is off by at most 2^-4 of itself after rounding.
REL_BOUND = 2 ** -4


@pytest.fixture(scope="module")
def golden():
    return kvlab.capture(tiny("tiny-llama"), PROMPT, max_new_tokens=12)


def layer_scales(snap, i):
    return snap.tensor(f"layers.{i}.keys.scale"), snap.tensor(f"layers.{i}.values.scale")


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_prompt_cache_is_exactly_the_quantized_exact_cache(golden, granularity):
    test = kvlab.capture(tiny("tiny-llama"), None, f"cache=fp8:granularity={granularity}", force=golden)
    n = golden.n_prompt
    assert torch.equal(test.logits()[0], golden.logits()[0])  # prefill attends to exact K/V
    for i in range(golden.n_layers):
        k_scale, v_scale = layer_scales(test, i)
        assert k_scale.numel() == (2 if granularity == "head" else 1)
        for got, exact, scale, name in ((test.keys(i), golden.keys(i), k_scale, "keys"),
                                        (test.values(i), golden.values(i), v_scale, "values")):
            want_q = fp8.quantize(exact[:, :, :n], scale, "e4m3fn")
            assert torch.equal(test.tensor(f"layers.{i}.{name}.q")[:, :, :n].view(torch.uint8), want_q.view(torch.uint8))
            assert torch.equal(got[:, :, :n], fp8.dequantize(want_q, scale))


@pytest.mark.parametrize("spec", ["cache=fp8", "cache=fp8:granularity=head", "cache=fp8:prefill=fp8",
                                  "cache=fp8:scales=prefill"])
def test_error_against_dynamic_cache_is_within_the_bound(golden, spec):
    test = kvlab.capture(tiny("tiny-llama"), None, spec, force=golden)
    for i in range(golden.n_layers):
        for g, t in ((golden.keys(i), test.keys(i)), (golden.values(i), test.values(i))):
            err = tensor_errors(g, t)
            assert 0 < err.rel_l2 <= REL_BOUND and err.cosine > 0.998
    kl = kl_divergence(golden.logits(), test.logits())
    assert float(kl.mean()) < 2e-3 and torch.isfinite(kl).all()


def test_e5m2_is_coarser_but_bounded(golden):
    e4 = kvlab.capture(tiny("tiny-llama"), None, "cache=fp8", force=golden)
    e5 = kvlab.capture(tiny("tiny-llama"), None, "cache=fp8:format=e5m2", force=golden)
    e4_err = tensor_errors(golden.keys(2), e4.keys(2)).rel_l2
    e5_err = tensor_errors(golden.keys(2), e5.keys(2)).rel_l2
    assert e4_err < e5_err <= 2 ** -3  # 2 mantissa bits


def test_scales_prefill_equals_transformers_builtin_fp8(golden):
    ours = kvlab.capture(tiny("tiny-llama"), None, "cache=fp8:scales=prefill", force=golden)
    builtin = kvlab.capture(tiny("tiny-llama"), None, "cache=hf-fp8", force=golden)
    assert torch.equal(ours.logits(), builtin.logits())
    for i in range(golden.n_layers):
        assert torch.equal(ours.keys(i), builtin.keys(i)) and torch.equal(ours.values(i), builtin.values(i))
        assert torch.equal(layer_scales(ours, i)[0], layer_scales(builtin, i)[0])


def test_generate_with_the_fp8_cache_matches_capture():
    loaded = tiny("tiny-llama")
    policy = parse_policy("fp8:granularity=head")
    snap = kvlab.capture(loaded, PROMPT, "cache=fp8:granularity=head", max_new_tokens=10)
    out = loaded.model.generate(torch.tensor([PROMPT]), past_key_values=policy.build(loaded.model),
                                max_new_tokens=10, do_sample=False)
    assert out[0, len(PROMPT):].tolist() == snap.token_ids[len(PROMPT):]


def _heads_with_different_ranges(factor: float = 1e-5) -> LoadedModel:
    """tiny-llama with KV head 1's keys and values scaled by `factor` in every layer and the
    matching query and output columns scaled back: the same function, very different head ranges."""
    model = build_tiny("tiny-llama")
    d = 16
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.k_proj.weight[d:2 * d] *= factor
            attn.v_proj.weight[d:2 * d] *= factor
            attn.q_proj.weight[2 * d:4 * d] /= factor  # query heads 2, 3 read KV head 1
            attn.o_proj.weight[:, 2 * d:4 * d] /= factor
    return LoadedModel(model=model, tokenizer=tiny("tiny-llama").tokenizer, spec="tiny-llama-rescaled",
                       fingerprint=model_fingerprint(model))


def test_per_head_scales_beat_per_tensor_when_heads_differ(golden):
    loaded = _heads_with_different_ranges()
    # another model (same function, other weights): forced with the golden token ids, not its snapshot
    prompt, ids = golden.token_ids[: golden.n_prompt], golden.token_ids
    exact = kvlab.capture(loaded, prompt, force=ids)
    torch.testing.assert_close(exact.logits(), golden.logits(), rtol=1e-3, atol=1e-3)  # same function
    tensor = kvlab.capture(loaded, prompt, "cache=fp8:granularity=tensor", force=ids)
    head = kvlab.capture(loaded, prompt, "cache=fp8:granularity=head", force=ids)
    for i in range(golden.n_layers):
        small = slice(1, 2)  # the scaled-down head
        e_tensor = tensor_errors(exact.values(i)[:, small], tensor.values(i)[:, small]).rel_l2
        e_head = tensor_errors(exact.values(i)[:, small], head.values(i)[:, small]).rel_l2
        assert e_head <= REL_BOUND and e_tensor > 4 * e_head, (i, e_head, e_tensor)
        assert tensor_errors(exact.keys(i), head.keys(i)).rel_l2 <= tensor_errors(exact.keys(i), tensor.keys(i)).rel_l2
    kl_tensor = kl_divergence(exact.logits(), tensor.logits()).mean()
    kl_head = kl_divergence(exact.logits(), head.logits()).mean()
    assert kl_head <= kl_tensor


# ---- scales from files ------------------------------------------------------------------------
def test_vllm_json_scales_are_used_as_written(tmp_path, golden):
    ranks = {r: {i: 0.01 * (i + 1) * (r + 1) for i in range(4)} for r in range(2)}
    path = vllm_json.write(tmp_path / "kv_cache_scales.json", ranks, "llama")
    for granularity in ("head", "tensor"):
        snap = kvlab.capture(tiny("tiny-llama"), None, f"cache=fp8:scales={path},granularity={granularity}",
                             force=golden)
        for i in range(4):
            k, v = layer_scales(snap, i)
            # tp=2 on 2 KV heads: rank r holds head r; per tensor keeps the larger rank
            want = [ranks[0][i], ranks[1][i]] if granularity == "head" else [ranks[1][i]]
            assert k.tolist() == pytest.approx(want) and v.tolist() == pytest.approx(want)


def test_compressed_tensors_and_checkpoint_scales(tmp_path, golden):
    keys = tuple(torch.tensor([0.02 + 0.01 * i, 0.05]) for i in range(4))
    values = tuple(torch.tensor([0.03, 0.01 + 0.01 * i]) for i in range(4))
    write_ct(tmp_path / "ct", KVScales(keys, values))
    snap = kvlab.capture(tiny("tiny-llama"), None,
                         f"cache=fp8:scales={tmp_path / 'ct' / 'kv_cache_scales.safetensors'},granularity=tensor",
                         force=golden)
    for i in range(4):
        k, v = layer_scales(snap, i)
        assert torch.equal(k, keys[i].amax().reshape(1)) and torch.equal(v, values[i].amax().reshape(1))
    write_ammo(tmp_path / "ammo", 1, n_layers=4)
    snap = kvlab.capture(tiny("tiny-llama"), None, f"cache=fp8:scales={tmp_path / 'ammo'}", force=golden)
    assert layer_scales(snap, 3)[0].tolist() == pytest.approx([0.0123 + 3 * 0.00071])


def test_too_small_scales_clamp_instead_of_nan(tmp_path, golden):
    path = vllm_json.write(tmp_path / "tiny.json", {0: {i: 1e-5 for i in range(4)}}, "llama")
    snap = kvlab.capture(tiny("tiny-llama"), None, f"cache=fp8:scales={path}", force=golden)
    assert torch.isfinite(snap.logits()).all()
    assert float(snap.keys(0).abs().max()) == pytest.approx(448 * 1e-5)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: str(p / "none.json"), "does not exist"),
        (lambda p: str(vllm_json.write(p / "s.json", {0: {0: 0.1}}, "llama")), "missing layers 1..3"),
        (lambda p: str(write_ct(p / "h", KVScales(tuple(torch.ones(3) for _ in range(4)),
                                                  tuple(torch.ones(3) for _ in range(4))))[0]),
         "has 3 head scales but the model has 2 KV heads"),
        (lambda p: str(write_ct(p / "e5", KVScales(tuple(torch.ones(1) for _ in range(4)),
                                                   tuple(torch.ones(1) for _ in range(4)), "e5m2"))[0]),
         "holds scales for e5m2"),
    ],
)
def test_bad_scales_are_one_line_through_the_cli(cli, tmp_path, make, fragment):
    spec = f"cache=fp8:scales={make(tmp_path)}"
    code, _, err = cli("capture", "-m", "tiny-llama", "-p", "hello", "-n", "2", "--run", spec,
                       "--out", tmp_path / "snap", "-q")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "snap").exists()


def test_policy_spec_and_errors():
    policy = parse_policy("fp8:granularity=head,format=e5m2")
    assert policy.spec() == "fp8:scales=calibrate,granularity=head,format=e5m2,prefill=exact"
    assert not policy.lossless
    for bad, fragment in (("cache=fp8:granularity=channel", "one of tensor, head"),
                          ("cache=fp8:format=e3m4", "one of e4m3fn, e5m2, e4m3fnuz"),
                          ("cache=fp8:scales=", "scales needs a value")):
        with pytest.raises(RunSpecError, match=fragment):
            kvlab.RunSpec.parse(bad)


def test_capture_cli_saves_the_fp8_payload(cli, tmp_path):
    code, _, err = cli("capture", "-m", "tiny-llama", "-p", "hello there", "-n", "4", "--run", "cache=fp8",
                       "--out", tmp_path / "snap", "-q")
    assert code == 0, err
    snap = Snapshot.load(tmp_path / "snap")
    q, scale = snap.tensor("layers.1.keys.q"), snap.tensor("layers.1.keys.scale")
    assert q.dtype == torch.float8_e4m3fn and torch.equal(snap.keys(1), fp8.dequantize(q, scale))
    assert json.loads((tmp_path / "snap" / "meta.json").read_text())["run"].count("cache=fp8:scales=calibrate") == 1


def test_layer_bookkeeping_matches_a_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    from kvlab.caches.fp8 import FP8Layer

    torch.manual_seed(0)
    scale = torch.tensor([0.01, 0.02])
    ours, exact = FP8Layer(scale, scale, exact_prefill=False), DynamicLayer()
    for n in (5, 1, 1):
        k, v = torch.randn(3, 2, n, 4), torch.randn(3, 2, n, 4)
        got_k, _ = ours.update(k, v)
        want_k, _ = exact.update(k, v)
        assert torch.equal(got_k, fp8.dequantize(fp8.quantize(want_k, scale), scale))
    assert ours.get_seq_length() == 7 and ours.get_mask_sizes(2) == exact.get_mask_sizes(2) == (9, 0)
    ours.crop(-2)
    exact.crop(-2)
    ours.batch_select_indices(torch.tensor([2, 0]))
    exact.batch_select_indices(torch.tensor([2, 0]))
    assert ours.get_seq_length() == 5 and torch.equal(ours.keys, fp8.dequantize(fp8.quantize(exact.keys, scale), scale))
    ours.reset()
    assert ours.get_seq_length() == 0 and ours.keys is None


def test_scales_calibrate_is_the_default_calibration_on_the_builtin_text(golden):
    from kvlab.scales.calibrate import calibrate

    snap = kvlab.capture(tiny("tiny-llama"), None, "cache=fp8:granularity=head", force=golden)
    cal = calibrate(tiny("tiny-llama"))  # a fresh run with the defaults, not the memo the cache used
    for i in range(golden.n_layers):
        k, v = layer_scales(snap, i)
        assert torch.equal(k, fp8.scale_from_amax(cal.key_amax[i], "e4m3fn"))
        assert torch.equal(v, fp8.scale_from_amax(cal.value_amax[i], "e4m3fn"))
