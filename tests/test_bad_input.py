"""Every bad input a user can give ends as one `error:` line, exit status 2 and no new files.

Each case is known before the long work (generation, calibration, a golden run): output paths
that cannot be written, devices this torch does not have, another model's golden run, evicting
caches that a diff cannot compare, stores that do not exist or cannot keep their chunks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvlab.snapshot import Snapshot


@pytest.fixture(scope="module")
def goldens(tmp_path_factory):
    """Golden snapshots: tiny-llama, tiny-mha (another model), tiny-llama with a token id past its vocabulary,
    a streaming (evicting) run forced on the tiny-llama one; a task file."""
    from kvlab.capture import capture
    from tests.conftest import tiny

    root = tmp_path_factory.mktemp("goldens")
    for name in ("tiny-llama", "tiny-mha"):
        model = tiny(name)
        capture(model, model.encode("hello there"), max_new_tokens=3).save(root / name)
    golden = Snapshot.load(root / "tiny-llama")
    capture(tiny("tiny-llama"), None, "cache=streaming:sink=1,window=4", force=golden).save(root / "streaming")
    meta = json.loads((root / "tiny-llama" / "meta.json").read_text())
    meta["token_ids"][-1] = 10**6
    far = Snapshot.load(root / "tiny-llama")
    Snapshot.from_layers([far.layer(i) for i in range(far.n_layers)], meta).save(root / "past-vocab")
    tasks = root / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "a", "chunks": ["Some text."], "question": "Q?", "answers": ["x"]}) + "\n")
    return root


CASES = [
    # output paths: a folder that cannot be written, a file name that is a folder, a folder name that is a file
    ("capture --out unwritable", ["capture", "-m", "tiny-llama", "-p", "hi", "--out", "{ro}/snap"], "cannot write --out"),
    ("capture --out file", ["capture", "-m", "tiny-llama", "-p", "hi", "--out", "{file}"], "is a file"),
    ("capture --out foreign folder", ["capture", "-m", "tiny-llama", "-p", "hi", "--out", "{dir}"],
     "not a kvlab snapshot"),
    ("capture --json folder", ["capture", "-m", "tiny-llama", "-p", "hi", "--out", "{work}/s", "--json", "{dir}"],
     "--json"),
    ("capture --shards file", ["capture", "-m", "tiny-llama", "-p", "hi", "--tp", "2", "--shards", "{file}",
                               "--out", "{work}/s"], "is a file"),
    ("diff --report unwritable", ["diff", "-m", "tiny-llama", "-p", "hi", "--test", "dtype=bfloat16",
                                  "--report", "{ro}/r.html"], "cannot write --report"),
    ("diff --report folder", ["diff", "-m", "tiny-llama", "-p", "hi", "--test", "dtype=bfloat16", "--report", "{dir}"],
     "is a folder"),
    ("diff --json unwritable", ["diff", "{goldens}/tiny-llama", "{goldens}/tiny-llama", "--json", "{ro}/d.json"],
     "cannot write --json"),
    ("diff --json folder", ["diff", "{goldens}/tiny-llama", "{goldens}/tiny-llama", "--json", "{dir}"], "is a folder"),
    ("diff --out unwritable", ["diff", "-m", "tiny-llama", "-p", "hi", "--test", "dtype=bfloat16", "--out", "{ro}/o"],
     "cannot write --out"),
    ("diff --out file", ["diff", "-m", "tiny-llama", "-p", "hi", "--test", "dtype=bfloat16", "--out", "{file}"],
     "is a file"),
    ("trace record --out unwritable", ["trace", "record", "-m", "tiny-llama", "--out", "{ro}/t.gguf"],
     "cannot write --out"),
    ("trace record --out folder", ["trace", "record", "-m", "tiny-llama", "--out", "{dir}"], "is a folder"),
    ("trace record engine=vllm", ["trace", "record", "-m", "tiny-llama", "--run", "engine=vllm", "--out", "{dir}/t.gguf"],
     "transformers or llama.cpp"),
    ("trace check --plot folder", ["trace", "check", "{file}", "--plot", "{dir}"], "--plot"),
    ("scales calibrate --out unwritable", ["scales", "calibrate", "-m", "tiny-llama", "--out", "{ro}/s"],
     "cannot write --out"),
    ("scales calibrate --out file", ["scales", "calibrate", "-m", "tiny-llama", "--out", "{file}"], "is a file"),
    ("scales extract --out folder", ["scales", "extract", "{work}", "--out", "{dir}"], "is a folder"),
    ("reconstruct --out file", ["reconstruct", "{work}", "--out", "{file}"], "is a file"),
    ("models --json folder", ["models", "--json", "{dir}"], "is a folder"),
    ("models --json unwritable", ["models", "--json", "{ro}/m.json"], "cannot write --json"),
    ("fuse eval --report folder", ["fuse", "eval", "-m", "tiny-llama", "--report", "{dir}"], "is a folder"),
    ("fuse explain --report folder", ["fuse", "explain", "-m", "tiny-llama", "--task-file", "{goldens}/tasks.jsonl",
                                      "--id", "a", "--report", "{dir}"], "is a folder"),
    ("fuse tasks --out unwritable", ["fuse", "tasks", "-m", "tiny-llama", "--out", "{ro}/t.jsonl"],
     "cannot write --out"),
    ("hw --disk-dir file", ["hw", "--disk-dir", "{file}"], "is a file"),
    # a device this torch cannot use, refused when the run spec is read
    ("capture device=cuda", ["capture", "-m", "tiny-llama", "-p", "hi", "--run", "device=cuda", "--out", "{work}/s"],
     "device=cuda"),
    ("diff --test device=cuda", ["diff", "-m", "tiny-llama", "-p", "hi", "--test", "device=cuda"], "device=cuda"),
    ("bench decode device=cuda", ["bench", "decode", "-m", "tiny-llama", "--run", "device=cuda"], "device=cuda"),
    # teacher forcing from another model's golden run
    ("force another model", ["capture", "-m", "tiny-llama", "--force-tokens", "{goldens}/tiny-mha", "--out",
                             "{work}/s"], "model tiny-llama (fingerprint"),
    ("force tokens past the vocabulary", ["capture", "-m", "tiny-llama", "--force-tokens", "{goldens}/past-vocab",
                                          "--out", "{work}/s"], "outside its vocabulary"),
    # evicting caches cannot be diffed position by position
    ("diff streaming", ["diff", "-m", "tiny-llama", "-p", "hi", "--test", "cache=streaming:window=4"], "evicts tokens"),
    ("diff snapkv", ["diff", "-m", "tiny-llama", "-p", "hi", "--test", "cache=snapkv:capacity=4"], "evicts tokens"),
    ("diff a streaming snapshot", ["diff", "{goldens}/tiny-llama", "{goldens}/streaming"], "evicts tokens"),
    # stores: the commands that look after one never make one; precompute into memory:// would keep nothing
    ("store stats missing", ["fuse", "store", "stats", "{work}/nostore"], "does not exist"),
    ("store ls missing", ["fuse", "store", "ls", "{work}/nostore"], "does not exist"),
    ("store verify missing", ["fuse", "store", "verify", "{work}/nostore"], "does not exist"),
    ("store gc missing", ["fuse", "store", "gc", "{work}/nostore"], "does not exist"),
    ("store stats not a store", ["fuse", "store", "stats", "{dir}"], "not a kvlab chunk store"),
    ("precompute memory://", ["fuse", "precompute", "-m", "tiny-llama", "--tasks", "{goldens}/tasks.jsonl",
                              "--store", "memory://"], "memory://"),
]


def _files(*roots: Path) -> set[tuple[str, int]]:
    return {(str(p), p.stat().st_mode) for root in roots for p in root.rglob("*")}


@pytest.mark.parametrize("name, args, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_no_new_files(cli, tmp_path, read_only_dir, goldens, monkeypatch,
                                                             name, args, fragment):
    work = tmp_path / "work"
    (work / "dir").mkdir(parents=True)
    (work / "dir" / "notes.txt").write_text("someone else's folder\n")
    (work / "file").write_text("a file\n")
    ro = work / "ro"
    ro.mkdir()
    read_only_dir(ro)
    monkeypatch.chdir(work)
    places = {"work": work, "ro": ro, "dir": work / "dir", "file": work / "file", "goldens": goldens}
    before = _files(work, goldens)

    code, out, err = cli(*[a.format(**places) for a in args])

    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert _files(work, goldens) == before
    assert not os.listdir(ro)
