"""Tokenize and pack in Ray Data tasks; number, write and count on the driver, in one pass.

`pack_batch` runs fused with the read: it tokenizes a batch's good documents (EOS after each),
cuts each split's tokens into windows of seq_len + 1, and passes every other record through
(bad ones with their first bytes, for the quarantine). `write` consumes that stream: it gives
windows dense global ids, writes them as Parquet shards per split, joins the batches'
leftover tokens into further windows, and writes the quarantine.
"""

import json

import numpy as np

from llm_dist.data import corpus

SPLITS = ("train", "val", "test")
WINDOW, LEFTOVER, RECORD = 0, 1, 2  # the kinds of rows pack_batch emits
SHARD_BYTES = 64 << 20
_TOKENIZERS: dict[str, object] = {}  # per worker process: parse a tokenizer once, not per batch


def pack_batch(batch, tokenizer_json: str, eos_id: int, cfg, drop: frozenset = frozenset()):
    """A pyarrow Table of records -> rows of kind WINDOW, LEFTOVER (per split) or RECORD."""
    import pyarrow as pa
    from tokenizers import Tokenizer

    key = str(hash(tokenizer_json))
    if key not in _TOKENIZERS:
        tok = Tokenizer.from_str(tokenizer_json)
        tok.encode_special_tokens = True  # a quoted <|endoftext|> is text: only we add EOS
        _TOKENIZERS[key] = tok
    tok = _TOKENIZERS[key]
    sources, lines = batch["source"].to_pylist(), batch["line"].to_pylist()
    reasons = batch["reason"].to_pylist()
    if drop:
        reasons = [r or ("duplicate" if (s, n) in drop else None)
                   for r, s, n in zip(reasons, sources, lines, strict=True)]  # fmt: skip
    good = [i for i, r in enumerate(reasons) if r is None]
    texts = batch["text"].take(good).to_pylist()
    splits = corpus.split_of(batch["hash"].take(good).to_numpy(), cfg.seed, cfg.val_fraction,
                             cfg.test_fraction)  # fmt: skip
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    width = cfg.seq_len + 1
    rows: dict[str, list] = {k: [] for k in ("kind", "split", "docs", "n_tokens")}
    values, lengths = [np.zeros(0, np.int32)], []
    for s in range(len(SPLITS)):
        docs = [np.array([*e.ids, eos_id], np.int32)
                for e, x in zip(encoded, splits, strict=True) if x == s]  # fmt: skip
        stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        n = len(stream) // width
        values.append(stream)  # its windows, then its leftover, back to back
        lengths += [width] * n + [len(stream) - n * width]
        rows["kind"] += [WINDOW] * n + [LEFTOVER]
        rows["split"] += [s] * (n + 1)
        rows["docs"] += [0] * n + [len(docs)]
        rows["n_tokens"] += [0] * n + [len(stream)]
    n_rows = len(rows["kind"])
    others = [i for i, r in enumerate(reasons) if r is not None]
    heads = batch["head"].to_pylist()
    rows["kind"] += [RECORD] * len(others)
    rows["split"] += [-1] * len(others)
    rows["docs"] += [0] * len(others)
    rows["n_tokens"] += [0] * len(others)
    lengths += [0] * len(others)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table({
        **rows,
        "tokens": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(values))),
        "source": [None] * n_rows + [sources[i] for i in others],
        "line": [None] * n_rows + [lines[i] for i in others],
        "reason": [None] * n_rows + [reasons[i] for i in others],
        "head": [None] * n_rows + [heads[i] for i in others],
    })  # fmt: skip


def write(packed, cfg, root: str) -> dict:
    """Consume pack_batch's rows: Parquet shards per split, the quarantine, and the counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from llm_dist.run_folder import PreparedFolder
    from llm_dist.storage import filesystem

    width = cfg.seq_len + 1
    filesys, path = filesystem(root)
    folder = PreparedFolder(path)
    filesys.create_dir(path, recursive=True)
    schema = pa.schema([("id", pa.int64()), ("tokens", pa.list_(pa.int32(), width))])
    rows_per_shard = max(1, SHARD_BYTES // (4 * width))
    writers: dict[int, pq.ParquetWriter] = {}
    carry = [np.zeros(0, np.int32) for _ in SPLITS]
    stats = {k: dict.fromkeys(SPLITS, 0) for k in ("docs", "tokens", "sequences", "shards")}
    reasons: dict[str, int] = {}
    next_id = 0

    def emit(s: int, windows: np.ndarray) -> None:
        nonlocal next_id
        name = SPLITS[s]
        while len(windows):
            if stats["sequences"][name] % rows_per_shard == 0:  # this shard is full: next one
                if s in writers:
                    writers[s].close()
                filesys.create_dir(folder.split(name), recursive=True)
                shard = f"{folder.split(name)}/part-{stats['shards'][name]:05d}.parquet"
                writers[s] = pq.ParquetWriter(shard, schema, filesystem=filesys)
                stats["shards"][name] += 1
            head = windows[: rows_per_shard - stats["sequences"][name] % rows_per_shard]
            ids = pa.array(np.arange(next_id, next_id + len(head), dtype=np.int64))
            tokens = pa.FixedSizeListArray.from_arrays(pa.array(head.ravel()), width)
            writers[s].write_table(pa.table([ids, tokens], schema=schema))
            next_id += len(head)
            stats["sequences"][name] += len(head)
            windows = windows[len(head) :]

    with filesys.open_output_stream(folder.quarantine) as quarantine:
        for table in packed.iter_batches(batch_format="pyarrow", batch_size=None):
            kind, split = table["kind"].to_numpy(), table["split"].to_numpy()
            for s, name in enumerate(SPLITS):
                full = pc.list_flatten(table.filter((kind == WINDOW) & (split == s))["tokens"])
                emit(s, full.to_numpy().reshape(-1, width))
                leftover = table.filter((kind == LEFTOVER) & (split == s))
                stats["docs"][name] += pc.sum(leftover["docs"]).as_py() or 0
                stats["tokens"][name] += pc.sum(leftover["n_tokens"]).as_py() or 0
                carry[s] = np.concatenate(
                    [carry[s], pc.list_flatten(leftover["tokens"]).to_numpy()]
                )
                n = len(carry[s]) // width
                emit(s, carry[s][: n * width].reshape(n, width))
                carry[s] = carry[s][n * width :]
            for record in (
                table.filter(kind == RECORD)
                .select(["source", "line", "reason", "head"])
                .to_pylist()
            ):
                reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
                if record["reason"] in corpus.BAD:
                    quarantine.write((json.dumps(record) + "\n").encode())
    for w in writers.values():
        w.close()
    return {**stats, "remainder": {name: len(carry[s]) for s, name in enumerate(SPLITS)},
            "reasons": reasons}  # fmt: skip
