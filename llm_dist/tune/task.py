"""The fine-tuning task's data, tokenized with the base model's tokenizer and split three ways.

format text: the data stage itself (its reading, cleaning and packing) on the task's sources.
format sft: each prompt/response record becomes one window of seq_len + 1 tokens, the prompt
rendered by the tokenizer's chat template (or `DEFAULT_CHAT_TEMPLATE`), then the response and
EOS, padded; its `mask` marks the response tokens, the only ones the loss counts. Records are
split by a hash of `group_field` (or of the record), so one document's records share a split.

Either way the result is a prepared folder the worker loop reads like the pretraining data:
`train/`, `val/`, `test/` Parquet windows (`id`, `tokens`, and for sft `mask`) and `tokenizer/`,
committed by `prepared.json` and reused while the sources, tokenizer and settings are the same.
"""

import hashlib
import json

import numpy as np

from llm_dist.base import UserError
from llm_dist.data import corpus
from llm_dist.data.pack import SPLITS
from llm_dist.manifest import filesystem, read_json, save_into, storage_uri, write_json

# A user turn is its text and a newline; an assistant turn its text and EOS. Exported with the
# tokenizer, so the served model formats a chat the way it was fine-tuned.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
)
_TOKENIZERS: dict[str, object] = {}  # per Ray worker process: build the tokenizer once


def prepare_task(spec, base: str) -> dict:
    """Prepare (or reuse) the task data for fine-tuning `base`; returns its `prepared.json`."""
    from llm_dist.data.tokenizer import load
    from llm_dist.manifest import local_folder

    t, base = spec.tune.task, local_folder(base)
    if t.format == "text":
        from llm_dist.data.prepare import prepare

        data = spec.data.model_copy(update={
            "sources": t.sources, "text_field": t.text_field, "val_fraction": t.val_fraction,
            "test_fraction": t.test_fraction,
            "tokenizer": spec.data.tokenizer.model_copy(update={"path": base}),
        })  # fmt: skip
        return prepare(spec.model_copy(update={"data": data}))

    files = corpus.expand_sources(t.sources, "tune.task.sources")
    for path, _, _ in files:
        if corpus.format_of(path) not in ("jsonl", "parquet"):
            raise UserError(f"tune.task.sources: {path} is not .jsonl or .parquet (format sft)")
    tokenizer = load(base)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    key = {"files": files, "task": t.model_dump(), "seq_len": spec.data.seq_len,
           "seed": spec.data.seed, "tokenizer": tokenizer.backend_tokenizer.to_str(),
           "template": tokenizer.chat_template, "version": 1}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = storage_uri(spec, "prepared", f"task-{digest}")
    done = read_json(root, "prepared.json")
    if done is not None:
        return {**done, "reused": True}

    import ray

    from llm_dist.cluster import connect

    connect(spec)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # stable ids
    paths = [f[0] for f in files]
    try:
        jsonl = [p for p in paths if corpus.format_of(p) == "jsonl"]
        parquet = [p for p in paths if corpus.format_of(p) == "parquet"]
        parts = ([ray.data.read_json(jsonl)] if jsonl else []) + (
            [ray.data.read_parquet(parquet)] if parquet else []
        )
        records = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        windows = records.map_batches(
            _encode, batch_format="pyarrow", batch_size=1024,
            fn_kwargs={"tokenizer_json": tokenizer.backend_tokenizer.to_str(),
                       "template": tokenizer.chat_template, "eos": tokenizer.eos_token,
                       "pad_id": tokenizer.pad_token_id, "t": t, "width": spec.data.seq_len + 1,
                       "seed": spec.data.seed},
        )  # fmt: skip
        stats = _write(windows, spec.data.seq_len + 1, root)
    except UserError:
        raise
    except Exception as e:  # Ray's reader names the file and line in its message
        raise UserError(f"tune.task.sources: cannot read the task records: {e}") from None
    save_into(tokenizer.save_pretrained, f"{root}/tokenizer")
    stats = {"prepared": root, "format": "sft", "records": stats.pop("records"),
             "tokenizer": f"{root}/tokenizer", "seq_len": spec.data.seq_len, **stats}  # fmt: skip
    if not stats["sequences"]["train"]:
        unusable = ", ".join(f"{k} {v:,}" for k, v in stats["unusable"].items())
        raise UserError(
            f"tune.task: no usable training records among {stats['records']:,} in "
            f"{', '.join(paths)} (unusable: {unusable or 'none'}); check "
            f"tune.task.prompt_field ({t.prompt_field!r}) and response_field "
            f"({t.response_field!r}), or raise data.seq_len if records are too long"
        )
    write_json(root, "prepared.json", stats)
    return {**stats, "reused": False}


