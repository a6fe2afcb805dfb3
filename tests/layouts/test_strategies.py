import pytest

from kvlab.errors import KvlabError
from kvlab.layouts import Layout, LayoutError, NotApplicable, applicable, auto_choice, make_layout, strategy_names
from kvlab.layouts import strategies


def heads(layout):
    return [list(layout.heads(r)) for r in range(layout.tp)]


def test_reference_example_convert_to_mha_q24_kv6_tp8():
    layout = make_layout("mha", tp=8, n_heads=24, n_kv_heads=6)
    assert heads(layout)[:3] == [[0, 0, 0], [0, 1, 1], [1, 1, 2]]
    # repeat-interleave: every KV head once per query head of its group, no padding needed
    assert sum(heads(layout), []) == [h for h in range(6) for _ in range(4)]


def test_mha_pads_the_tail_and_trailing_ranks_can_hold_only_padding():
    layout = make_layout("mha", tp=8, n_heads=9, n_kv_heads=3)
    assert heads(layout) == [[0, 0], [0, 1], [1, 1], [2, 2], [2, None], [None, None], [None, None], [None, None]]
    # a rank straddling two groups
    assert heads(make_layout("mha", tp=2, n_heads=9, n_kv_heads=3)) == [[0, 0, 0, 1, 1], [1, 2, 2, 2, None]]


