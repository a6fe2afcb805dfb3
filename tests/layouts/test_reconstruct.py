"""shard / reconstruct: exact round trips over the strategy registry, and located findings."""

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kvlab
from kvlab.layouts import LayoutError, NotApplicable, make_layout, merge_tensor, reconstruct, shard, shard_tensor
from kvlab.layouts import strategy_names
from kvlab.snapshot import Snapshot
from tests.conftest import tiny

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (n_heads, n_kv_heads, tp) cases every strategy that applies must round-trip; the grid covers
# kv > tp, tp % kv != 0, MHA with tail padding, ranks holding only padding, MQA.
GRID = [
    (24, 6, 8), (9, 3, 2), (9, 3, 3), (9, 3, 4), (32, 8, 4), (12, 6, 4), (6, 6, 4), (4, 4, 8),
    (8, 2, 8), (4, 1, 4), (4, 2, 1), (10, 5, 3), (14, 7, 2), (16, 8, 6),
]


BOX = [(kv, group, inner) for kv in range(1, 9) for group in range(1, 5) for inner in range(1, 10)]


@st.composite
def layouts(draw, name=None, where=lambda layout: True, seq_split=None):
    """A layout of a registered strategy, with random modifiers, satisfying `where`.

    Counts are drawn from BOX; when the strategy does not apply there (or `where` refuses the
    layout) the next counts in BOX are tried, so no draw is thrown away.
    """
    names = strategy_names()
    first = draw(st.integers(0, len(names) - 1))
    names = [name] if name else names[first:] + names[:first]  # a strategy that can satisfy `where`
    start = draw(st.integers(0, len(BOX) - 1))
    dp = draw(st.sampled_from([1, 1, 2, 3]))
    split = draw(st.booleans()) if seq_split is None else seq_split
    reorder = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    for candidate in names:
        for kv, group, inner in BOX[start:] + BOX[:start]:
            tp = inner * dp
            order = torch.randperm(tp, generator=torch.Generator().manual_seed(seed)).tolist() if reorder else None
            try:
                layout = make_layout(candidate, tp, kv * group, kv, dp=dp, seq_split=split, rank_order=order)
            except NotApplicable:
                continue
            if where(layout):
                return layout
    raise AssertionError(f"no layout of {names} in the test box satisfies the condition")


def replicated(layout):
    return any(len(_copies(layout, h)) >= 2 for h in range(layout.n_kv_heads))


def padded(layout):
    return any(h is None for slots in layout.slots for h in slots)


