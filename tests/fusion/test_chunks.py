import math

import pytest
import torch
from transformers import DynamicCache

from kvlab.fusion.chunks import ChunkKV, chunk_key, compute_chunk_kv
from kvlab.fusion.store import CorruptChunkError, MemoryStore, open_store
from tests.conftest import TINY_FAMILIES, tiny


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_chunk_after_prefix_equals_that_part_of_a_full_run(name):
    loaded = tiny(name)
    prefix = loaded.encode("System: answer briefly.")
    chunk = loaded.encode(" Water boils at 100 degrees.")
    key, kv = compute_chunk_kv(loaded, chunk, prefix, surprisal=True)
    cache = DynamicCache(config=loaded.config)
    out = loaded.model(torch.tensor([prefix + chunk]), past_key_values=cache, use_cache=True)
    for i, layer in enumerate(cache.layers):
        assert torch.allclose(layer.keys[:, :, len(prefix):], kv.keys[i], atol=1e-5)
        assert torch.allclose(layer.values[:, :, len(prefix):], kv.values[i], atol=1e-5)
    logp = torch.log_softmax(out.logits[0].float(), dim=-1)
    rows = logp[len(prefix) - 1: len(prefix) + len(chunk) - 1]
    expected = -rows.gather(-1, torch.tensor(chunk)[:, None])[:, 0]
    assert torch.allclose(kv.surprisal, expected, atol=1e-4)
    assert key.position_base == len(prefix) and kv.meta["checksum"] == kv.checksum()


def test_chunk_without_prefix_has_unknown_first_surprisal():
    _, kv = compute_chunk_kv(tiny("tiny-llama"), [5, 6, 7], surprisal=True)
    assert math.isnan(float(kv.surprisal[0])) and not torch.isnan(kv.surprisal[1:]).any()


def test_key_separates_model_dtype_prefix_and_tokens():
    llama, qwen = tiny("tiny-llama"), tiny("tiny-qwen2")
    base = chunk_key(llama, [1, 2, 3])
    assert base.digest() == chunk_key(llama, [1, 2, 3]).digest()
    others = [
        chunk_key(qwen, [1, 2, 3]),
        chunk_key(tiny("tiny-llama", "dtype=bfloat16"), [1, 2, 3]),
        chunk_key(llama, [1, 2, 4]),
        chunk_key(llama, [1, 2, 3], prefix_ids=[9]),
        chunk_key(llama, [1, 2, 3], prefix_ids=[8]),
    ]
    digests = {k.digest() for k in others} | {base.digest()}
    assert len(digests) == len(others) + 1


def test_memory_store_contract():
    loaded = tiny("tiny-llama")
    key, kv = compute_chunk_kv(loaded, [3, 4, 5, 6])
    store = open_store("memory://")
    assert isinstance(store, MemoryStore)
    assert store.get(key) is None and store.put(key, kv) and not store.put(key, kv)
    back = store.get(key)
    assert torch.equal(back.keys[1], kv.keys[1])
    assert store.stats()["entries"] == 1
    kv.values[0].view(-1)[0] += 1  # damage the stored bytes
    with pytest.raises(CorruptChunkError, match="checksum"):
        store.get(key)
    assert store.delete(key) and store.get(key) is None


def test_round_trip_through_tensors():
    _, kv = compute_chunk_kv(tiny("tiny-qwen2"), [1, 2, 3], [7], surprisal=True)
    again = ChunkKV.from_tensors(kv.tensors(), kv.meta)
    assert again.checksum() == kv.checksum() and again.n_layers == 4 and again.n_tokens == 3