def _encode(batch, tokenizer_json: str, template: str, eos: str, pad_id: int, t, width: int,
            seed: int):  # fmt: skip
    """Records -> one padded window each: `split`, `tokens` and `mask` (width), or a `reason`."""
    import pyarrow as pa
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    key = str(hash(tokenizer_json))
    if key not in _TOKENIZERS:
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json),
                                      eos_token=eos)  # fmt: skip
        tok.chat_template = template
        _TOKENIZERS[key] = tok
    tok = _TOKENIZERS[key]
    n = batch.num_rows

    def column(name):
        return batch[name].to_pylist() if name and name in batch.column_names else [None] * n

    prompts, responses = column(t.prompt_field), column(t.response_field)
    groups = column(t.group_field)
    out = {"split": [], "tokens": [], "mask": [], "reason": []}
    for prompt, response, group in zip(prompts, responses, groups, strict=True):
        reason, tokens, mask = None, np.full(width, pad_id, np.int32), np.zeros(width, np.int8)
        if not isinstance(prompt, str) or not isinstance(response, str):
            reason = "missing_field"
        elif not prompt.strip() or not response.strip():
            reason = "empty"
        else:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
            head = tok.encode(text, add_special_tokens=False)
            tail = [*tok.encode(response, add_special_tokens=False), tok.eos_token_id]
            ids = (head + tail)[:width]
            tokens[: len(ids)] = ids
            mask[len(head) : len(ids)] = 1
            if not mask[1:].any():  # the prompt fills the window: nothing left to learn
                reason = "too_long"
        key = group if group is not None else f"{prompt}\x00{response}"
        split = corpus.split_of(np.array([corpus.doc_hash(str(key))]), seed, t.val_fraction,
                                t.test_fraction)[0]  # fmt: skip
        out["split"].append(int(split))
        out["tokens"].append(tokens)
        out["mask"].append(mask)
        out["reason"].append(reason)
    tokens = np.stack(out["tokens"]) if n else np.zeros((0, width), np.int32)
    mask = np.stack(out["mask"]) if n else np.zeros((0, width), np.int8)
    return pa.table({
        "split": pa.array(out["split"], pa.int8()),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), width),
        "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.ravel()), width),
        "reason": pa.array(out["reason"], pa.string()),
    })  # fmt: skip


def _write(windows, width: int, root: str) -> dict:
    """Number the usable windows in order and write one Parquet file per split."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    filesys, path = filesystem(root)
    schema = pa.schema([("id", pa.int64()), ("tokens", pa.list_(pa.int32(), width)),
                        ("mask", pa.list_(pa.int8(), width))])  # fmt: skip
    writers = {}
    for name in SPLITS:
        filesys.create_dir(f"{path}/{name}", recursive=True)
        writers[name] = pq.ParquetWriter(f"{path}/{name}/part-00000.parquet", schema,
                                         filesystem=filesys)  # fmt: skip
    sequences, unusable, records, next_id = dict.fromkeys(SPLITS, 0), {}, 0, 0
    for table in windows.iter_batches(batch_format="pyarrow", batch_size=None):
        records += table.num_rows
        for item in pc.value_counts(table["reason"].drop_null()).to_pylist():
            unusable[item["values"]] = unusable.get(item["values"], 0) + item["counts"]
        good = table.filter(pc.is_null(table["reason"]))
        for s, name in enumerate(SPLITS):
            part = good.filter(pc.equal(good["split"], s))
            ids = pa.array(np.arange(next_id, next_id + part.num_rows, dtype=np.int64))
            writers[name].write_table(pa.table([ids, part["tokens"], part["mask"]], schema=schema))
            next_id += part.num_rows
            sequences[name] += part.num_rows
    for w in writers.values():
        w.close()
    return {"records": records, "sequences": sequences, "unusable": unusable}
