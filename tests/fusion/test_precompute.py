"""Precompute into a store: values, idempotence, damage, another model, a kill half-way, two at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kvlab.fusion.chunks import chunk_key, compute_chunk_kv
from kvlab.fusion.precompute import plan_chunks
from kvlab.fusion.prompt import prompt_frame
from kvlab.fusion.store import CorruptChunkError, open_store
from kvlab.fusion.store.local import LocalStore
from kvlab.tasks import read_task_file
from tests.conftest import tiny
from tests.fusion.store.synthetic import flip_stored_byte, write_tasks

PREFIX = "System: answer from the documents."


def planned_keys(model: str, tasks, chunk_tokens: int, prefix: str | None = None):
    loaded = tiny(model)
    prefix_ids = list(prompt_frame(loaded, None, prefix).prefix)
    plan = plan_chunks(loaded, read_task_file(tasks), chunk_tokens)
    stored_prefix = [(prefix_ids, chunk_key(loaded, prefix_ids))] if prefix_ids else []  # the prefix, at position 0
    return loaded, prefix_ids, stored_prefix + [(ids, chunk_key(loaded, ids, prefix_ids)) for ids in plan]


def precompute_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvlab", "fuse", "precompute", "--quiet", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_precompute_stores_each_chunk_as_computed_alone_and_skips_it_next_time(tmp_path, cli):
    tasks = write_tasks(tmp_path / "tasks.jsonl", [0, 1, 0])  # task 0's text twice: its chunks count once
    store_dir = str(tmp_path / "store")
    args = ["fuse", "precompute", "--model", "tiny-llama", "--tasks", tasks, "--store", store_dir,
            "--chunk-tokens", "48", "--prefix", PREFIX, "--surprisal", "--quiet", "--json", tmp_path / "r.json"]
    code, out, err = cli(*args)
    assert code == 0, err
    first = json.loads((tmp_path / "r.json").read_text())
    loaded, prefix_ids, planned = planned_keys("tiny-llama", tasks, 48, PREFIX)
    assert first["chunks"] == first["computed"] == len(planned) and first["existing"] == 0
    assert all(len(ids) <= 48 for ids, _ in planned) and first["prefix_tokens"] == len(prefix_ids) > 0
    with open_store(store_dir) as store:
        assert store.stats()["entries"] == len(planned)
        for ids, key in planned[1:4]:
            _, oracle = compute_chunk_kv(loaded, ids, prefix_ids, surprisal=True)
            stored = store.get(key)
            for i in range(oracle.n_layers):
                torch.testing.assert_close(stored.keys[i], oracle.keys[i], rtol=0, atol=1e-6)
                torch.testing.assert_close(stored.values[i], oracle.values[i], rtol=0, atol=1e-6)
            torch.testing.assert_close(stored.surprisal, oracle.surprisal, rtol=0, atol=1e-5)
    code, _, err = cli(*args)
    again = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and again["existing"] == len(planned) and again["computed"] == 0


def test_a_flipped_byte_is_reported_then_recomputed(tmp_path, cli):
    tasks = write_tasks(tmp_path / "tasks.jsonl", [3])
    store_dir = str(tmp_path / "store")
    args = ["fuse", "precompute", "--model", "tiny-llama", "--tasks", tasks, "--store", store_dir,
            "--chunk-tokens", "64", "--quiet", "--json", tmp_path / "r.json"]
    assert cli(*args)[0] == 0
    loaded, prefix_ids, planned = planned_keys("tiny-llama", tasks, 64)
    ids, key = planned[1]
    with open_store(store_dir) as store:
        flip_stored_byte(store, key)
        with pytest.raises(CorruptChunkError, match=f"chunk {key.digest()[:12]} in .* fails its checksum"):
            store.get(key)
    code, out, err = cli("fuse", "store", "verify", store_dir)
    assert code == 2 and err.strip().splitlines() == [
        f"error: 1 damaged chunks in {store_dir}: run `kvlab fuse store verify --repair {store_dir}`, "
        "then precompute again"]
    assert key.digest()[:16] in out and "fails its checksum" in out
    code, _, err = cli(*args)
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["repaired"] == 1 and report["repaired_digests"] == [key.digest()]
    assert report["existing"] == len(planned) - 1
    with open_store(store_dir) as store:
        _, oracle = compute_chunk_kv(loaded, ids, prefix_ids)
        assert torch.equal(store.get(key).values[-1], oracle.values[-1]) and store.verify().ok


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_a_store_written_for_tiny_llama_serves_nothing_to_tiny_qwen2(backend, tmp_path, cli, request):
    store_url = str(tmp_path / "store") if backend == "local" else request.getfixturevalue("fresh_redis")
    tasks = write_tasks(tmp_path / "tasks.jsonl", [5])
    common = ["--tasks", tasks, "--store", store_url, "--chunk-tokens", "64", "--quiet", "--json", tmp_path / "r.json"]
    assert cli("fuse", "precompute", "--model", "tiny-llama", *common)[0] == 0
    _, _, llama = planned_keys("tiny-llama", tasks, 64)
    _, _, qwen = planned_keys("tiny-qwen2", tasks, 64)
    assert [ids for ids, _ in llama] == [ids for ids, _ in qwen]  # same tokens, other model
    with open_store(store_url) as store:
        assert all(store.get(key) is None for _, key in qwen)
    assert cli("fuse", "precompute", "--model", "tiny-qwen2", *common)[0] == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["computed"] == len(qwen) and report["existing"] == 0
    with open_store(store_url) as store:
        models = {m["model"]: m["entries"] for m in store.stats()["models"]}
        assert models == {"tiny-llama": len(llama), "tiny-qwen2": len(qwen)}
        assert all(store.get(key).meta["model"] == "tiny-qwen2" for _, key in qwen)


def wait_for_entries(proc, store_dir: str, n: int, timeout_s: float = 180.0) -> None:
    """Poll the store until it holds `n` entries (or the process ends)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(store_dir, "index.sqlite")):
            with open_store(store_dir) as store:
                if sum(1 for _ in store.entries()) >= n:
                    return
        time.sleep(0.01)


