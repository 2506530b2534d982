"""Contiguous, near-equal shards of a sequence: the proposal stage's shards of images, the CAM stage's shards of
parts (:func:`pipeline.cam_store.shard_parts`) and a distributed rank's piece of a batch all use this split."""
from __future__ import annotations


def shard_bounds(n_items: int, shard: int, n_shards: int) -> tuple[int, int]:
    """``[start, stop)`` of shard ``shard`` of ``n_shards`` contiguous, near-equal shards of ``n_items``."""
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"shard index {shard} is not in [0, {n_shards})")
    base, extra = divmod(n_items, n_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)
