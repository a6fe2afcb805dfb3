import json
import os

import pytest
import torch

from kvlab.snapshot import FORMAT, KV_FILE, META_FILE, Snapshot, SnapshotError


def _snapshot(dtype=torch.float32, n_layers=3, seq=7):
    gen = torch.Generator().manual_seed(0)
    layers = [
        (torch.randn(1, 2, seq, 4, generator=gen).to(dtype), torch.randn(1, 2, seq, 4, generator=gen).to(dtype))
        for _ in range(n_layers)
    ]
    meta = {"model": {"spec": "synthetic"}, "run": "dtype=float32", "token_ids": list(range(seq + 1)), "n_prompt": 3}
    logits = torch.randn(5, 11, generator=gen)
    return Snapshot.from_layers(layers, meta, extras={"layers.0.keys.q": torch.arange(6, dtype=torch.uint8)},
                                logits=logits), layers, logits


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_round_trip_keeps_every_bit(tmp_path, dtype):
    snap, layers, logits = _snapshot(dtype)
    snap.save(tmp_path / "snap")
    back = Snapshot.load(tmp_path / "snap")
    assert back.n_layers == 3 and back.token_ids == list(range(8)) and back.n_prompt == 3
    for i, (k, v) in enumerate(layers):
        assert back.keys(i).dtype == dtype
        assert torch.equal(back.keys(i).view(torch.uint8), k.view(torch.uint8))
        assert torch.equal(back.values(i).view(torch.uint8), v.view(torch.uint8))
        assert back.shape(i) == tuple(k.shape)
    assert torch.equal(back.logits(), logits)
    assert torch.equal(back.tensor("layers.0.keys.q"), torch.arange(6, dtype=torch.uint8))
    assert back.meta["format"] == FORMAT


def test_layers_are_read_on_demand(tmp_path):
    snap, _, _ = _snapshot(n_layers=4)
    snap.save(tmp_path / "s")
    back = Snapshot.load(tmp_path / "s")
    read = []
    original = back._reader

    class Spy:
        def __getattr__(self, name):
            return getattr(original, name)

        def get_tensor(self, name):
            read.append(name)
            return original.get_tensor(name)

    back._reader = Spy()
    back.shape(3)
    assert read == []
    back.keys(2)
    assert read == ["layers.2.keys"]


def test_saving_a_loaded_snapshot_copies_it(tmp_path):
    snap, layers, _ = _snapshot()
    snap.save(tmp_path / "a")
    Snapshot.load(tmp_path / "a").save(tmp_path / "b")
    assert torch.equal(Snapshot.load(tmp_path / "b").values(2), layers[2][1])


def test_overwrite_replaces_a_snapshot_but_not_other_folders(tmp_path):
    snap, _, _ = _snapshot()
    snap.save(tmp_path / "s")
    snap.save(tmp_path / "s")  # replacing a snapshot is fine
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(SnapshotError, match="refusing to overwrite"):
        snap.save(other)
    assert (other / "todo.txt").read_text() == "keep me"


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    snap, _, _ = _snapshot()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        snap.save(tmp_path / "s")
    assert os.listdir(tmp_path) == []


def _saved(tmp_path):
    snap, _, _ = _snapshot()
    return snap.save(tmp_path / "s")


def test_truncated_tensor_file_is_one_line_error(tmp_path):
    path = _saved(tmp_path)
    kv = path / KV_FILE
    kv.write_bytes(kv.read_bytes()[:-40])
    with pytest.raises(SnapshotError, match="truncated or corrupt") as info:
        Snapshot.load(path)
    assert "\n" not in str(info.value)


def test_garbage_meta_is_an_error(tmp_path):
    path = _saved(tmp_path)
    (path / META_FILE).write_text('{"format": "kvlab.snap')
    with pytest.raises(SnapshotError, match="truncated or corrupt"):
        Snapshot.load(path)


def test_foreign_meta_is_an_error(tmp_path):
    path = _saved(tmp_path)
    (path / META_FILE).write_text(json.dumps({"format": "something-else/1", "n_layers": 3}))
    with pytest.raises(SnapshotError, match="not a kvlab snapshot"):
        Snapshot.load(path)


