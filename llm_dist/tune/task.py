"""The fine-tuning task's data, tokenized with the base model's tokenizer and split three ways.

format text: the data stage itself (its reading, cleaning and packing) on the task's sources.
Chat formats (messages, sft, alpaca, sharegpt, classify): the data stage's per-record reader keeps only
the fields the format reads, untyped, so one odd record or an unused column that changes type
costs nothing; each record becomes a conversation, rendered by the base model's own chat
template into one window of seq_len + 1 tokens whose `mask` marks the assistant turns, the only
tokens the loss counts (`llm_dist.finetune.formats`); a classify window ends with its label's
answer tokens, the same for every record, which each label is scored by (`prepared.json` holds
the label set and those tokens). A record that cannot (a missing field, a wrong type, a label
not in tune.task.labels, a template that refuses it, too long for data.seq_len, ...) goes to
`quarantine.jsonl` with its file, line and reason, and counts against
`tune.task.max_bad_fraction`, checked before any trial starts (too_long ones are left out and
counted, but not against the budget: they depend on data.seq_len, not on the data's quality).
Records are split by a hash of `group_field` (or of the record), so one document's records
share a split.

Either way the result is a prepared folder the worker loop reads like the pretraining data:
`train/`, `val/`, `test/` Parquet windows (`id`, `tokens`, and for chat `mask`) and
`tokenizer/` (with the template used), committed by `prepared.json` and reused while the
sources, tokenizer and settings are the same.
"""

import hashlib
import json

import numpy as np

from llm_dist.base import UserError
from llm_dist.data import corpus
from llm_dist.data.pack import SPLITS
from llm_dist.finetune.formats import DEFAULT_CHAT_TEMPLATE
from llm_dist.records import TaskData
from llm_dist.run_folder import PreparedFolder, prepared_folder
from llm_dist.storage import filesystem, save_into

_TOKENIZERS: dict[str, object] = {}  # per Ray worker process: load the tokenizer once
_ANSWERS: dict[tuple[str, str], list[int]] = {}  # and encode each label's answer once


def prepare_task(spec, base: str) -> TaskData:
    """Prepare (or reuse) the task data for fine-tuning `base`; returns what `prepared.json`
    records (format text: the data stage's record, in this form).

    Raises UserError when a source cannot be listed, no record is usable, or more than
    `tune.task.max_bad_fraction` of them are unusable for a reason other than too_long (each
    is listed in the quarantine).
    """
    from llm_dist.data.read import read_corpus
    from llm_dist.data.tokenizer import load
    from llm_dist.finetune import packing
    from llm_dist.finetune.formats import Unusable, encode, fields
    from llm_dist.storage import local_folder

    t, base = spec.tune.task, local_folder(base)
    if t.format == "text":
        from llm_dist.data.prepare import prepare

        data = spec.data.model_copy(update={
            "sources": t.sources, "text_field": t.text_field, "val_fraction": t.val_fraction,
            "test_fraction": t.test_fraction,
            "tokenizer": spec.data.tokenizer.model_copy(update={"path": base}),
        })  # fmt: skip
        done = prepare(spec.model_copy(update={"data": data}))
        return TaskData(prepared=done.prepared, format="text", tokenizer=done.tokenizer,
                        seq_len=done.seq_len, quarantine=done.quarantine, records=done.records,
                        sequences=done.sequences, unusable=done.bad | done.dropped,
                        reused=done.reused)  # fmt: skip

    files = corpus.expand_sources(t.sources, "tune.task.sources")
    for path, _, _ in files:
        if corpus.format_of(path) not in ("jsonl", "parquet"):
            raise UserError(f"tune.task.sources: {path} is not .jsonl, .jsonl.gz or .parquet "
                            f"(format {t.format}; .txt is for format text)")  # fmt: skip
    tokenizer = load(base)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    try:  # a template that cannot render a plain chat would quarantine every record
        encode(
            tokenizer,
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        )
    except Unusable as e:
        raise UserError(f"tune.base_model: its chat template cannot render a user and an "
                        f"assistant turn ({e.reason}: {e}); fix chat_template in "
                        f"{base}/tokenizer_config.json") from None  # fmt: skip
    pack = packing.decide(t, base)
    settings = t.model_dump(exclude={"metrics", "max_new_tokens", "stop"})  # evaluation only
    key = {"files": files, "task": settings, "seq_len": spec.data.seq_len, "packed": pack,
           "seed": spec.data.seed, "tokenizer": tokenizer.backend_tokenizer.to_str(),
           "template": tokenizer.chat_template, "version": 4}  # 4: a typed TaskData  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = prepared_folder(spec, f"task-{digest}")
    done = folder.read(TaskData)
    if done is not None:
        return done.model_copy(update={"reused": True})

    import ray

    from llm_dist.cluster import connect

    connect(spec)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # stable ids
    with folder.preparing() as work:  # moved into place whole once committed
        save_into(tokenizer.save_pretrained, work.tokenizer)  # what the Ray Data tasks load
        records = read_corpus([f[0] for f in files], spec.data, fields(t))
        windows = records.map_batches(
            _encode, batch_format="pyarrow", batch_size=256,
            fn_kwargs={"tokenizer": work.tokenizer, "t": t, "width": spec.data.seq_len + 1,
                       "seed": spec.data.seed},
        )  # fmt: skip
        packer = packing.Packer(spec.data.seq_len + 1, tokenizer.pad_token_id) if pack else None
        stats = _write(windows, spec.data.seq_len + 1, work, packer)
        stats = _checked(stats, t, tokenizer, folder.quarantine)
        result = TaskData(prepared=folder.uri, format=t.format, tokenizer=folder.tokenizer,
                          seq_len=spec.data.seq_len, quarantine=folder.quarantine,
                          **stats)  # fmt: skip
        work.commit(result)
    return result


