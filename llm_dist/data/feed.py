"""Feeding prepared windows to Ray Train workers: streamed shards minus consumed ids, eval sets, ledgers."""

from collections.abc import Iterable, Iterator

import numpy as np

from llm_dist.run_folder import PreparedFolder, ledger_file


def split_dataset(prepared: str, split: str, exclude_ids: Iterable[int] = (), seed: int = 0):
    """The split's windows (`id`, `tokens` of seq_len + 1) as a Ray Dataset.

    Files and blocks come in a seeded random order; `exclude_ids` (sequences a checkpoint
    recorded as consumed) are left out, which is how a resumed run skips nothing and repeats
    nothing within an epoch.
    """
    import ray
    from ray.data import FileShuffleConfig

    ds = ray.data.read_parquet(
        PreparedFolder(prepared).split(split), shuffle=FileShuffleConfig(seed=seed)
    )
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
    """A worker's batches for one epoch, shuffled from (seed, epoch): `id` (B,), `tokens` (B, T+1).

    The last batch may be short: the epoch's tail is trained on, not dropped.
    """
    return shard.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=seed * 100_003 + epoch,
        drop_last=False,
    )


IN_MEMORY_BYTES = 1 << 30  # a split at most this big as int64 tokens is read whole (see below)


def worker_shard(prepared: str, split: str, rank: int, world: int, seed: int, block_rows: int,
                 exclude_ids=(), in_memory: bool = False):  # fmt: skip
    """This Ray Train worker's part of a split, built inside the workers (all of them call it).

    Built here rather than passed to the trainer because what is left of an epoch is known only
    once the workers have loaded a checkpoint. Streamed by Ray Data: rank 0 makes the split, the
    others receive their iterators from it; unequal shares, so no row is held back to even them
    out; blocks of `block_rows` keep the shares within a few blocks of each other at an epoch's
    end. With `in_memory` (a fine-tuning trial's task data) and a split of at most
    IN_MEMORY_BYTES, each worker reads the split itself (`Windows`): a streaming executor's
    start costs a trial 10-20 s before its first batch, for data that fits in memory.
    """
    import torch.distributed as dist

    if in_memory and _size(prepared, split) <= IN_MEMORY_BYTES:
        return Windows.read(prepared, split, rank, world, seed, exclude_ids)
    shards = [None] * world
    if rank == 0:
        ds = split_dataset(prepared, split, exclude_ids, seed)
        ds = ds.repartition(target_num_rows_per_block=block_rows)
        shards = ds.streaming_split(world, equal=False)
    dist.broadcast_object_list(shards, src=0)
    return shards[rank]


class Windows:
    """A worker's share of a split held in memory: every worker reads the whole split, leaves
    out `exclude_ids`, orders it by one permutation drawn from `seed` (the same on every
    rank) and keeps every `world`-th row from its `rank` on: disjoint shares that cover the
    split, within one row of each other. Iterated like Ray Data's shard (`iter_torch_batches`)."""

    def __init__(self, columns: dict[str, np.ndarray]):
        # id (n,), tokens (n, T+1), and mask and position (n, T+1) when the split has them
        self.columns = columns

    @classmethod
    def read(cls, prepared: str, split: str, rank: int, world: int, seed: int, exclude_ids=()):
        table = _dataset(prepared, split).to_table()
        ids = table["id"].to_numpy()
        keep = ~np.isin(ids, np.fromiter(exclude_ids, np.int64))
        order = np.random.default_rng(seed).permutation(int(keep.sum()))[rank::world]
        width = table.schema.field("tokens").type.list_size
        columns = {"id": ids[keep][order]}
        for name, dtype in (("tokens", np.int64), ("mask", np.int8), ("position", np.int64)):
            if name in table.column_names:
                flat = table[name].combine_chunks().flatten().to_numpy()
                columns[name] = flat.reshape(-1, width)[keep][order].astype(dtype)
        return cls(columns)

    def iter_torch_batches(
        self, batch_size: int, drop_last: bool = False, **shuffle
    ) -> Iterator[dict]:
        """Batches in order, the last one short; `shuffle` (Ray Data's local-shuffle arguments)
        is ignored: the rows are already in a seeded random order."""
        import torch

        n = len(self.columns["id"])
        for i in range(0, n - batch_size + 1 if drop_last else n, batch_size):
            yield {k: torch.from_numpy(v[i : i + batch_size]) for k, v in self.columns.items()}


