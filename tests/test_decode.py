"""The one decode loop: generate's tokens, teacher forcing, end of sequence, the callback, batches."""

import pytest
import torch

from kvlab.caches import parse_policy
from kvlab.decode import Step, decode_n_tokens, eos_ids, policy_cache, run_steps
from kvlab.intercept import current_attention
from tests.conftest import tiny

VOCAB = 7


def _counting_forward(feed: torch.Tensor):
    """Logits whose argmax is (last fed token + 1) mod VOCAB, per row."""
    nxt = (feed[:, -1] + 1) % VOCAB
    return torch.nn.functional.one_hot(nxt, VOCAB).float(), None


def test_generated_tokens_and_cache_are_generate_s():
    loaded = tiny("tiny-llama")
    model = loaded.model
    ids = loaded.encode("The loop is written once.")
    want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    steps: list[Step] = []
    for mask in (True, False):
        steps.clear()
        got = decode_n_tokens(model, parse_policy("dynamic").build(model), ids, 6, callback=steps.append,
                              attention_mask=mask)
        assert ids + got.ids == want.sequences[0].tolist()
        assert torch.equal(got.tokens, got.greedy) and got.tokens.shape == (1, 6)
        assert [s.index for s in steps] == list(range(6)) and len(got.seconds) == 6
        assert all(s.logits.shape == (1, loaded.config.vocab_size) and s.seconds >= 0 for s in steps)
        # the last token is chosen, never fed: the cache holds the prompt and the first five
        assert got.cache.get_seq_length() == len(ids) + 5
        for mine, theirs in zip(got.cache.layers, want.past_key_values.layers):
            assert torch.equal(mine.keys, theirs.keys)


def test_forced_tokens_are_fed_and_the_model_s_own_choices_kept():
    got = run_steps(_counting_forward, [3], 5, forced=[0, 0, 0])
    assert got.ids == [0, 0, 0, 1, 2]  # forced while there are forced tokens, then the model's own
    assert got.greedy[0].tolist() == [4, 1, 1, 1, 2]


def test_the_loop_stops_after_an_end_token_and_the_callback_sees_that_step():
    seen: list[int] = []
    got = run_steps(_counting_forward, [0, 1], 10, eos={4}, callback=lambda step: seen.append(int(step.token[0])))
    assert got.ids == [2, 3, 4] and seen == [2, 3, 4]
    assert run_steps(_counting_forward, [0], 3, eos=set()).ids == [1, 2, 3]


def test_a_batch_is_forced_row_by_row():
    feed = torch.tensor([[0, 1], [4, 5]])
    got = run_steps(_counting_forward, feed, 3, forced=torch.tensor([[6, 2], [0, 0]]))
    assert got.tokens.tolist() == [[6, 2, 3], [0, 0, 1]]
    assert got.greedy.tolist() == [[2, 0, 3], [6, 1, 1]]


def test_no_steps_give_no_tokens():
    got = run_steps(_counting_forward, [1], 0)
    assert got.tokens.shape == (1, 0) and got.ids == [] and got.seconds == []


def test_policy_cache_puts_the_attention_back_after_an_error():
    model = tiny("tiny-llama").model
    before = current_attention(model)
    with pytest.raises(RuntimeError):
        with policy_cache(model, parse_policy("dynamic"), attention="eager") as cache:
            assert current_attention(model) == "eager" and cache is not None
            raise RuntimeError
    assert current_attention(model) == before


def test_eos_ids_reads_the_generation_config():
    model = tiny("tiny-llama").model
    eos = model.generation_config.eos_token_id
    assert eos_ids(model) == (set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set()))


def test_the_loop_and_intercept_stand_on_the_ground_floor():
    from pathlib import Path

    from tests.import_graph import import_graph

    graph = import_graph(Path(__file__).resolve().parents[1] / "src", "kvlab")
    assert graph["kvlab.intercept"] == {"kvlab.model_facts"}
    assert graph["kvlab.decode"] == {"kvlab.intercept"}
