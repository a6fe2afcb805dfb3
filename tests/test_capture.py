import pytest
import torch

import kvlab
from kvlab.errors import KvlabError
from tests.conftest import TINY_FAMILIES, tiny

PROMPT = "The cache holds keys and values."


def _generate(loaded, ids, n):
    out = loaded.model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    return out


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_capture_stores_what_generate_holds(name):
    loaded = tiny(name)
    ids = loaded.encode(PROMPT)
    snap = kvlab.capture(loaded, ids, max_new_tokens=10)
    out = _generate(loaded, ids, 10)
    assert snap.token_ids == out.sequences[0].tolist()
    assert snap.n_prompt == len(ids) and len(snap.token_ids) == len(ids) + 10
    assert snap.greedy_ids == snap.token_ids[len(ids):]
    cache = out.past_key_values
    assert snap.n_layers == len(cache.layers) == loaded.config.num_hidden_layers
    for i, layer in enumerate(cache.layers):
        assert torch.equal(snap.keys(i), layer.keys)
        assert torch.equal(snap.values(i), layer.values)
    assert snap.keys(0).shape == (1, loaded.config.num_key_value_heads, len(ids) + 9, snap.model["head_dim"])
    # the full logits of each step are generate's, and top-k is read off them
    logits = snap.logits()
    assert torch.equal(logits, torch.cat(out.logits).float())
    top = snap.meta["logits"]
    top_ids, top_values = torch.tensor(top["ids"]), torch.tensor(top["values"], dtype=torch.float32)
    assert torch.equal(top_ids[:, 0], torch.tensor(snap.greedy_ids))
    assert torch.equal(top_values, torch.topk(logits, top_ids.shape[1]).values)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_teacher_forcing_reproduces_the_golden_cache(name, tmp_path):
    loaded = tiny(name)
    golden = kvlab.capture(loaded, loaded.encode(PROMPT), max_new_tokens=8)
    golden.save(tmp_path / "golden")
    forced = kvlab.capture(loaded, None, force=kvlab.Snapshot.load(tmp_path / "golden"))
    assert forced.token_ids == golden.token_ids
    assert forced.meta["teacher_forced"] is True
    for i in range(golden.n_layers):
        assert torch.equal(forced.keys(i), golden.keys(i))
        assert torch.equal(forced.values(i), golden.values(i))
    assert torch.equal(forced.logits(), golden.logits())


def test_teacher_forcing_feeds_golden_tokens_not_the_models_own():
    golden_model = tiny("tiny-llama")
    golden = kvlab.capture(golden_model, golden_model.encode(PROMPT), max_new_tokens=12)
    # a different model makes different choices; forcing still feeds the golden ones
    other = tiny("tiny-mha")
    with pytest.raises(KvlabError, match="golden run of model tiny-llama"):
        kvlab.capture(other, None, force=golden)  # a snapshot names its model: another one is refused
    forced = kvlab.capture(other, golden.token_ids[: golden.n_prompt], force=golden.token_ids)
    free = kvlab.capture(other, golden.token_ids[: golden.n_prompt], max_new_tokens=12)
    assert forced.token_ids == golden.token_ids
    assert free.token_ids != golden.token_ids
    # the model's own argmax under forcing is recorded, and the first step agrees with a free run
    assert forced.greedy_ids[0] == free.greedy_ids[0]
    assert forced.greedy_ids != golden.greedy_ids


def test_bfloat16_run_on_golden_tokens():
    golden = kvlab.capture(tiny("tiny-qwen2"), tiny("tiny-qwen2").encode(PROMPT), max_new_tokens=6)
    low = tiny("tiny-qwen2", "dtype=bfloat16")
    assert low.fingerprint == tiny("tiny-qwen2").fingerprint
    forced = kvlab.capture(low, None, "dtype=bfloat16", force=golden)
    assert forced.keys(0).dtype == torch.bfloat16
    assert forced.meta["run"].startswith("dtype=bfloat16")
    err = (forced.keys(3).float() - golden.keys(3)).abs().max()
    assert 0 < err < 0.1


def test_eos_stops_generation_like_generate():
    loaded = tiny("tiny-llama")
    ids = loaded.encode(PROMPT)
    free = kvlab.capture(loaded, ids, max_new_tokens=6)
    stop_token = free.token_ids[len(ids) + 2]
    loaded.model.generation_config.eos_token_id = stop_token
    try:
        snap = kvlab.capture(loaded, ids, max_new_tokens=6)
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    finally:
        loaded.model.generation_config.eos_token_id = None
    assert snap.token_ids == out[0].tolist() == free.token_ids[: len(ids) + 3]
    unstopped = kvlab.capture(loaded, ids, max_new_tokens=6, stop_at_eos=False)
    assert unstopped.token_ids == free.token_ids


def test_attention_kernel_is_switched_for_the_run_and_restored():
    loaded = tiny("tiny-llama")
    ids = loaded.encode(PROMPT)
    sdpa = kvlab.capture(loaded, ids, max_new_tokens=5)
    eager = kvlab.capture(loaded, ids, "attn=eager", max_new_tokens=5)
    assert eager.meta["run"] == "dtype=float32,attn=eager,cache=dynamic,tp=1,device=cpu"
    assert loaded.config._attn_implementation == "sdpa"
    assert torch.allclose(eager.keys(3), sdpa.keys(3), atol=1e-5)


def test_plain_transformers_model_is_accepted():
    loaded = tiny("tiny-mistral")
    snap = kvlab.capture(loaded.model, loaded.encode(PROMPT), max_new_tokens=3)
    assert snap.model["fingerprint"] == loaded.fingerprint


def test_bad_inputs_are_clear_errors():
    loaded = tiny("tiny-llama")
    golden = kvlab.capture(loaded, loaded.encode(PROMPT), max_new_tokens=3)
    with pytest.raises(KvlabError, match="differs from the golden"):
        kvlab.capture(loaded, loaded.encode("something else"), force=golden)
    with pytest.raises(KvlabError, match="at least one prompt token"):
        kvlab.capture(loaded, [], max_new_tokens=3)
    with pytest.raises(KvlabError, match="dtype=bfloat16"):
        kvlab.capture(loaded, [1, 2], "dtype=bfloat16")
    with pytest.raises(KvlabError, match="torch.distributed"):
        kvlab.capture(loaded, [1, 2], "tp=2")


def test_capture_function_survives_importing_its_module():
    import importlib

    module = importlib.import_module("kvlab.capture")  # what the CLI and kvlab.distributed do
    assert module.capture is kvlab.capture and kvlab.capture.__name__ == "capture"
    loaded = tiny("tiny-llama")
    assert kvlab.capture(loaded, [1, 2, 3], max_new_tokens=2).token_ids[:3] == [1, 2, 3]
