import pytest
import torch

from kvlab.scales.rank_heads import heads_of_rank
from kvlab.scales.scales import KVScales


@pytest.mark.parametrize(
    "tp, heads, kv, expected",
    [
        (1, 9, 3, [[0, 1, 2]]),
        (3, 9, 3, [[0], [1], [2]]),                                  # contiguous, one head each
        (2, 8, 4, [[0, 1], [2, 3]]),                                 # contiguous
        (6, 9, 3, [[0], [0], [1], [1], [2], [2]]),                   # replicate: head r // (tp/kv)
        (4, 4, 1, [[0], [0], [0], [0]]),                             # MQA replicated
        (2, 9, 3, [[0, 0, 0, 1, 1], [1, 2, 2, 2, None]]),           # convert-to-MHA, q_pad = 10
        (3, 4, 4, [[0, 1], [2, 3], [None, None]]),                   # padded MHA: trailing rank all padding
        (2, 4, 4, [[0, 1], [2, 3]]),                                 # MHA, heads % tp == 0: contiguous
    ],
)
def test_heads_of_rank_follows_the_auto_rules(tp, heads, kv, expected):
    assert heads_of_rank(tp, heads, kv) == expected


def test_reference_example_straddles_groups():
    # REFERENCE: q=24, kv=6, tp=8 -> r0 [0,0,0], r1 [0,1,1], r2 [1,1,2]
    slots = heads_of_rank(8, 24, 6)
    assert slots[:3] == [[0, 0, 0], [0, 1, 1], [1, 1, 2]]
    assert [h for rank in slots for h in rank] == [h for h in range(6) for _ in range(4)]


def test_bad_geometry():
    with pytest.raises(ValueError, match="share"):
        heads_of_rank(2, 9, 2)
    with pytest.raises(ValueError, match="tp"):
        heads_of_rank(0, 4, 2)


def test_folding_per_head_scales_to_ranks():
    # layer 0: K scales per head 1, 2, 3 and V 3, 1, 1 -> max(K, V) per head = 3, 2, 3
    scales = KVScales((torch.tensor([1.0, 2.0, 3.0]),), (torch.tensor([3.0, 1.0, 1.0]),))
    assert scales.to_ranks(1, 9, 3) == {0: {0: 3.0}}
    assert scales.to_ranks(3, 9, 3) == {0: {0: 3.0}, 1: {0: 2.0}, 2: {0: 3.0}}
    # tp=2 on 9/3 straddles: r0 holds heads 0, 1; r1 holds 1, 2 and a pad slot
    assert scales.to_ranks(2, 9, 3) == {0: {0: 3.0}, 1: {0: 3.0}}
    # padding-only rank (MHA 4 heads on 3 ranks) gets the layer's largest scale
    mha = KVScales((torch.tensor([1.0, 2.0, 3.0, 4.0]),), (torch.tensor([0.5, 0.5, 0.5, 0.5]),))
    assert mha.to_ranks(3, 4, 4) == {0: {0: 2.0}, 1: {0: 4.0}, 2: {0: 4.0}}


def test_unfolding_ranks_to_heads():
    ranks = {0: {0: 1.0}, 1: {0: 2.0}, 2: {0: 5.0}, 3: {0: 3.0}, 4: {0: 4.0}, 5: {0: 0.5}}
    per_head = KVScales.from_ranks(ranks, 9, 3, per_head=True)  # replicate: head h on ranks 2h, 2h+1
    assert per_head.keys[0].tolist() == [2.0, 5.0, 4.0] and per_head.values[0].tolist() == [2.0, 5.0, 4.0]
    assert KVScales.from_ranks(ranks, 9, 3, per_head=False).keys[0].tolist() == [5.0]
