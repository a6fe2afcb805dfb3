import pytest
import torch

import kvlab
from kvlab.compare import kl_divergence, logitsdiff
from kvlab.compare.diff import diff_snapshots
from kvlab.snapshot import LOGITS_FILE, Snapshot
from tests.compare.helpers import edited_copy, golden_run
from tests.conftest import tiny


def test_kl_per_step_from_disk_in_chunks_equals_whole_logits(tmp_path, monkeypatch):
    golden = golden_run()
    test = kvlab.capture(tiny("tiny-llama", "dtype=bfloat16"), None, "dtype=bfloat16", force=golden)
    golden.save(tmp_path / "g")
    test.save(tmp_path / "t")
    monkeypatch.setattr(logitsdiff, "LOGITS_CHUNK_ELEMENTS", 300)  # one row (vocab 261) per read
    result = diff_snapshots(Snapshot.load(tmp_path / "g"), Snapshot.load(tmp_path / "t"))
    want = kl_divergence(golden.logits(), test.logits())
    assert result.logits.kl == pytest.approx(want.tolist(), rel=1e-12)
    assert 0 < result.logits.kl_mean == pytest.approx(float(want.mean()))
    assert result.logits.top1 == [a == b for a, b in zip(golden.greedy_ids, test.greedy_ids)]


def test_first_step_where_the_tests_own_token_differs():
    golden = golden_run()
    logits = golden.logits().clone()
    greedy = golden.greedy_ids
    for step in (3, 6):  # the test would pick another token at steps 3 and 6
        other = (greedy[step] + 1) % logits.shape[1]
        logits[step, other] = logits[step].max() + 1
        greedy[step] = other
    test = edited_copy(golden, meta={"greedy_ids": greedy}, logits=logits)
    result = diff_snapshots(golden, test).logits
    assert result.first_token_mismatch == 3
    assert (result.golden_token, result.test_token) == (golden.token_ids[golden.n_prompt + 3], greedy[3])
    assert result.top1 == [s not in (3, 6) for s in range(8)]
    assert result.top1_agreement == pytest.approx(6 / 8)
    assert result.kl[0] == 0 and result.kl[3] > 0


def test_snapshots_without_logits_still_diff(tmp_path):
    golden = golden_run()
    golden.save(tmp_path / "g")
    (tmp_path / "g" / LOGITS_FILE).unlink()
    result = diff_snapshots(Snapshot.load(tmp_path / "g"), golden)
    assert result.logits.kl is None and result.logits.kl_mean is None
    assert result.logits.first_token_mismatch is None and result.logits.top1_agreement == 1.0
    assert result.to_dict()["logits"]["kl_mean"] is None
