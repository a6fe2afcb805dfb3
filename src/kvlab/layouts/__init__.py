"""Tensor-parallel KV layouts as data, and sharding / checked reconstruction of caches by them.

    layout = make_layout("mha", tp=8, n_heads=24, n_kv_heads=6)   # or "auto": what NxDI picks
    shards = shard(snapshot, layout)                                # one shard Snapshot per rank
    result = reconstruct(shards)                                    # layout read from the shards
    result.replica_max_diff, result.padding_max_abs, result.problems
"""

from kvlab.layouts.layout import Layout, LayoutError
from kvlab.layouts.reconstruct import (
    Problem,
    Reconstruction,
    TensorCheck,
    layout_of,
    merge_tensor,
    reconstruct,
    shard,
    shard_tensor,
)
from kvlab.layouts.strategies import (
    NotApplicable,
    applicable,
    auto_choice,
    make_layout,
    strategy,
    strategy_names,
)

__all__ = [
    "Layout",
    "LayoutError",
    "NotApplicable",
    "Problem",
    "Reconstruction",
    "TensorCheck",
    "applicable",
    "auto_choice",
    "layout_of",
    "make_layout",
    "merge_tensor",
    "reconstruct",
    "shard",
    "shard_tensor",
    "strategy",
    "strategy_names",
]