def _dataset(prepared: str, split: str):
    """The split's Parquet files as one pyarrow dataset (local or on object storage)."""
    import pyarrow.dataset as pds

    from llm_dist.storage import filesystem

    filesys, path = filesystem(PreparedFolder(prepared).split(split))
    return pds.dataset(path, filesystem=filesys, format="parquet")


def _size(prepared: str, split: str) -> int:
    """The split's tokens as int64, in bytes, from the Parquet metadata alone."""
    ds = _dataset(prepared, split)
    return ds.count_rows() * ds.schema.field("tokens").type.list_size * 8


def head_batches(prepared: str, split: str, rows: int, batch_size: int, rank: int, world: int):
    """The same first `rows` windows of a split on every run, this rank's share in batches.

    Every rank gets as many rows as the others (a fixed evaluation set, read without Ray Data).
    A split with a target `mask` (fine-tuning tasks) keeps it beside the tokens.
    """
    import torch

    table = _dataset(prepared, split).head(rows)
    keep = len(table) // world * world
    ids = table["id"].to_numpy()[:keep][rank::world]
    width = table.schema.field("tokens").type.list_size
    columns = {"tokens": np.int64, "mask": np.int8, "position": np.int64}
    mine = {
        name: table[name].combine_chunks().flatten().to_numpy()[: keep * width]
        .reshape(keep, width)[rank::world].astype(dtype)
        for name, dtype in columns.items() if name in table.column_names
    }  # fmt: skip
    return [
        {"id": torch.from_numpy(ids[i : i + batch_size].copy()),
         **{name: torch.from_numpy(v[i : i + batch_size]) for name, v in mine.items()}}
        for i in range(0, len(ids), batch_size)
    ]  # fmt: skip


def synced_batches(batches, T: int, device):
    """Batches until every rank is out, each a dict: `tokens` (b, T+1), `mask` and `position`
    (b, T+1; packed rows, `finetune.packing`) or None, `ids` (b,), `targets` (this rank's target tokens), `rows_all` and `targets_all` (across
    ranks), `wait` (seconds spent waiting for data).

    A rank with no batch left gets one weightless row (no ids) so it still joins the step.
    """
    import time

    import torch
    import torch.distributed as dist

    it = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(it, None)
        wait = time.perf_counter() - start
        if batch is None:
            batch = {"tokens": torch.zeros(1, T + 1, dtype=torch.long), "id": []}
        tokens, mask, position = batch["tokens"], batch.get("mask"), batch.get("position")
        ids = np.asarray(batch["id"], np.int64)
        targets = len(ids) * T if mask is None else int(mask[:, 1:].sum()) * (len(ids) > 0)
        counts = torch.tensor([len(ids), targets], device=device)
        dist.all_reduce(counts)
        if counts[0].item() == 0:
            return
        yield {"tokens": tokens.to(device, torch.long),
               "mask": None if mask is None else mask.to(device),
               "position": None if position is None else position.to(device, torch.long), "ids": ids,
               "targets": targets, "rows_all": int(counts[0]), "targets_all": int(counts[1]),
               "wait": wait}  # fmt: skip


def write_ledger(rows: np.ndarray, folder: str, epoch: int) -> None:
    """Every rank's (step, id) rows of an epoch, gathered into the ledger `folder` by rank 0.

    The record of which optimizer step trained on which sequence: each id appears once per
    epoch, across restarts too.
    """
    import io

    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.gather_object(rows, everyone if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() == 0:
        from llm_dist.storage import write_bytes

        buffer = io.BytesIO()
        np.save(buffer, np.concatenate(everyone).reshape(-1, 2))
        write_bytes(ledger_file(folder, epoch), buffer.getvalue())
