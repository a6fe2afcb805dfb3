"""Shard directories written by other tools: naming, rank discovery, shape checks, the CLI."""

import json

import pytest
import torch
from safetensors.torch import save_file

import kvlab
from kvlab.layouts import make_layout, shard
from kvlab.layouts.files import NamePattern, ShardDir, ShardFileError, rank_of, reconstruct_dir
from kvlab.snapshot import Snapshot
from tests.conftest import tiny

N_LAYERS = 3


def full_cache(kv=3, seq=6, dim=4, batch=1):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, kv, seq, dim, generator=gen), torch.randn(batch, kv, seq, dim, generator=gen))
            for _ in range(N_LAYERS)]


def write_nxdi(folder, per_rank, name="rank{r}.safetensors", transpose_keys=False):
    """NxDI's naming: kv_mgr.past_key_values.{2*layer} holds K, {2*layer+1} holds V."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank, layers in enumerate(per_rank):
        tensors = {}
        for i, (k, v) in enumerate(layers):
            tensors[f"kv_mgr.past_key_values.{2 * i}"] = (k.transpose(2, 3) if transpose_keys else k).contiguous()
            tensors[f"kv_mgr.past_key_values.{2 * i + 1}"] = v.contiguous()
        path = folder / name.format(r=rank)
        if path.suffix == ".safetensors":
            save_file(tensors, str(path))
        else:
            torch.save(tensors, path)
    return folder


def same(layers, full):
    return all(torch.equal(a, b) for a, b in zip(sum(layers, ()), sum(full, ())))


def test_pattern_placeholders_and_presets():
    nxdi = NamePattern.parse("nxdi")
    assert nxdi.name(0, 3) == "kv_mgr.past_key_values.6" and nxdi.name(1, 3) == "kv_mgr.past_key_values.7"
    names = [f"kv_mgr.past_key_values.{i}" for i in range(8)]
    assert nxdi.layers(names, 0) == {0, 1, 2, 3} and nxdi.layers(names, 1) == {0, 1, 2, 3}
    custom = NamePattern.parse("cache.{layer}.k, cache.{layer}.v")
    assert custom.name(1, 2) == "cache.2.v" and custom.layers(["cache.0.k", "cache.10.k", "other"], 0) == {0, 10}
    with pytest.raises(ShardFileError, match="exactly one layer placeholder"):
        NamePattern.parse("k.{layer}.{layer},v.{layer}")
    with pytest.raises(ShardFileError, match="give a preset"):
        NamePattern.parse("layers.{layer}.keys")


@pytest.mark.parametrize("name, rank", [("rank3.safetensors", 3), ("tp_rank-12.pt", 12), ("shard_5.bin", 5),
                                        ("llama_tp8_rank2.pt", 2), ("RANK_0", 0)])
def test_rank_from_file_name(name, rank):
    assert rank_of(name) == rank


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_nxdi_shards_of_a_layout_kv_exceeds_tp_rebuild_exactly(tmp_path, suffix):
    layout = make_layout("auto", 4, 12, 6)  # kv > tp, kv % tp != 0: NxDI converts to MHA
    assert layout.name == "mha"
    full = full_cache(kv=6)
    folder = write_nxdi(tmp_path / "nx", shard(full, layout), name="tp_rank_{r}." + suffix)
    result, shards = reconstruct_dir(folder, layout)
    assert str(shards.pattern) == "kv_mgr.past_key_values.{2*layer},kv_mgr.past_key_values.{2*layer+1}"
    assert shards.n_layers == N_LAYERS and same(result.layers, full) and result.ok


def test_transposed_keys_and_cropping_a_preallocated_cache(tmp_path):
    layout = make_layout("replicate", 2, 2, 1)
    full = full_cache(kv=1, seq=8)
    folder = write_nxdi(tmp_path / "nx", shard(full, layout), transpose_keys=True)
    result, _ = reconstruct_dir(folder, layout, transpose_keys=True, seq_len=5)
    assert same(result.layers, [(k[:, :, :5], v[:, :, :5]) for k, v in full])


def test_a_custom_pattern_and_a_corrupted_rank_file(tmp_path):
    layout = make_layout("replicate", 4, 4, 2)
    per_rank = shard(full_cache(kv=2), layout)
    folder = tmp_path / "custom"
    folder.mkdir()
    for rank, layers in enumerate(per_rank):
        tensors = {f"cache.{i}.{kind}": t.contiguous() for i, kv in enumerate(layers) for kind, t in zip("kv", kv)}
        if rank == 3:
            tensors["cache.2.k"][0, 0, 4, 1] = 9.0
        save_file(tensors, str(folder / f"r{rank}.safetensors"))
    with pytest.raises(ShardFileError, match="no tensor follows a known naming .*cache.0.k.*give --pattern"):
        reconstruct_dir(folder, layout)
    result, _ = reconstruct_dir(folder, layout, pattern="cache.{layer}.k,cache.{layer}.v")
    (problem,) = result.problems
    assert (problem.layer, problem.tensor, problem.head, problem.position) == (2, "keys", 1, 4)
    assert {problem.rank, problem.reference[0]} == {2, 3}


def test_kvlab_shard_snapshots_carry_their_layout(tmp_path):
    loaded = tiny("tiny-mha")
    snap = kvlab.capture(loaded, loaded.encode("four heads"), max_new_tokens=3)
    layout = make_layout("padded-mha", 3, 4, 4, seq_split=True)  # r0 [0,1] r1 [2,3] r2 [-,-]
    for rank, part in enumerate(shard(snap, layout)):
        part.save(tmp_path / "shards" / f"rank{rank}")
    (tmp_path / "shards" / "launch.log").write_text("logs and other files are ignored\n")
    result, shards = reconstruct_dir(tmp_path / "shards")
    assert result.layout == layout and result.ok and shards.meta["token_ids"] == snap.token_ids
    assert same(result.layers, [snap.layer(i) for i in range(snap.n_layers)])


# ---- errors ------------------------------------------------------------------------------
@pytest.fixture
def nxdi_dir(tmp_path):
    layout = make_layout("mha", 2, 6, 3)  # r0 [0,0,1] r1 [1,2,2]
    return write_nxdi(tmp_path / "nx", shard(full_cache(kv=3), layout)), layout


def test_missing_duplicate_and_extra_ranks(nxdi_dir):
    folder, layout = nxdi_dir
    with pytest.raises(ShardFileError, match=r"missing rank 2, 3 for tp=4 \(found ranks 0, 1\)"):
        ShardDir(folder, tp=4)
    (folder / "rank1.pt").write_bytes(b"")
    with pytest.raises(ShardFileError, match=r"rank 1 appears twice \(rank1.pt and rank1.safetensors\)"):
        ShardDir(folder, tp=2)
    (folder / "rank1.pt").unlink()
    with pytest.raises(ShardFileError, match="rank 1 is beyond tp=1"):
        ShardDir(folder, tp=1)


def test_wrong_head_count_for_the_layout(nxdi_dir):
    folder, _ = nxdi_dir
    with pytest.raises(kvlab.KvlabError, match="rank 0 holds 3 KV heads but layout contiguous .* puts 1 there"):
        reconstruct_dir(folder, make_layout("contiguous", 2, 6, 2))


def test_mismatched_seq_lengths_and_missing_layers(tmp_path):
    layout = make_layout("contiguous", 2, 4, 2)
    per_rank = shard(full_cache(kv=2), layout)
    per_rank[1][1] = (per_rank[1][1][0][:, :, :5], per_rank[1][1][1][:, :, :5])
    folder = write_nxdi(tmp_path / "a", per_rank)
    with pytest.raises(kvlab.KvlabError, match="layer 1 keys: mismatched seq lengths: rank 0 holds 6 positions, rank 1 5"):
        reconstruct_dir(folder, layout)
    per_rank = shard(full_cache(kv=2), layout)
    per_rank[0] = per_rank[0][:2]
    folder = write_nxdi(tmp_path / "b", per_rank)
    with pytest.raises(ShardFileError, match=r"ranks hold different numbers of layers \(rank 0: 2, rank 1: 3\)"):
        reconstruct_dir(folder, layout)
    save_file({"kv_mgr.past_key_values.0": torch.zeros(1, 1, 2, 2), "kv_mgr.past_key_values.2": torch.zeros(1, 1, 2, 2),
               "kv_mgr.past_key_values.3": torch.zeros(1, 1, 2, 2)}, str(tmp_path / "b" / "rank0.safetensors"))
    with pytest.raises(ShardFileError, match=r"has no tensor kv_mgr.past_key_values.1 \(layer 0 values\)"):
        reconstruct_dir(tmp_path / "b", layout)


def test_unreadable_and_empty_inputs(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "rank0.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ShardFileError, match="rank0.safetensors is not a readable safetensors file"):
        ShardDir(tmp_path / "bad", tp=1)
    (tmp_path / "bad" / "rank0.safetensors").unlink()
    torch.save([1, 2, 3], tmp_path / "bad" / "rank0.pt")
    with pytest.raises(ShardFileError, match="holds no tensors"):
        ShardDir(tmp_path / "bad", tp=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardFileError, match="holds no shard"):
        ShardDir(tmp_path / "empty")
    with pytest.raises(ShardFileError, match="is not a directory"):
        ShardDir(tmp_path / "nowhere")


# ---- the command -------------------------------------------------------------------------
def test_cli_rebuilds_checks_and_writes_json(cli, tmp_path, nxdi_dir):
    folder, layout = nxdi_dir
    code, out, err = cli("reconstruct", folder, "--layout", "auto", "--heads", 6, "--kv-heads", 3, "--tp", 2,
                         "--out", tmp_path / "full", "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    assert "layout mha" in out and "shards are consistent" in out and "rank0.safetensors" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["layout"], data["tp"], data["replica_max_diff"], data["padding_max_abs"], data["problems"]) == (
        "mha", 2, 0.0, 0.0, [])
    rebuilt = Snapshot.load(tmp_path / "full")
    assert same([rebuilt.layer(i) for i in range(rebuilt.n_layers)], full_cache(kv=3))
    assert rebuilt.meta["imported_from"]["files"] == {"0": "rank0.safetensors", "1": "rank1.safetensors"}


def test_cli_exit_1_and_located_problem_when_a_replica_disagrees(cli, tmp_path):
    layout = make_layout("replicate", 3, 3, 1)
    per_rank = shard(full_cache(kv=1), layout)
    per_rank[1][2][1][0, 0, 3, 0] += 1.0
    folder = write_nxdi(tmp_path / "nx", per_rank)
    code, out, _ = cli("reconstruct", folder, "--layout", "replicate", "--heads", 3, "--kv-heads", 1, "--tp", 3,
                       "--json", tmp_path / "r.json", "-q")
    assert code == 1
    assert "FAIL" in out and "layer 2 values head 0: rank 1 slot 0 differs by 1 (batch 0, position 3)" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["replica_max_diff"] == 1.0 and data["problems"][0]["rank"] == 1


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--layout", "mha", "--heads", "6"], "--layout mha needs --kv-heads, --tp"),
        (["--layout", "contiguous", "--heads", "6", "--kv-heads", "3", "--tp", "2"], "layout contiguous does not apply"),
        (["--layout", "mha", "--heads", "6", "--kv-heads", "3", "--tp", "3"], "missing rank 2 for tp=3"),
        ([], "the shards record no layout"),
        (["--pattern", "x"], "give a preset"),
        (["--layout", "mha", "--heads", "6", "--kv-heads", "3", "--tp", "2", "--rank-order", "a,b"], "--rank-order"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(cli, tmp_path, nxdi_dir, args, fragment):
    folder, _ = nxdi_dir
    code, out, err = cli("reconstruct", folder, *args, "--out", tmp_path / "o", "-q")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "o").exists()
