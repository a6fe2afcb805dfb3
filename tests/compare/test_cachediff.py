import json
import weakref

import pytest
import torch

from kvlab.compare import cachediff, error_maps, tensor_errors
from kvlab.compare.diff import DiffError, diff_snapshots
from kvlab.compare.source import SnapshotSource
from kvlab.snapshot import Snapshot
from tests.compare.helpers import edited_copy, golden_run


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("golden") / "golden"
    golden_run().save(path)
    return path


# (layer, head, position, tensor): in the prompt, at the first generated token, the last row
PLACES = [(2, 1, 5, "keys"), (0, 0, 32, "values"), (3, 1, 38, "keys"), (1, 0, 0, "values")]


@pytest.mark.parametrize("layer,head,position,tensor", PLACES)
def test_one_perturbed_row_is_named_exactly(golden_dir, tmp_path, layer, head, position, tensor):
    golden = Snapshot.load(golden_dir)
    row = golden.keys(layer) if tensor == "keys" else golden.values(layer)
    changed = row[0, head, position].clone()
    changed[3] += 0.5 * row[0, head, position].norm()  # rel-L2 0.5 in that row only
    edited_copy(golden, [(layer, tensor, (0, head, position), changed)]).save(tmp_path / "test")

    result = diff_snapshots(golden, Snapshot.load(tmp_path / "test"))
    first = result.first_divergence
    assert (first.position, first.layer, first.head, first.tensor) == (position, layer, head, tensor)
    assert first.error == pytest.approx(0.5, rel=1e-5) and not first.nonfinite
    rel = result.cache.maps[tensor]["rel_l2"]
    assert torch.nonzero(rel).tolist() == [[layer, head, position]]
    other = "values" if tensor == "keys" else "keys"
    assert not result.cache.maps[other]["rel_l2"].any()
    assert result.worst_layers(1) == [layer] and result.worst_heads(1) == [(layer, head)]


def test_an_earlier_row_below_tolerance_does_not_count(golden_dir):
    golden = Snapshot.load(golden_dir)
    small = golden.keys(1)[0, 0, 3] * (1 + 1e-6)  # rel-L2 1e-6 < float32 tolerance 1e-4
    large = golden.values(3)[0, 1, 20] * 2  # rel-L2 1
    test = edited_copy(golden, [(1, "keys", (0, 0, 3), small), (3, "values", (0, 1, 20), large)])
    first = diff_snapshots(golden, test).first_divergence
    assert (first.position, first.layer, first.head, first.tensor) == (20, 3, 1, "values")
    assert diff_snapshots(golden, test, tol="1e-7").first_divergence.position == 3


def test_at_the_first_position_the_first_layer_in_computation_order_is_named_and_the_worst_beside_it(golden_dir):
    golden = Snapshot.load(golden_dir)
    edits = [(2, "values", (0, 1, 10), golden.values(2)[0, 1, 10] * 1.7),  # rel 0.7: the worst at 10
             (1, "values", (0, 0, 10), golden.values(1)[0, 0, 10] * 1.2),  # rel 0.2: the lowest layer at 10
             (1, "keys", (0, 1, 10), golden.keys(1)[0, 1, 10] * 1.1),  # rel 0.1: same layer, keys first
             (3, "keys", (0, 1, 11), golden.keys(3)[0, 1, 11] * 9)]  # later, though larger
    first = diff_snapshots(golden, edited_copy(golden, edits)).first_divergence
    assert (first.position, first.layer, first.head, first.tensor) == (10, 1, 1, "keys")
    assert first.error == pytest.approx(0.1, rel=1e-5)
    worst = first.worst
    assert (worst.position, worst.layer, worst.head, worst.tensor) == (10, 2, 1, "values")
    assert worst.error == pytest.approx(0.7, rel=1e-5)
    assert first.to_dict()["worst"]["layer"] == 2


def test_streamed_figures_equal_whole_tensor_metrics(golden_dir, monkeypatch):
    monkeypatch.setattr(cachediff, "CHUNK_ELEMENTS", 50)  # many chunks per layer
    golden = Snapshot.load(golden_dir)
    noise = torch.Generator().manual_seed(0)
    edits = []
    for layer in range(golden.n_layers):
        for tensor in ("keys", "values"):
            base = golden.keys(layer) if tensor == "keys" else golden.values(layer)
            edits.append((layer, tensor, (slice(None),), base + 0.01 * torch.randn(base.shape, generator=noise)))
    test = edited_copy(golden, edits)
    result = diff_snapshots(golden, test)
    for tensor in ("keys", "values"):
        for layer in range(golden.n_layers):
            g = golden.keys(layer) if tensor == "keys" else golden.values(layer)
            t = test.keys(layer) if tensor == "keys" else test.values(layer)
            want = tensor_errors(g, t)
            got = result.cache.layer_errors(tensor)[layer]
            assert got.max_abs == pytest.approx(want.max_abs, rel=1e-12)
            assert got.rel_l2 == pytest.approx(want.rel_l2, rel=1e-9)
            assert got.cosine == pytest.approx(want.cosine, rel=1e-12)
            for head in range(g.shape[1]):
                want = tensor_errors(g[:, head], t[:, head])
                assert result.cache.head_errors(tensor)[layer][head].rel_l2 == pytest.approx(want.rel_l2, rel=1e-9)
            maps = error_maps(g, t)
            for metric in ("max_abs", "rel_l2", "cosine"):
                assert torch.allclose(result.cache.maps[tensor][metric][layer], maps[metric][0].float())


