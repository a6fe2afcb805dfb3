"""Host and disk row stores, and the mover that lands rows on the device."""

from __future__ import annotations

import os

import pytest
import torch

from kvlab.caches.staging import Mover
from kvlab.caches.tiers import DiskStore, HostStore, make_store
from kvlab.errors import KvlabError


def _stores(tmp_path, dtype, capacity=0):
    return [HostStore((2, 3), dtype, capacity=capacity), DiskStore((2, 3), dtype, directory=tmp_path, capacity=capacity)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_round_trip_through_growth_and_truncation(tmp_path, dtype):
    chunks = [torch.randn(n, 2, 3).to(dtype) for n in (5, 70, 1, 200)]
    for store in _stores(tmp_path, dtype, capacity=4):
        for chunk in chunks:
            store.append(chunk)
        assert len(store) == 276 and store.capacity >= 276
        assert torch.equal(store.rows(), torch.cat(chunks))
        assert torch.equal(store.rows(5, 75), chunks[1])
        assert store.bytes_in == 276 * 6 * chunks[0].element_size() == store.nbytes
        store.truncate(10)
        store.append(torch.ones(3, 2, 3, dtype=dtype))
        assert torch.equal(store.rows(0, 10), torch.cat(chunks)[:10])
        assert torch.equal(store.rows(10, 13), torch.ones(3, 2, 3, dtype=dtype))
        with pytest.raises(IndexError):
            store.rows(0, 14)
        with pytest.raises(ValueError):
            store.append(torch.zeros(1, 3, 2, dtype=dtype))


def test_disk_store_leaves_no_file_and_writes_through_to_its_file(tmp_path):
    store = DiskStore((4,), torch.float32, directory=tmp_path)
    assert os.listdir(tmp_path) == []  # unlinked as soon as opened
    store.append(torch.arange(8.0).view(2, 4))
    view = store.rows(0, 2)
    store.append(torch.zeros(300, 4))  # grows: a new mapping of the same file
    assert torch.equal(store.rows(0, 2), torch.arange(8.0).view(2, 4))
    view.mul_(2)  # the old mapping and the new one are the same bytes
    assert float(store.rows(1, 2)[0, 3]) == 14.0
    store.close()


def test_unknown_tier_and_missing_folder_are_errors(tmp_path):
    with pytest.raises(KvlabError, match="unknown tier"):
        make_store("nvme", (1,), torch.float32, device=torch.device("cpu"))
    with pytest.raises(KvlabError, match="does not exist"):
        make_store("disk", (1,), torch.float32, device=torch.device("cpu"), directory=tmp_path / "missing")


def test_mover_lands_copies_in_alternating_buffers():
    mover = Mover("cpu", lanes=("act", "kv"))
    assert [mover.next_slot() for _ in range(3)] == [0, 1, 0]
    source = torch.randn(6, 2, 3)
    landing = mover.fetch("kv", 1, source)
    rows = mover.ready(landing)
    assert torch.equal(rows, source) and rows.data_ptr() != source.data_ptr()
    source.zero_()
    assert not torch.equal(rows, source)  # a copy, not a view of the store
    again = mover.ready(mover.fetch("kv", 1, torch.ones(4, 2, 3)))
    assert again.data_ptr() == rows.data_ptr()  # the slot's buffer is reused
    other = mover.ready(mover.fetch("kv", 0, torch.ones(4, 2, 3)))
    assert other.data_ptr() != rows.data_ptr()
    assert mover.bytes_in == (36 + 24 + 24) * 4
    with pytest.raises(ValueError):
        mover.fetch("weights", 0, source)
