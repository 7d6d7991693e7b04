"""The data stage: corpus -> cleaned documents -> tokenizer -> packed windows in Parquet shards.

Ray Data reads, parses, cleans, tokenizes and packs in parallel, in one pass (plus a first
look at every document when a tokenizer is trained or duplicates are dropped); the driver
numbers the windows and writes them (see `pack`). The result lives in
`<storage_path>/prepared/<fingerprint>/` and is committed by writing `prepared.json` last, so a
later run with the same fingerprint reuses it and a crashed one is simply redone. It is
written in a folder of its own beside that place and moved into it whole
(`PreparedFolder.preparing`), so two runs preparing the same data at once do not mix.
"""

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from llm_dist.base import UserError
from llm_dist.console import console, status
from llm_dist.data import corpus
from llm_dist.data.pack import SPLITS
from llm_dist.records import DataResult
from llm_dist.run_folder import RunFolder, prepared_folder
from llm_dist.storage import copy, save_into


def fingerprint(cfg, files: list[tuple[str, int, int]]) -> str:
    """Everything the prepared windows depend on: files (size, mtime), tokenizer, cleaning, splits."""
    tokenizer = cfg.tokenizer.model_dump()
    if cfg.tokenizer.path:  # the folder's content, not just its name
        folder = Path(cfg.tokenizer.path)
        tokenizer["files"] = sorted(
            (p.name, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in folder.glob("*")
            if p.is_file()
        )
    # version 2: quoted special tokens are packed as text; 3: BOM-led lines, damaged files;
    # 4: prepared.json is a typed DataResult
    key = {"files": files, "tokenizer": tokenizer, "version": 4,
           **cfg.model_dump(exclude={"sources", "tokenizer", "max_bad_fraction"})}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def current_fingerprint(spec) -> str | None:
    """The fingerprint the spec's data has now, or None where its sources cannot be listed
    (gone since it was prepared): for checking what was made from it, without preparing."""
    try:
        return fingerprint(spec.data, corpus.expand_sources(spec.data.sources))
    except UserError:
        return None


def prepare(spec) -> DataResult:
    """Prepare (or reuse) the spec's data; returns what `prepared.json` records.

    Raises UserError when more than data.max_bad_fraction of the records are bad: on reuse
    too, since the budget is this spec's, not that of the run that prepared the data.
    """
    cfg = spec.data
    files = corpus.expand_sources(cfg.sources)
    key = fingerprint(cfg, files)
    folder = prepared_folder(spec, key)
    done = folder.read(DataResult)
    if done is not None:
        _check_budget(done, cfg.max_bad_fraction)
        return done.model_copy(update={"reused": True})

    import ray

    from llm_dist.cluster import connect
    from llm_dist.data import pack
    from llm_dist.data.read import read_corpus

    connect(spec)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # deterministic
    with folder.preparing() as work:  # moved into place whole once committed
        start = time.perf_counter()
        records = read_corpus([f[0] for f in files], cfg)
        drop: frozenset = frozenset()
        if cfg.dedup or not cfg.tokenizer.path:  # these need a look at every document first
            records = records.materialize()
            hashes, keys = _index(records)
            drop = _duplicates(hashes, keys) if cfg.dedup else drop
        if cfg.tokenizer.path:
            from llm_dist.data.tokenizer import load

            tokenizer = load(cfg.tokenizer.path)
        else:
            tokenizer = _train_tokenizer(cfg, records, hashes, keys, drop)
        save_into(tokenizer.save_pretrained, work.tokenizer)
        packed = records.map_batches(
            pack.pack_batch,
            fn_kwargs={"tokenizer_json": tokenizer.backend_tokenizer.to_str(),
                       "eos_id": tokenizer.eos_token_id, "cfg": cfg, "drop": drop},
            batch_format="pyarrow", batch_size=1024,
        )  # fmt: skip
        written = pack.write(packed, cfg, work.uri)
        reasons = written.pop("reasons")
        documents = sum(written["docs"].values())
        seconds = time.perf_counter() - start
        result = DataResult(
            prepared=folder.uri, fingerprint=key, files=len(files),
            records=documents + sum(reasons.values()), documents=documents,
            bad={r: reasons[r] for r in corpus.BAD if r in reasons},
            dropped={r: reasons[r] for r in corpus.DROPPED if r in reasons},
            quarantine=folder.quarantine, tokenizer=folder.tokenizer, vocab_size=len(tokenizer),
            seq_len=cfg.seq_len, **written, seconds=round(seconds, 2),
            tokens_per_s=round(sum(written["tokens"].values()) / seconds),
        )  # fmt: skip
        _check_budget(result, cfg.max_bad_fraction)  # refused: the quarantine stays, nothing else
        work.commit(result)  # the commit: only now is it reusable
    return result


def _check_budget(result: DataResult, max_bad_fraction: float) -> None:
    n_bad = sum(result.bad.values())
    if result.records and n_bad / result.records > max_bad_fraction:
        raise UserError(
            f"data: {n_bad} of {result.records} records are bad "
            f"({n_bad / result.records:.2%} > data.max_bad_fraction {max_bad_fraction}): "
            f"{', '.join(f'{k} {v}' for k, v in result.bad.items())}; every one is listed in "
            f"{result.quarantine}. Fix the corpus or raise data.max_bad_fraction"
        )


def _index(records) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Hash and (source, line) of every good document, in source order."""
    hashes, keys = [], []
    good = records.filter(expr=_col("reason").is_null()).select_columns(["hash", "source", "line"])
    for batch in good.iter_batches(batch_format="pyarrow", batch_size=None):
        hashes.append(batch["hash"].to_numpy())
        keys += zip(batch["source"].to_pylist(), batch["line"].to_pylist(), strict=True)
    return (np.concatenate(hashes) if hashes else np.zeros(0, np.int64)), keys


def _duplicates(hashes: np.ndarray, keys: list[tuple[str, int]]) -> frozenset:
    """(source, line) of every document whose text came earlier: the first one is kept."""
    _, first = np.unique(hashes, return_index=True)
    later = np.ones(len(hashes), bool)
    later[first] = False
    return frozenset(k for k, dup in zip(keys, later, strict=True) if dup)


def _train_tokenizer(cfg, records, hashes, keys, drop):
    """A BPE trained on the `train_sample_docs` training documents with the smallest seeded draw."""
    from llm_dist.data import tokenizer

    keep = np.array([k not in drop for k in keys], bool)
    train = (corpus.split_of(hashes, cfg.seed, cfg.val_fraction, cfg.test_fraction) == 0) & keep
    draws = np.sort(corpus.uniform(hashes[train], cfg.seed + 1))
    if not len(draws):
        raise UserError("data: no training documents left after cleaning; check data.sources, "
                        "data.text_field and data.val_fraction / data.test_fraction")  # fmt: skip
    cutoff = draws[min(cfg.tokenizer.train_sample_docs, len(draws)) - 1]

    def sample(batch):
        h = batch["hash"]
        pick = (corpus.split_of(h, cfg.seed, cfg.val_fraction, cfg.test_fraction) == 0) & (
            corpus.uniform(h, cfg.seed + 1) <= cutoff
        )
        pick &= np.array(
            [(s, int(n)) not in drop for s, n in zip(batch["source"], batch["line"], strict=True)],
            bool,
        )
        return {"text": batch["text"][pick]}

    docs = records.filter(expr=_col("reason").is_null())
    texts = [r["text"] for r in docs.map_batches(sample, batch_format="numpy").iter_rows()]
    return tokenizer.train_bpe(texts, cfg.tokenizer.vocab_size, cfg.seq_len)


def _col(name: str):
    from ray.data.expressions import col

    return col(name)


def run_stage(spec, run: str) -> DataResult:
    """The data stage of a run: prepare or reuse, copy tokenizer and quarantine in, report."""
    with status("data: reading, cleaning, tokenizing and packing the corpus"):
        result = prepare(spec)
    folder, prepared = RunFolder(run), prepared_folder(spec, result.fingerprint)
    copy(prepared.tokenizer, folder.data_tokenizer)
    copy(prepared.quarantine, folder.data_quarantine)
    _report(result)
    return result


def _report(result: DataResult) -> None:
    from rich.table import Table

    table = Table(title="data" + (" (reused)" if result.reused else ""))
    for column in ("", "train", "val", "test"):
        table.add_column(column, justify="right")
    for key in ("docs", "tokens", "sequences", "remainder"):
        table.add_row(key, *(f"{getattr(result, key)[s]:,}" for s in SPLITS))
    console.print(table)
    bad = ", ".join(f"{k} {v:,}" for k, v in result.bad.items()) or "none"
    dropped = ", ".join(f"{k} {v:,}" for k, v in result.dropped.items()) or "none"
    console.print(
        f"records {result.records:,} from {result.files} file(s); documents "
        f"{result.documents:,}; bad records: {bad} (listed in {result.quarantine}); "
        f"dropped: {dropped}; {result.tokens_per_s:,.0f} tokens/s over {result.seconds} s; "
        f"prepared data: {result.prepared}"
        + (" (reused: prepared earlier from the same files and settings)" if result.reused else "")
    )