def _checked(stats: dict, t, tokenizer, quarantine: str) -> dict:
    """`_write`'s counts, checked against tune.task.max_bad_fraction, with a classify task's
    label set and answer tokens; a UserError naming the fix when the records are refused."""
    from llm_dist.finetune.formats import answer_ids

    n, unusable = stats["records"], stats["unusable"]
    # too long is data.seq_len's doing, not the records'
    bad = sum(v for k, v in unusable.items() if k != "too_long")
    counts = ", ".join(f"{k} {v:,}" for k, v in sorted(unusable.items())) or "none"
    if not stats["sequences"]["train"] or bad > t.max_bad_fraction * n:
        raise UserError(
            f"tune.task: {bad:,} of {n:,} records are unusable ({counts}; "
            f"tune.task.max_bad_fraction is {t.max_bad_fraction}, too_long not counted), listed "
            f"with file, line and reason in {quarantine}: fix those records, check "
            f"the tune.task *_field names of format {t.format}, raise data.seq_len if records "
            "are too long, or raise tune.task.max_bad_fraction"
        )
    found = stats.pop("labels")
    if t.format == "classify":  # the label set, and the tokens each label is scored by
        labels = t.labels or sorted(found)
        if len(labels) < 2:
            raise UserError(f"tune.task.{t.label_field}: the records have one label ({labels}); "
                            "a classification task needs two or more")  # fmt: skip
        label_ids = [answer_ids(tokenizer, x) for x in labels]
        for i, ids in enumerate(label_ids):
            if ids in label_ids[:i]:
                raise UserError(f"tune.task.labels: {labels[label_ids.index(ids)]!r} and "
                                f"{labels[i]!r} render as the same answer tokens (the chat "
                                "template trims them?); make them differ")  # fmt: skip
        stats |= {"labels": labels, "label_ids": label_ids}
    return stats