def test_a_precompute_killed_half_way_leaves_a_clean_store_that_resumes(tmp_path, cli):
    tasks = write_tasks(tmp_path / "tasks.jsonl", range(10, 22))
    store_dir = str(tmp_path / "store")
    _, _, planned = planned_keys("tiny-llama", tasks, 32)
    proc = subprocess.Popen(precompute_cli("--model", "tiny-llama", "--tasks", str(tasks), "--store", store_dir,
                                           "--chunk-tokens", "32"), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_entries(proc, store_dir, 5)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    with open_store(store_dir) as store:
        stored = {info.digest for info in store.entries()}
        report = store.verify()
        assert report.ok and report.checked == len(stored) and 5 <= len(stored) < len(planned)
    code, _, err = cli("fuse", "precompute", "--model", "tiny-llama", "--tasks", tasks, "--store", store_dir,
                       "--chunk-tokens", "32", "--quiet", "--json", tmp_path / "r.json")
    assert code == 0, err
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert resumed["existing"] == len(stored) and resumed["computed"] == len(planned) - len(stored)
    with open_store(store_dir) as store:
        assert store.verify().ok and {i.digest for i in store.entries()} == {k.digest() for _, k in planned}
        store.gc(min_age_s=0)
        assert store.verify().stray == 0


def test_concurrent_precomputes_on_overlapping_tasks_compute_each_chunk_once(tmp_path, cli):
    # One run in a separate process, one here with two worker processes, started together; both
    # task files begin with the shared tasks, so both runs reach the shared chunks at once.
    first = write_tasks(tmp_path / "a.jsonl", [*range(30, 36), *range(24, 30)])
    second = write_tasks(tmp_path / "b.jsonl", [*range(30, 36), *range(36, 42)])
    store_dir = str(tmp_path / "store")
    LocalStore(store_dir).close()
    proc = subprocess.Popen(precompute_cli("--model", "tiny-llama", "--tasks", str(second), "--store", store_dir,
                                           "--chunk-tokens", "32", "--json", "-"),
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        code, _, err = cli("fuse", "precompute", "--model", "tiny-llama", "--tasks", first, "--store", store_dir,
                           "--chunk-tokens", "32", "--workers", "2", "--quiet", "--json", tmp_path / "a.json")
        out, child_err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0 and proc.returncode == 0, (err, child_err[-2000:])
    reports = [json.loads((tmp_path / "a.json").read_text()), json.loads(out)]
    _, _, planned_a = planned_keys("tiny-llama", first, 32)
    _, _, planned_b = planned_keys("tiny-llama", second, 32)
    union = {k.digest() for _, k in planned_a} | {k.digest() for _, k in planned_b}
    assert reports[0]["workers"] == 2
    assert [r["chunks"] for r in reports] == [len(planned_a), len(planned_b)]
    assert all(r["existing"] + r["computed"] == r["chunks"] for r in reports)
    assert reports[0]["computed"] + reports[1]["computed"] == len(union)
    with open_store(store_dir) as store:
        assert {i.digest for i in store.entries()} == union
        report = store.verify()
        assert report.ok and report.checked == len(union) and report.stray == 0


def test_precompute_into_an_open_memory_store(tmp_path):
    from kvlab.errors import KvlabError
    from kvlab.fusion.precompute import precompute
    from kvlab.fusion.store import MemoryStore

    tasks = write_tasks(tmp_path / "tasks.jsonl", [7])
    store = MemoryStore()
    report = precompute("tiny-mistral", str(tasks), store, chunk_tokens=64, surprisal=True)
    _, _, planned = planned_keys("tiny-mistral", tasks, 64)
    assert report.computed == len(planned) == store.stats()["entries"]
    assert all(store.get(key).surprisal is not None for _, key in planned)
    with pytest.raises(KvlabError, match="memory:// store lives in one process"):
        precompute("tiny-mistral", str(tasks), store, workers=2)
