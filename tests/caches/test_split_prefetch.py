"""The split caches' fetch schedule: each layer's far part lands once per step, the next layer
is fetched while the current one runs, and the last layer fetches layer 0 of the next step."""

from __future__ import annotations

import torch

from kvlab.runspec import RunSpec
from tests.conftest import tiny


def _run(run: str, prompt: int, steps: int):
    loaded = tiny("tiny-mha")
    policy = RunSpec.parse(run).policy
    cache = policy.build(loaded.model, batch_size=2, max_length=prompt + steps)
    ids = torch.randint(0, 256, (2, prompt + steps), generator=torch.Generator().manual_seed(0))
    with policy.session(loaded.model), torch.no_grad():
        loaded.model(ids[:, :prompt], past_key_values=cache, use_cache=True)
        after_prefill = cache.mover.bytes_in
        for t in range(steps):
            loaded.model(ids[:, prompt + t:prompt + t + 1], past_key_values=cache, use_cache=True)
    return loaded, cache, after_prefill


def test_flexgen_fetches_every_far_row_once_per_step():
    prompt, steps, g = 30, 4, 12
    loaded, cache, after_prefill = _run(f"cache=flexgen:gpu_len={g}", prompt, steps)
    layers = loaded.config.num_hidden_layers
    row = cache.layers[0].far.row_bytes
    # prefill: only the last layer's prefetch of layer 0 moves anything: P - g rows
    assert after_prefill == (prompt - g) * row
    # step t: layers 1..L-1 land P + t - g rows each, layer 0 (for the next step) P + t + 1 - g
    expected = after_prefill + sum((layers - 1) * (prompt + t - g) + (prompt + t + 1 - g) for t in range(steps)) * row
    assert cache.mover.bytes_in == expected
    # what is written: every new position past the split, once
    assert sum(layer.far.bytes_in for layer in cache.layers) == layers * (prompt + steps - g) * row
    assert cache.bytes_moved() == expected + layers * (prompt + steps - g) * row


def test_kvpr_fetches_activations_and_far_kv_on_two_lanes():
    prompt, steps, l = 30, 3, 10
    loaded, cache, _ = _run(f"cache=kvpr:recompute_len={l}", prompt, steps)
    layer = cache.layers[0]
    act_row, kv_row = layer.acts.row_bytes, layer.far.row_bytes
    assert act_row * 2 == kv_row  # MHA: an activation row is half a K/V row
    slots = {lane for lane, _ in cache.mover._buffers}
    assert slots == {"act", "kv"}
    layers = loaded.config.num_hidden_layers
    per_step = [(layers - 1) * (l * act_row + (prompt + t - l) * kv_row) + l * act_row + (prompt + t + 1 - l) * kv_row
                for t in range(steps)]
    assert cache.mover.bytes_in == (l * act_row + (prompt - l) * kv_row) + sum(per_step)
    # device bytes: the two landing buffers per lane and the rotary rows, no K/V kept resident
    assert 0 < cache.device_bytes() < layers * (prompt + steps) * kv_row