def cache(layout, batch, seq, dim=3, seed=0):
    """Distinct random values; batch is at least dp so every batch group serves a row."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch * layout.dp, layout.n_kv_heads, seq, dim, generator=generator)


@pytest.mark.parametrize("name", strategy_names())
@SETTINGS
@given(data=st.data())
def test_reconstruct_of_shard_is_exact_for_every_strategy(name, data):
    layout = data.draw(layouts(name))
    x = cache(layout, data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)))
    parts = shard_tensor(x, layout)
    assert len(parts) == layout.tp
    for rank, part in enumerate(parts):
        assert part.shape[1] == len(layout.heads(rank))
    y, check = merge_tensor(parts, layout, seq_len=x.shape[2])
    assert torch.equal(y, x)
    assert check.problems == [] and max(check.replica_diff) == 0 and max(check.padding_abs) == 0


@pytest.mark.parametrize("q, kv, tp", GRID)
@pytest.mark.parametrize("name", strategy_names())
@pytest.mark.parametrize("modifiers", [{}, {"seq_split": True}, {"dp": 2}, {"rank_order": "reversed"}],
                         ids=["plain", "seq_split", "dp2", "reordered"])
def test_grid_round_trips_with_each_modifier(name, q, kv, tp, modifiers):
    modifiers = dict(modifiers)
    if modifiers.get("dp"):
        tp *= modifiers["dp"]
    if modifiers.get("rank_order"):
        modifiers["rank_order"] = list(reversed(range(tp)))
    try:
        layout = make_layout(name, tp, q, kv, **modifiers)
    except NotApplicable:
        return
    x = cache(layout, 2, 7, seed=tp)
    y, check = merge_tensor(shard_tensor(x, layout), layout, seq_len=7)
    assert torch.equal(y, x) and not check.problems


def test_sequence_split_puts_position_p_on_rank_p_mod_g_at_slot_p_div_g():
    layout = make_layout("replicate", 6, 4, 2, seq_split=True)  # heads 0 and 1, each on 3 ranks
    x = torch.arange(2 * 7, dtype=torch.float32).reshape(1, 2, 7, 1) + 1
    parts = shard_tensor(x, layout)
    assert [p.shape[2] for p in parts] == [3] * 6  # ceil(7 / 3)
    for p in range(7):
        assert parts[p % 3][0, 0, p // 3, 0] == x[0, 0, p, 0]  # head 0 on ranks 0..2
        assert parts[3 + p % 3][0, 0, p // 3, 0] == x[0, 1, p, 0]  # head 1 on ranks 3..5
    assert parts[1][0, 0, 2, 0] == 0 and parts[2][0, 0, 2, 0] == 0  # positions 7 and 8 do not exist: padding
    y, _ = merge_tensor(parts, layout, seq_len=7)
    assert torch.equal(y, x)


def test_batch_slices_go_to_their_group():
    layout = make_layout("contiguous", 4, 4, 2, dp=2)
    x = cache(layout, 2, 5)  # 4 rows: rows 0-1 on ranks 0-1, rows 2-3 on ranks 2-3
    parts = shard_tensor(x, layout)
    assert torch.equal(parts[0][:, 0], x[:2, 0]) and torch.equal(parts[3][:, 0], x[2:, 1])


# ---- findings ----------------------------------------------------------------------------
def _copies(layout, head, group=0):
    return [(layout.physical(r), s) for r, slots in layout.holders(head, group) for s in slots]


@SETTINGS
@given(data=st.data())
def test_a_corrupted_replica_is_named_at_its_layer_tensor_head_rank_and_position(data):
    layout = data.draw(layouts(where=replicated, seq_split=False))
    head = data.draw(st.sampled_from([h for h in range(layout.n_kv_heads) if len(_copies(layout, h)) >= 2]))
    copies = _copies(layout, head)
    victim = data.draw(st.sampled_from(copies))
    n_layers, layer, tensor = 3, data.draw(st.integers(0, 2)), data.draw(st.sampled_from([0, 1]))
    position, row = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 1))
    full = [(cache(layout, 2, 6, seed=2 * i), cache(layout, 2, 6, seed=2 * i + 1)) for i in range(n_layers)]
    shards = shard(full, layout)
    rank, slot = victim
    shards[rank][layer][tensor][row, slot, position, 1] += 0.5

    result = reconstruct(shards, layout)
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert (problem.kind, problem.layer, problem.tensor, problem.head) == ("replica", layer, ("keys", "values")[tensor], head)
    assert (problem.position, problem.batch) == (position, row)
    assert problem.max_abs == pytest.approx(0.5)
    if len(copies) >= 3:  # the majority names the corrupted copy, and the rebuilt cache is still right
        assert (problem.rank, problem.slot) == victim
        assert all(torch.equal(a, b) for a, b in zip(sum(result.layers, ()), sum(full, ())))
    else:  # two copies: both are named, either may be the wrong one
        assert {(problem.rank, problem.slot), problem.reference} == set(copies)
    assert result.replica_max_diff == pytest.approx(0.5) and result.padding_max_abs == 0
    assert result.checks[layer][("keys", "values")[tensor]].replica_diff[head] == pytest.approx(0.5)
    assert not result.ok


@SETTINGS
@given(data=st.data())
def test_non_zero_padding_is_named_at_its_rank_slot_and_position(data):
    layout = data.draw(layouts(where=padded, seq_split=False))
    pads = [(layout.physical(r), s) for r, slots in enumerate(layout.slots) for s, h in enumerate(slots) if h is None]
    rank, slot = data.draw(st.sampled_from(pads))
    layer, position = data.draw(st.integers(0, 1)), data.draw(st.integers(0, 4))
    full = [(cache(layout, 1, 5, seed=i), cache(layout, 1, 5, seed=9 + i)) for i in range(2)]
    shards = shard(full, layout)
    shards[rank][layer][1][0, slot, position, 2] = -3.0

    result = reconstruct(shards, layout)
    (problem,) = result.problems
    assert (problem.kind, problem.layer, problem.tensor, problem.rank, problem.slot, problem.position) == (
        "padding", layer, "values", rank, slot, position)
    assert result.padding_max_abs == 3.0 and result.replica_max_diff == 0
    assert all(torch.equal(a, b) for a, b in zip(sum(result.layers, ()), sum(full, ())))


def test_the_majority_names_the_odd_copy_even_when_it_comes_first():
    layout = make_layout("replicate", 6, 4, 2, rank_order=[5, 4, 3, 2, 1, 0])  # head 0 on ranks 5, 4, 3
    x = cache(layout, 1, 4)
    parts = shard_tensor(x, layout)
    parts[5][0, 0, 2, 0] -= 1.0  # the first copy in layout order
    y, check = merge_tensor(parts, layout)
    (problem,) = check.problems
    assert (problem.rank, problem.reference, problem.copies, problem.position) == (5, (4, 0), 3, 2)
    assert "the copy most of the 3 copies agree with" in problem.message()
    assert torch.equal(y, x)


def test_sequence_split_tail_must_be_zero_and_positions_map_back():
    layout = make_layout("replicate", 4, 4, 2, seq_split=True)  # each head on 2 ranks; 7 positions -> 4 per rank
    x = cache(layout, 1, 7)
    parts = shard_tensor(x, layout)
    parts[3][0, 0, 3, 0] = 1.0  # rank 3 is the second rank of head 1: local position 3 would be position 7
    parts[0][0, 0, 2, 1] += 0.25  # rank 0 holds positions 0, 2, 4, 6 of head 0 with no replica
    _, check = merge_tensor(parts, layout, seq_len=7, layer=2, tensor="values")
    (problem,) = check.problems
    assert (problem.kind, problem.rank, problem.slot, problem.position) == ("padding", 3, 0, 7)
    assert "padding of rank 3 slot 0 is not zero" in problem.message()


def test_replicas_inside_one_rank_are_checked_under_a_sequence_split():
    layout = make_layout("mha", 2, 8, 2, seq_split=True)  # r0 [0,0,0,0], r1 [1,1,1,1]: one rank per head
    x = cache(layout, 1, 5)
    parts = shard_tensor(x, layout)
    parts[1][0, 2, 4, 0] += 2.0
    y, check = merge_tensor(parts, layout, seq_len=5)
    (problem,) = check.problems
    assert (problem.rank, problem.slot, problem.head, problem.position) == (1, 2, 1, 4)
    assert torch.equal(y, x)


def test_nan_in_one_replica_is_an_infinite_disagreement_and_shared_nan_is_not():
    layout = make_layout("replicate", 3, 3, 1)
    x = cache(layout, 1, 4)
    x[0, 0, 1, 0] = float("nan")
    parts = shard_tensor(x, layout)
    y, check = merge_tensor(parts, layout)
    assert check.problems == [] and torch.equal(y.isnan(), x.isnan())
    parts[2][0, 0, 3, 2] = float("nan")
    _, check = merge_tensor(parts, layout)
    (problem,) = check.problems
    assert problem.rank == 2 and math.isinf(problem.max_abs) and problem.to_dict()["max_abs"] is None


def test_replica_atol_accepts_small_differences():
    layout = make_layout("replicate", 2, 2, 1)
    parts = shard_tensor(cache(layout, 1, 4), layout)
    parts[1][0, 0, 0, 0] += 1e-6
    _, check = merge_tensor(parts, layout, replica_atol=1e-5)
    assert not check.problems and 0 < check.replica_diff[0] < 1e-5


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda p: p.__setitem__(1, p[1][:, :1]), "rank 1 holds 1 KV heads but layout mha (tp=4, 3 KV heads) puts 2"),
        (lambda p: p.__setitem__(2, p[2][:, :, :4]), "mismatched seq lengths: rank 0 holds 5 positions, rank 2 4"),
        (lambda p: p.pop(), "3 shards for layout mha with tp=4"),
        (lambda p: p.__setitem__(0, p[0][0]), "rank 0 has shape (2, 5, 3), expected [batch, kv_heads, seq, head_dim]"),
        (lambda p: p.__setitem__(3, p[3][:, :, :, :2]), "head_dim differs"),
        (lambda p: p.__setitem__(0, p[0].double()), "dtype differs"),
    ],
)
def test_shards_that_do_not_fit_the_layout_are_clear_errors(mutate, fragment):
    layout = make_layout("mha", 4, 6, 3)  # r0 [0,0] r1 [1,1] r2 [2,2] r3 [-,-]
    parts = shard_tensor(cache(layout, 1, 5), layout)
    mutate(parts)
    with pytest.raises(LayoutError) as err:
        merge_tensor(parts, layout, layer=4, tensor="values")
    assert str(err.value).startswith("layer 4 values: ") and fragment in str(err.value)


def test_batch_groups_must_hold_one_batch_size():
    layout = make_layout("replicate", 4, 2, 1, dp=2)
    parts = shard_tensor(cache(layout, 2, 3), layout)
    parts[1] = parts[1][:1]
    with pytest.raises(LayoutError, match="ranks of batch group 0 hold different batch sizes"):
        merge_tensor(parts, layout)


# ---- snapshots ---------------------------------------------------------------------------
def test_snapshot_shards_record_their_layout_and_rebuild_the_capture(tmp_path):
    loaded = tiny("tiny-llama")
    snap = kvlab.capture(loaded, loaded.encode("shard me"), max_new_tokens=4)
    layout = make_layout("mha", 3, 4, 2)  # r0 [0,0] r1 [1,1] r2 [-,-]
    shards = shard(snap, layout)
    for rank, part in enumerate(shards):
        part.save(tmp_path / f"rank{rank}")
    loaded_shards = [Snapshot.load(tmp_path / f"rank{r}") for r in (2, 0, 1)]  # any order: ranks are recorded
    assert loaded_shards[0].layout == {**layout.rank_meta(2), "seq_len": snap.shape(0)[2]}
    assert loaded_shards[0].keys(1).shape == (1, 2, snap.shape(0)[2], 16)

    result = reconstruct(loaded_shards)
    assert result.layout.placement() == layout.placement() and result.ok
    rebuilt = result.to_snapshot(loaded_shards[1].meta, logits=loaded_shards[1].logits())
    for i in range(snap.n_layers):
        assert torch.equal(rebuilt.keys(i), snap.keys(i)) and torch.equal(rebuilt.values(i), snap.values(i))
    assert rebuilt.token_ids == snap.token_ids and rebuilt.layout is None
    assert rebuilt.meta["reconstructed_from"]["layout"] == "mha" and torch.equal(rebuilt.logits(), snap.logits())
    with pytest.raises(LayoutError, match="written with layout mha"):
        reconstruct(loaded_shards, make_layout("contiguous", 2, 4, 2))


@example(batch=1)
@SETTINGS
@given(batch=st.integers(1, 3))
def test_json_report_has_the_contract_keys(batch):
    layout = make_layout("replicate", 2, 2, 1)
    shards = shard([(cache(layout, batch, 3), cache(layout, batch, 3, seed=1))], layout)
    data = reconstruct(shards, layout).to_dict()
    assert {"layout", "tp", "replica_max_diff", "padding_max_abs", "problems"} <= set(data)
    assert data["layout"] == "replicate" and data["tp"] == 2 and data["problems"] == []
    assert data["layers"][0]["keys"]["replica_max_diff_by_head"] == [0.0]