def _encode(batch, tokenizer: str, t, width: int, seed: int):
    """The reader's rows -> one padded window each: `split`, `tokens` and `mask` (width), its
    `length` (tokens before the padding), or a
    `reason` with the record's `source`, `line` and `head` for the quarantine. A classify
    window ends with its label's `answer_ids` and has its `label`."""
    import pyarrow as pa

    from llm_dist.data.tokenizer import load
    from llm_dist.finetune.formats import Unusable, answer_ids, conversation, encode
    from llm_dist.storage import local_folder

    if tokenizer not in _TOKENIZERS:
        _TOKENIZERS[tokenizer] = load(local_folder(tokenizer))
    tok = _TOKENIZERS[tokenizer]
    n, texts, reasons = batch.num_rows, batch["text"].to_pylist(), batch["reason"].to_pylist()
    heads = batch["head"].to_pylist()
    tokens, mask = np.full((n, width), tok.pad_token_id, np.int32), np.zeros((n, width), np.int8)
    splits, labels, lengths = np.zeros(n, np.int8), [None] * n, np.zeros(n, np.int32)
    for row, text in enumerate(texts):
        if reasons[row] is not None:  # the reader's own: invalid_json, invalid_utf8, ...
            continue
        try:
            record = json.loads(text)
            chat = conversation(record, t)
            ids, marks = encode(tok, chat)
            if t.format == "classify":
                labels[row], start = chat[-1]["content"], marks.index(1)
                if (tokenizer, labels[row]) not in _ANSWERS:
                    _ANSWERS[tokenizer, labels[row]] = answer_ids(tok, labels[row])
                answer = _ANSWERS[tokenizer, labels[row]]
                ids, marks = ids[:start] + answer, marks[:start] + [1] * len(answer)
            if len(ids) > width:
                raise Unusable("too_long", f"{len(ids)} tokens > data.seq_len + 1 = {width}")
        except Unusable as e:
            reasons[row], heads[row] = e.reason, f"{e}: {text[:80]}"
            continue
        except Exception as e:  # whatever else one record's data does costs that record only
            reasons[row], heads[row] = "error", f"{type(e).__name__}: {e}: {text[:80]}"
            continue
        tokens[row, : len(ids)], mask[row, : len(ids)], lengths[row] = ids, marks, len(ids)
        group = record.get(t.group_field) if t.group_field else None
        key = text if group is None else str(group)
        splits[row] = corpus.split_of(np.array([corpus.doc_hash(key)]), seed, t.val_fraction,
                                      t.test_fraction)[0]  # fmt: skip
    return pa.table({
        "split": pa.array(splits, pa.int8()),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), width),
        "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.ravel()), width),
        "length": pa.array(lengths, pa.int32()), "reason": pa.array(reasons, pa.string()), "source": batch["source"],
        "line": batch["line"], "head": pa.array(heads, pa.string()),
        "label": pa.array(labels, pa.string()),
    })  # fmt: skip


def _write(windows, width: int, folder: PreparedFolder, packer=None) -> dict:
    """Number the usable windows in order, write one Parquet file per split and the quarantine.
    With a `packer` (`finetune.packing.Packer`), the train split's records are packed into rows
    that also have a `position` column (the records' own positions)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    filesys, path = filesystem(folder.uri)
    local = PreparedFolder(path)
    row = pa.list_(pa.int32(), width)
    schema = pa.schema([("id", pa.int64()), ("tokens", row), ("mask", pa.list_(pa.int8(), width))])
    writers = {}
    for name in SPLITS:
        filesys.create_dir(local.split(name), recursive=True)
        own = schema.append(pa.field("position", row)) if packer and name == "train" else schema
        writers[name] = pq.ParquetWriter(f"{local.split(name)}/part-00000.parquet", own,
                                         filesystem=filesys)  # fmt: skip
    sequences, unusable, records, labels = dict.fromkeys(SPLITS, 0), {}, 0, set()
    counts = {"next_id": 0, "packed": 0}

    def put(name: str, columns: list) -> None:
        n = len(columns[0])
        ids = pa.array(np.arange(counts["next_id"], counts["next_id"] + n, dtype=np.int64))
        writers[name].write_table(pa.table([ids, *columns], schema=writers[name].schema))
        counts["next_id"] += n
        sequences[name] += n

    def put_packed(rows: list[tuple]) -> None:
        if rows:
            put("train", [pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(c)), width)
                          for c in list(zip(*rows, strict=True))[:3]])  # fmt: skip
            counts["packed"] += sum(r[3] for r in rows)

    quarantine = filesys.open_output_stream(local.quarantine)
    for table in windows.iter_batches(batch_format="pyarrow", batch_size=None):
        records += table.num_rows
        bad = table.filter(pc.is_valid(table["reason"])).select(
            ["source", "line", "reason", "head"]
        )
        for record in bad.to_pylist():
            unusable[record["reason"]] = unusable.get(record["reason"], 0) + 1
            quarantine.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        good = table.filter(pc.is_null(table["reason"]))
        labels |= set(good["label"].drop_null().to_pylist())
        for s, name in enumerate(SPLITS):
            part = good.filter(pc.equal(good["split"], s))
            if packer is None or name != "train":
                put(name, [part["tokens"], part["mask"]])
                continue
            tokens, mask = (_rows(part[c], width) for c in ("tokens", "mask"))
            for n, length in enumerate(part["length"].to_numpy()):
                put_packed(packer.add(tokens[n, :length], mask[n, :length]))
    if packer is not None:
        put_packed(packer.flush())
    for w in [*writers.values(), quarantine]:
        w.close()
    return {"records": records, "sequences": sequences, "unusable": unusable, "labels": labels,
            "packed_records": counts["packed"] if packer else None}  # fmt: skip


def _rows(column, width: int) -> np.ndarray:
    """A FixedSizeList column as an (n, width) array."""
    return column.combine_chunks().flatten().to_numpy().reshape(-1, width)
