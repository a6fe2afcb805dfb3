"""`kvlab fuse store stats|ls|verify|gc` and precompute's input errors, through the CLI."""

from __future__ import annotations

import json

import pytest

from kvlab.fusion.store import open_store
from tests.fusion.store.synthetic import make_chunk, make_key, write_tasks


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_store_commands_report_what_the_store_holds(backend, tmp_path, cli, request):
    store_url = str(tmp_path / "store") if backend == "local" else request.getfixturevalue("fresh_redis")
    keys = [make_key(n) for n in range(3)]
    store = open_store(store_url)
    for key in keys:
        store.put(key, make_chunk(key))
    code, out, _ = cli("fuse", "store", "stats", store_url, "--json", "-")
    stats = json.loads(out)
    assert code == 0 and stats["entries"] == 3 and stats["models"][0]["model"] == "synthetic"
    code, out, _ = cli("fuse", "store", "ls", store_url, "--json", "-")
    listed = json.loads(out)["entries"]
    assert code == 0 and sorted(e["digest"] for e in listed) == sorted(k.digest() for k in keys)
    assert {e["n_tokens"] for e in listed} == {len(k.token_ids) for k in keys}
    code, out, _ = cli("fuse", "store", "ls", store_url, "--limit", "1")
    assert code == 0 and "2 more" in out
    code, out, _ = cli("fuse", "store", "verify", store_url, "--json", "-")
    assert code == 0 and json.loads(out)["ok"] and json.loads(out)["checked"] == 3
    code, out, _ = cli("fuse", "store", "gc", store_url, "--capacity", "0", "--json", "-")
    assert code == 0 and json.loads(out)["evicted"] == 3 and store.stats()["entries"] == 0


def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, cli):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    tasks = write_tasks(tmp_path / "tasks.jsonl", [1])
    cases = [
        (("fuse", "store", "stats", "s3://bucket"), "unknown store URL"),
        (("fuse", "store", "gc", str(tmp_path / "s"), "--capacity", "much"), "bad size 'much'"),
        (("fuse", "precompute", "--model", "tiny-llama", "--tasks", tmp_path / "none.jsonl", "--store",
          tmp_path / "s2"), "does not exist"),
        (("fuse", "precompute", "--model", "tiny-llama", "--tasks", tasks, "--store", tmp_path / "mine"),
         "not a kvlab chunk store"),
        (("fuse", "precompute", "--model", "nope", "--tasks", tasks, "--store", tmp_path / "s3"), "unknown model"),
    ]
    for args, message in cases:
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args, err)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s3").exists()