def test_contiguous_and_replicate():
    assert heads(make_layout("contiguous", 4, 32, 8)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert heads(make_layout("contiguous", 3, 9, 3)) == [[0], [1], [2]]
    assert heads(make_layout("replicate", 8, 32, 2)) == [[0]] * 4 + [[1]] * 4
    assert heads(make_layout("replicate", 4, 4, 1)) == [[0]] * 4


def test_padded_mha_is_contiguous_with_tail_padding():
    assert heads(make_layout("padded-mha", 4, 6, 6)) == [[0, 1], [2, 3], [4, 5], [None, None]]
    assert heads(make_layout("padded-mha", 2, 4, 4)) == heads(make_layout("contiguous", 2, 4, 4))


@pytest.mark.parametrize(
    "tp, q, kv, chosen",
    [
        (8, 24, 6, "mha"),  # tp % kv != 0: NxDI falls back to convert-to-MHA
        (4, 32, 8, "contiguous"),  # kv % tp == 0 (kv > tp)
        (8, 32, 8, "contiguous"),  # kv == tp
        (8, 32, 2, "replicate"),  # tp % kv == 0, kv < tp
        (4, 4, 1, "replicate"),  # MQA
        (3, 9, 3, "contiguous"),  # smollm2 at tp=3
        (2, 9, 3, "mha"),  # smollm2 at tp=2
        (4, 12, 6, "mha"),  # kv > tp but kv % tp != 0
        (4, 6, 6, "padded-mha"),  # MHA, heads % tp != 0
        (4, 8, 8, "contiguous"),  # MHA, heads % tp == 0
    ],
)
def test_auto_picks_what_nxdi_picks(tp, q, kv, chosen):
    assert auto_choice(tp, q, kv) == chosen
    layout = make_layout("auto", tp, q, kv)
    assert layout.name == chosen
    assert heads(layout) == heads(make_layout(chosen, tp, q, kv))


@pytest.mark.parametrize(
    "name, tp, q, kv, fragment",
    [
        ("contiguous", 8, 24, 6, "use mha (auto picks mha)"),
        ("replicate", 4, 24, 6, "use mha (auto picks mha)"),
        ("replicate", 2, 8, 8, "padded-mha"),
        ("padded-mha", 8, 32, 2, "use replicate or mha (auto picks replicate)"),
    ],
)
def test_a_strategy_that_does_not_apply_says_which_would(name, tp, q, kv, fragment):
    with pytest.raises(NotApplicable) as err:
        make_layout(name, tp, q, kv)
    assert isinstance(err.value, KvlabError)
    assert f"layout {name} does not apply to tp={tp}, {q} heads, {kv} KV heads" in str(err.value)
    assert fragment in str(err.value)


def test_bad_counts_and_names_are_clear_errors():
    with pytest.raises(LayoutError, match="cannot share 4 KV heads evenly"):
        make_layout("mha", 2, 6, 4)
    with pytest.raises(LayoutError, match="unknown layout 'ring'; known: contiguous"):
        make_layout("ring", 2, 4, 2)
    with pytest.raises(LayoutError, match="dp=3 must divide tp=4"):
        make_layout("auto", 4, 4, 2, dp=3)
    with pytest.raises(LayoutError, match="not a permutation"):
        make_layout("auto", 2, 4, 2, rank_order=[0, 0])
    with pytest.raises(LayoutError, match="held by no rank"):
        Layout("hand-made", 3, ((0,), (1,)))


def test_modifiers_compose_with_any_strategy():
    layout = make_layout("replicate", 8, 8, 2, dp=2, rank_order=[1, 0, 3, 2, 5, 4, 7, 6])
    assert layout.group_size == 4
    # the strategy lays out 4 ranks; each batch group repeats it; physical rank 0 holds logical rank 1's shard
    assert heads(layout) == [[0], [0], [1], [1], [0], [0], [1], [1]]
    assert layout.logical(0) == 1 and layout.physical(1) == 0
    assert layout.holders(1, group=1) == [(6, [0]), (7, [0])]


def test_layout_metadata_round_trips():
    layout = make_layout("mha", 4, 9, 3, dp=2, seq_split=True, rank_order=[3, 1, 2, 0])
    metas = {r: layout.rank_meta(r, seq_len=11) for r in range(4)}
    assert metas[0]["heads"] == list(layout.heads(0)) and metas[0]["rank"] == 0 and metas[0]["tp"] == 4
    assert Layout.from_rank_metas(metas) == layout
    del metas[2]
    with pytest.raises(LayoutError, match="ranks 2 have no shard"):
        Layout.from_rank_metas(metas)


def test_a_registered_strategy_joins_the_registry(monkeypatch):
    def reversed_contiguous(tp, q, kv):
        return [list(reversed(s)) for s in strategies.contiguous(tp, q, kv)][::-1]

    monkeypatch.setitem(strategies._STRATEGIES, "reversed", reversed_contiguous)
    assert "reversed" in strategy_names() and "reversed" in applicable(2, 4, 2)
    assert heads(make_layout("reversed", 2, 4, 2)) == [[1], [0]]
    with pytest.raises(NotApplicable, match="layout reversed does not apply"):
        make_layout("reversed", 4, 4, 2)


def test_strategy_decorator_refuses_a_second_function_under_one_name():
    with pytest.raises(ValueError, match="registered twice"):
        strategies.strategy("mha")(lambda tp, q, kv: [])


# ---- auto against NxDI's rule over a grid -------------------------------------------------------
GRID_TP = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
GRID_GROUPS = [1, 2, 3, 4, 7, 8]


def nxdi_rank_heads(tp: int, q: int, kv: int) -> list[list[int | None]]:
    """NxDI's placement restated from REFERENCE.md ("Tensor-parallel KV layouts", "Peers"): the KV head
    of every slot of every rank (None for a zero head), without kvlab's strategy functions."""
    q_pad = -(-q // tp) * tp
    if q == kv and q % tp == 0 or q != kv and kv % tp == 0:  # contiguous
        return [list(range(r * kv // tp, (r + 1) * kv // tp)) for r in range(tp)]
    if kv < tp and tp % kv == 0:  # replicate (MHA too, per gqa.py): rank r holds head r // (tp/kv)
        return [[r // (tp // kv)] for r in range(tp)]
    if q == kv:  # padded MHA: heads in order, zero heads at the tail
        flat = list(range(q)) + [None] * (q_pad - q)
    else:  # convert to MHA: repeat-interleave to q, then pad
        flat = [h for h in range(kv) for _ in range(q // kv)] + [None] * (q_pad - q)
    per = q_pad // tp
    return [flat[r * per:(r + 1) * per] for r in range(tp)]


def test_auto_follows_nxdi_over_the_grid():
    checked = changed = 0
    for tp in GRID_TP:
        for kv in range(1, 129):
            for group in GRID_GROUPS:
                q = kv * group
                if q > 128:
                    continue
                assert heads(make_layout("auto", tp, q, kv)) == nxdi_rank_heads(tp, q, kv), (tp, q, kv)
                checked += 1
                changed += q == kv and kv < tp and tp % kv == 0
    assert checked == 3300 and changed == 37  # the MHA cases the tail-padding rule got wrong


@pytest.mark.parametrize("tp, heads_, expected", [(32, 8, [[r // 4] for r in range(32)]),
                                                  (4, 2, [[0], [0], [1], [1]]),
                                                  (6, 3, [[0], [0], [1], [1], [2], [2]])])
def test_auto_replicates_mha_heads_over_more_ranks(tp, heads_, expected):
    layout = make_layout("auto", tp, heads_, heads_)
    assert layout.name == "replicate" and heads(layout) == expected