def test_a_tensor_file_written_by_another_tool_loads_when_its_tensors_check_out(tmp_path):
    # safetensors' own writer, transformers-style header ("format": "pt"), kvlab's tensor names
    from safetensors.torch import save_file

    path = _saved(tmp_path)
    snap, layers, _ = _snapshot()
    tensors = {f"layers.{i}.{w}": t for i, (k, v) in enumerate(layers) for w, t in (("keys", k), ("values", v))}
    save_file(tensors, str(path / KV_FILE), metadata={"format": "pt"})
    back = Snapshot.load(path)
    assert torch.equal(back.keys(2), layers[2][0]) and torch.equal(back.values(0), layers[0][1])
    save_file(tensors, str(path / KV_FILE))  # no header at all
    assert torch.equal(Snapshot.load(path).keys(1), layers[1][0])


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("layers.1.values"), "no tensor layers.1.values"),
    (lambda t: t.update({"layers.0.keys": torch.zeros(1)}), r"shape \[1\]"),
    (lambda t: t.update({"layers.2.keys": torch.zeros(1, 2, 7, 4, dtype=torch.int32)}), "is I32"),
    (lambda t: t.update({"layers.2.values": torch.zeros(1, 2, 6, 4)}), "one batch, heads, positions"),
    (lambda t: t.update({"layers.1.keys": torch.zeros(1, 2, 7, 4, dtype=torch.float16)}), "F16"),
])
def test_a_foreign_tensor_file_with_wrong_names_shapes_or_dtypes_is_refused(tmp_path, change, message):
    from safetensors.torch import save_file

    path = _saved(tmp_path)
    _, layers, _ = _snapshot()
    tensors = {f"layers.{i}.{w}": t for i, (k, v) in enumerate(layers) for w, t in (("keys", k), ("values", v))}
    change(tensors)
    save_file(tensors, str(path / KV_FILE))
    with pytest.raises(SnapshotError, match=message):
        Snapshot.load(path)


def test_a_foreign_tensor_file_must_match_the_model_in_meta(tmp_path):
    from safetensors.torch import save_file

    path = _saved(tmp_path)
    _, layers, _ = _snapshot()
    meta = json.loads((path / META_FILE).read_text())
    meta["model"]["n_kv_heads"] = 3
    (path / META_FILE).write_text(json.dumps(meta))
    tensors = {f"layers.{i}.{w}": t for i, (k, v) in enumerate(layers) for w, t in (("keys", k), ("values", v))}
    save_file(tensors, str(path / KV_FILE))
    with pytest.raises(SnapshotError, match="n_kv_heads axis"):
        Snapshot.load(path)


def test_future_format_asks_for_an_upgrade(tmp_path):
    path = _saved(tmp_path)
    meta = json.loads((path / META_FILE).read_text())
    meta["format"] = "kvlab.snapshot/2"
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SnapshotError, match="newer kvlab"):
        Snapshot.load(path)


def test_missing_layer_is_an_error(tmp_path):
    path = _saved(tmp_path)
    meta = json.loads((path / META_FILE).read_text())
    meta["n_layers"] = 9
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SnapshotError, match="no tensor layers.3.keys"):
        Snapshot.load(path)


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(SnapshotError, match="no snapshot at"):
        Snapshot.load(tmp_path / "nothing")
    path = _saved(tmp_path)
    with pytest.raises(SnapshotError, match="is a file"):
        Snapshot.load(path / KV_FILE)
    with pytest.raises(SnapshotError, match="no meta.json"):
        Snapshot.load(tmp_path)


def test_layer_out_of_range(tmp_path):
    back = Snapshot.load(_saved(tmp_path))
    with pytest.raises(SnapshotError, match="out of range"):
        back.keys(3)


def test_snapshot_files_follow_the_umask(tmp_path):
    import os
    import stat

    import torch

    from kvlab.snapshot import Snapshot

    snap = Snapshot.from_layers([(torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))],
                                {"token_ids": [1, 2, 3], "n_prompt": 2, "run": "", "model": {}},
                                logits=torch.zeros(1, 5))
    old = os.umask(0o022)
    try:
        snap.save(tmp_path / "s")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "s").iterdir()}
    assert modes == {"kv.safetensors": 0o644, "logits.safetensors": 0o644, "meta.json": 0o644}
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o755
