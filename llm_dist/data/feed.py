"""Feeding prepared windows to Ray Train workers: a streamed split, minus already-consumed ids."""

from collections.abc import Iterable, Iterator

import numpy as np


def split_dataset(prepared: str, split: str, exclude_ids: Iterable[int] = (), seed: int = 0):
    """The split's windows (`id`, `tokens` of seq_len + 1) as a Ray Dataset for `datasets=`.

    Files and blocks come in a seeded random order; `exclude_ids` (sequences a checkpoint
    recorded as consumed) are left out, which is how a resumed run skips nothing and repeats
    nothing within an epoch.
    """
    import ray
    from ray.data import FileShuffleConfig

    ds = ray.data.read_parquet(f"{prepared}/{split}", shuffle=FileShuffleConfig(seed=seed))
    ids = np.fromiter(exclude_ids, np.int64)
    if len(ids):
        bitmap = np.zeros(int(ids.max()) + 1, bool)
        bitmap[ids] = True
        packed = np.packbits(bitmap)  # 1 bit per sequence: a million ids ship as 125 KB

        def drop_consumed(batch):
            seen = np.unpackbits(packed, count=len(bitmap)).astype(bool)
            inside = batch["id"] < len(seen)
            keep = ~(inside & seen[np.minimum(batch["id"], len(seen) - 1)])
            return {k: v[keep] for k, v in batch.items()}

        ds = ds.map_batches(drop_consumed, batch_format="numpy")
    return ds.randomize_block_order(seed=seed)


def epoch_batches(
    shard, batch_size: int, seed: int, epoch: int, buffer: int = 4096
) -> Iterator[dict]:
    """A worker's batches for one epoch, shuffled from (seed, epoch): `id` (B,), `tokens` (B, T+1)."""
    return shard.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=seed * 100_003 + epoch,
        drop_last=True,  # every rank takes the same number of steps
    )