def test_nan_and_inf_are_located_not_fatal(golden_dir, tmp_path):
    golden = Snapshot.load(golden_dir)
    nan_row = golden.values(2)[0, 1, 7].clone()
    nan_row[[0, 5]] = float("nan")
    inf_row = golden.keys(3)[0, 0, 30].clone()
    inf_row[2] = float("inf")
    edited_copy(golden, [(2, "values", (0, 1, 7), nan_row), (3, "keys", (0, 0, 30), inf_row)]).save(tmp_path / "t")
    result = diff_snapshots(golden, Snapshot.load(tmp_path / "t"))
    where = {(n.snapshot, n.tensor, n.layer, n.head, n.position, n.count) for n in result.cache.nonfinite}
    assert where == {("test", "values", 2, 1, 7, 2), ("test", "keys", 3, 0, 30, 1)}
    assert result.cache.nonfinite_rows == 2
    first = result.first_divergence
    assert (first.position, first.layer, first.head, first.tensor, first.nonfinite) == (7, 2, 1, "values", True)
    # the finite rows still give exact (zero) errors, and the JSON stays valid JSON
    assert result.cache.layer_errors("values")[2].rel_l2 == 0
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["first_divergence"]["error"] is None


def test_nan_in_the_golden_cache_is_reported_as_the_golden_one(golden_dir):
    golden = Snapshot.load(golden_dir)
    bad = edited_copy(golden, [(0, "keys", (0, 1, 4, 0), float("nan"))])
    result = diff_snapshots(bad, golden)
    assert [(n.snapshot, n.layer, n.head, n.position) for n in result.cache.nonfinite] == [("golden", 0, 1, 4)]


def test_at_most_one_layer_tensor_of_each_snapshot_is_alive(golden_dir, tmp_path, monkeypatch):
    golden = Snapshot.load(golden_dir)
    edited_copy(golden, [(1, "keys", (0, 0, 0, 0), 3.0)]).save(tmp_path / "t")
    alive, peak = [0], [0]
    original = SnapshotSource.tensor

    def counting(self, layer, which):
        tensor = original(self, layer, which)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
        return tensor

    monkeypatch.setattr(SnapshotSource, "tensor", counting)
    result = diff_snapshots(golden, Snapshot.load(tmp_path / "t"))
    assert result.first_divergence.layer == 1
    assert peak[0] == 2  # one golden and one test tensor at a time, never a whole cache


def test_mismatched_snapshots_are_one_line_errors(golden_dir):
    golden = Snapshot.load(golden_dir)
    other_model = golden_run("tiny-mha")
    with pytest.raises(DiffError, match="different models: golden tiny-llama .* vs test tiny-mha"):
        diff_snapshots(golden, other_model)
    ids = golden.token_ids
    ids[12] = (ids[12] + 1) % 256
    with pytest.raises(DiffError, match="different token ids .*differ at token 12.*--force-tokens"):
        diff_snapshots(golden, edited_copy(golden, meta={"token_ids": ids}))
    shorter = Snapshot.from_layers(
        [(golden.keys(i)[:, :, :-1], golden.values(i)[:, :, :-1]) for i in range(golden.n_layers)],
        {k: v for k, v in golden.meta.items() if k != "n_layers"})
    with pytest.raises(DiffError, match=r"layer 0 keys shapes differ: golden \[1, 2, 39, 16\] vs test \[1, 2, 38, 16\]"):
        diff_snapshots(golden, shorter)
    fewer = Snapshot.from_layers([golden.layer(i) for i in range(2)],
                                 {k: v for k, v in golden.meta.items() if k != "n_layers"})
    with pytest.raises(DiffError, match="different layer counts: golden 4, test 2"):
        diff_snapshots(golden, fewer)
    shard = Snapshot.from_layers([(k[:, :1], v[:, :1]) for k, v in (golden.layer(i) for i in range(4))],
                                 {**{k: v for k, v in golden.meta.items() if k != "n_layers"},
                                  "layout": {"name": "contiguous", "tp": 2, "rank": 1}})
    with pytest.raises(DiffError, match=r"rank 1 of tp=2\): reconstruct"):
        diff_snapshots(golden, shard)
