"""The data stage on a real local Ray: counts, quarantine, tokenizer, packing, splits, reuse, feeding."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import NASTY_BAD, S3_ENV, write_nasty

from llm_dist.base import UserError
from llm_dist.data import corpus
from llm_dist.data.prepare import SPLITS, prepare, run_stage
from llm_dist.spec import JobSpec

pytestmark = pytest.mark.slow


def spec_for(storage: Path, sources: list[str], **data) -> JobSpec:
    data = {"sources": sources, "seq_len": 32, "max_line_bytes": 4096, "max_bad_fraction": 0.2,
            "tokenizer": {"vocab_size": 300, "train_sample_docs": 1000}, **data}  # fmt: skip
    return JobSpec(name="d", storage_path=str(storage), stages=["data"], data=data)


def windows(prepared: str, split: str) -> dict[int, np.ndarray]:
    folder = Path(prepared) / split
    if not folder.exists():
        return {}
    table = pq.read_table(folder)
    tokens = np.stack(table["tokens"].to_numpy(zero_copy_only=False))
    return dict(zip(table["id"].to_pylist(), tokens, strict=True))


@pytest.fixture(scope="module")
def nasty_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("nasty")
    kept = write_nasty(root / "corpus")
    spec = spec_for(root / "runs", [str(root / "corpus")])
    run = str(root / "runs" / "d")
    return spec, run_stage(spec, run), run, kept


def test_counts_and_quarantine(nasty_run):
    """Every bad record and damaged file's rest is listed; every readable record is kept."""
    _, stats, run, kept = nasty_run
    assert stats.bad == NASTY_BAD
    assert stats.dropped == {"empty": 2}
    # nasty, more, notes (txt is one document per file by default), table, bom, cut, broken
    assert stats.records == 32 + 19 + 1 + 10 + 5 + (kept + 1) + 6
    assert stats.documents == 21 + 19 + 1 + 10 + 5 + kept + 5
    lines = [json.loads(x) for x in Path(run, "data", "quarantine.jsonl").read_text().splitlines()]
    assert Counter(x["reason"] for x in lines) == Counter(NASTY_BAD)
    where = {(Path(x["source"]).name, x["line"]) for x in lines}
    assert where == {*(("nasty.jsonl", n) for n in [*range(21, 29), 33]),
                     ("cut.jsonl.gz", kept + 1), ("broken.parquet", 6)}  # fmt: skip
    assert all(x["head"] for x in lines)


def test_too_many_bad_records_fail_and_nothing_is_lost(ray_session, tmp_path):
    write_nasty(tmp_path / "corpus")
    spec = spec_for(tmp_path / "runs", [str(tmp_path / "corpus")], max_bad_fraction=0.01)
    with pytest.raises(UserError) as err:
        prepare(spec)
    kept = 12  # of cut.jsonl.gz's records (test_corpus checks them one by one)
    total = 32 + 19 + 1 + 10 + 5 + (kept + 1) + 6
    assert (
        f"data: 11 of {total} records are bad ({11 / total:.2%} > data.max_bad_fraction 0.01)"
        in str(err.value)
    )
    assert "raise data.max_bad_fraction" in str(err.value)
    [prepared] = (tmp_path / "runs" / "prepared").iterdir()  # no folder it was written in
    assert len((prepared / "quarantine.jsonl").read_text().splitlines()) == 11
    assert [p.name for p in prepared.iterdir()] == ["quarantine.jsonl"]  # never reused


def test_reused_data_under_a_stricter_budget_stops_with_exit_2(nasty_run, tmp_path):
    """The error budget is the spec's: data prepared earlier under a looser one is refused
    too, and stays whole for the run that made it."""
    spec, stats, _, _ = nasty_run
    stricter = spec.model_copy(
        update={"data": spec.data.model_copy(update={"max_bad_fraction": 0.01})}
    )
    stricter = stricter.model_copy(update={"storage_path": spec.storage_path, "name": "strict"})
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(stricter.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "llm_dist.cli", "data", "prepare", str(path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert (f"data: 11 of {stats.records} records are bad ({11 / stats.records:.2%} > "
            "data.max_bad_fraction 0.01)") in out.stderr  # fmt: skip
    assert Path(stats.prepared, "prepared.json").exists()  # nothing of the looser run is lost
    assert prepare(spec).reused


def test_tokenizer_reloads_offline(nasty_run, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, stats, run, _ = nasty_run
    tok = AutoTokenizer.from_pretrained(str(Path(run, "data", "tokenizer")))
    assert len(tok) == stats.vocab_size == 300
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|endoftext|>", "<|pad|>", "<|bos|>")
    text = "document 0042 says word13 — café ✓"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips


def test_packing_matches_plain_tokenization(nasty_run):
    """Tokens in windows + remainder = tokens of the cleaned documents + one EOS each, per split."""
    from transformers import AutoTokenizer

    spec, stats, run, _ = nasty_run
    tok = AutoTokenizer.from_pretrained(str(Path(run, "data", "tokenizer")))
    expected = {s: Counter() for s in SPLITS}
    for path, _, _ in corpus.expand_sources(spec.data.sources):
        from pyarrow import fs

        local = fs.LocalFileSystem()
        f = (local.open_input_file(path) if path.endswith(".parquet")
             else local.open_input_stream(path, compression=None))  # fmt: skip
        for _, text, _, _ in corpus.read_records(f, path, spec.data):
            if text:
                h = np.array([corpus.doc_hash(text)], np.int64)
                split = SPLITS[corpus.split_of(h, 0, 0.05, 0.05)[0]]
                expected[split].update(tok(text)["input_ids"] + [tok.eos_token_id])
    width = spec.data.seq_len + 1
    all_ids = []
    for split in SPLITS:
        got = windows(stats.prepared, split)
        all_ids += list(got)
        assert stats.sequences[split] == len(got)
        assert stats.tokens[split] == sum(expected[split].values())
        assert stats.tokens[split] == len(got) * width + stats.remainder[split]
        assert stats.remainder[split] < width
        seen = Counter(t for w in got.values() for t in w.tolist())
        assert not seen - expected[split]  # nothing duplicated, nothing invented
    assert sorted(all_ids) == list(range(len(all_ids)))  # dense, unique global ids


def test_splits_are_disjoint_by_document(ray_session, tmp_path):
    """Each document is one unique marker word repeated: each marker lands in exactly one split."""
    import re

    from transformers import AutoTokenizer

    docs = [{"text": f"m{i:04d}x " * 40} for i in range(300)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = spec_for(tmp_path / "runs", [str(src)], val_fraction=0.1, test_fraction=0.1)
    stats = prepare(spec)
    tok = AutoTokenizer.from_pretrained(f"{stats.prepared}/tokenizer")
    markers = {}
    for split in SPLITS:
        text = tok.decode(np.concatenate(list(windows(stats.prepared, split).values())))
        markers[split] = set(re.findall(r"m(\d{4})x", text))
    assert not markers["train"] & markers["val"]
    assert not markers["train"] & markers["test"]
    assert not markers["val"] & markers["test"]
    assert len(set().union(*markers.values())) >= 300 - 3  # only a remainder may hide a doc
    assert 10 <= stats.docs["val"] <= 50 and 10 <= stats.docs["test"] <= 50


def test_fingerprint_reuse_and_invalidation(ray_session, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"text number {i} " * 5}) + "\n" for i in range(80)))
    spec = spec_for(tmp_path / "runs", [str(src)])
    first = prepare(spec)
    again = prepare(spec)
    assert (first.reused, again.reused) == (False, True)
    assert again.prepared == first.prepared
    other = prepare(spec_for(tmp_path / "runs", [str(src)], seq_len=16))
    assert not other.reused and other.prepared != first.prepared
    with src.open("a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    changed = prepare(spec)
    assert not changed.reused and changed.prepared != first.prepared
    assert changed.documents == first.documents + 1


def test_deterministic_under_a_seed(ray_session, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"doc {i} " + "abc " * (i % 9)}) + "\n" for i in range(200))
    )
    a = prepare(spec_for(tmp_path / "a", [str(src)]))
    b = prepare(spec_for(tmp_path / "b", [str(src)]))
    c = prepare(spec_for(tmp_path / "c", [str(src)], seed=1))
    for split in SPLITS:
        wa, wb = windows(a.prepared, split), windows(b.prepared, split)
        assert wa.keys() == wb.keys()
        assert all(np.array_equal(wa[i], wb[i]) for i in wa)
    assert (
        Path(a.tokenizer, "tokenizer.json").read_text()
        == Path(b.tokenizer, "tokenizer.json").read_text()
    )
    assert c.docs != a.docs  # another seed, another split of the documents


def test_worker_shards_disjoint_cover_all_and_skip_consumed(ray_session, nasty_run, tmp_path):
    """Two Ray Train workers read the train split through get_dataset_shard."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llm_dist.data.feed import epoch_batches, split_dataset

    _, stats, _, _ = nasty_run
    all_ids = set(windows(stats.prepared, "train"))
    consumed = sorted(all_ids)[::3]
    out = tmp_path / "seen"
    out.mkdir()

    def loop(config):
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        ids = [int(i) for b in epoch_batches(shard, 1, seed=0, epoch=0) for i in b["id"]]
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"{rank}.json").write_text(json.dumps(ids))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2),
        datasets={"train": split_dataset(stats.prepared, "train", exclude_ids=consumed)},
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="feed"),
    )
    trainer.fit()
    seen = [set(json.loads((out / f"{r}.json").read_text())) for r in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    left = all_ids - set(consumed)
    union = seen[0] | seen[1]
    assert not union & set(consumed)
    assert union <= left and len(left - union) <= 1  # equal shares may hold back one row


def test_in_memory_shares_are_disjoint_seeded_and_skip_consumed(tmp_path):
    """A trial's task split read whole by each worker (`feed.Windows`): two ranks' shares are
    disjoint, cover every row not consumed, differ by at most one row, keep each row's mask,
    and follow the seed (the same order on every call, another order for another seed)."""
    import pyarrow as pa

    from llm_dist.data.feed import Windows

    n, width = 23, 5
    tokens = np.arange(n * width).reshape(n, width)
    (tmp_path / "train").mkdir()
    for part in (0, 1):  # two files, as a Ray Data write leaves them
        rows = range(part * 12, min(n, part * 12 + 12))
        pq.write_table(pa.table({
            "id": pa.array(list(rows), pa.int64()),
            "tokens": pa.array([tokens[i].tolist() for i in rows], pa.list_(pa.int32(), width)),
            "mask": pa.array([[i % 2] * width for i in rows], pa.list_(pa.int8(), width)),
        }), tmp_path / "train" / f"{part}.parquet")  # fmt: skip
    consumed = [0, 7, 22]

    def share(rank: int, seed: int = 3) -> list[dict]:
        return list(Windows.read(str(tmp_path), "train", rank, 2, seed, consumed)
                    .iter_torch_batches(batch_size=4))  # fmt: skip

    shares = [share(0), share(1)]
    ids = [[int(i) for b in batches for i in b["id"]] for batches in shares]
    assert sorted(ids[0] + ids[1]) == sorted(set(range(n)) - set(consumed))
    assert not set(ids[0]) & set(ids[1]) and abs(len(ids[0]) - len(ids[1])) <= 1
    assert [len(b["id"]) for b in shares[0]] == [4, 4, 2]  # the tail is kept, not dropped
    for b in shares[0] + shares[1]:
        assert b["tokens"].dtype == torch.int64 and b["tokens"].shape[1] == width
        assert (b["tokens"][:, 0] == b["id"] * width).all()  # each row stays with its id
        assert (b["mask"][:, 0] == b["id"] % 2).all()
    assert [int(i) for b in share(0) for i in b["id"]] == ids[0]
    assert [int(i) for b in share(0, seed=4) for i in b["id"]] != ids[0]


def test_a_model_on_object_storage_is_cached_per_user_and_per_version(s3_server, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """The cache was a predictable shared /tmp/llm-dist/<hash> that trusted any folder with a
    .complete file and never rechecked the source: it is the user's own (0700), keyed by
    the source's files, so a changed model is copied again and a planted folder is not read."""
    import hashlib
    import os
    import tempfile

    import boto3

    from llm_dist.storage import local_folder

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="m/config.json", Body=b'{"v": 1}')
    s3.put_object(Bucket="models", Key="m/sub/weights.bin", Body=b"\x00" * 10)
    uri = "s3://models/m"
    planted = Path(tempfile.gettempdir(), "llm-dist", hashlib.sha256(uri.encode()).hexdigest()[:16])
    planted.mkdir(parents=True, exist_ok=True)
    (planted / ".complete").touch()
    (planted / "config.json").write_text('{"v": "planted"}')

    first = Path(local_folder(uri))
    assert first.parent == tmp_path / "cache" / "llm-dist" / "models"
    assert (first / "config.json").read_text() == '{"v": 1}'
    assert (first / "sub" / "weights.bin").read_bytes() == b"\x00" * 10
    assert os.stat(first.parent).st_mode & 0o777 == 0o700
    assert Path(local_folder(uri)) == first  # cached
    s3.put_object(Bucket="models", Key="m/config.json", Body=b'{"v": 22}')
    second = Path(local_folder(uri))
    assert second != first and (second / "config.json").read_text() == '{"v": 22}'
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, second.name])
    os.chmod(first.parent, 0o777)  # opened up by someone: closed again at the next use
    local_folder(uri)
    assert os.stat(first.parent).st_mode & 0o777 == 0o700


def test_object_storage_sources_and_output(ray_session, s3_server, tmp_path):
    """Corpus on s3:// and prepared data written to s3://, through a real S3 server on loopback."""
    import boto3

    write_nasty(tmp_path / "corpus")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="llm")
    for f in (tmp_path / "corpus").iterdir():
        s3.upload_file(str(f), "llm", f"corpus/{f.name}")
    spec = spec_for("s3://llm/runs", ["s3://llm/corpus/"])  # type: ignore[arg-type]
    stats = run_stage(spec, "s3://llm/runs/d")
    assert stats.bad == NASTY_BAD and stats.documents == 21 + 19 + 1 + 10 + 5 + 12 + 5
    assert stats.prepared.startswith("s3://llm/runs/prepared/")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="llm", Prefix="runs/")["Contents"]}
    prefix = stats.prepared.removeprefix("s3://llm/")
    assert {f"{prefix}/prepared.json", f"{prefix}/train/part-00000.parquet",
            f"{prefix}/tokenizer/tokenizer.json", "runs/d/data/quarantine.jsonl"} <= keys  # fmt: skip
    assert prepare(spec).reused  # the fingerprint of s3 objects (size, mtime) holds
    local = prepare(spec_for(tmp_path / "runs", [str(tmp_path / "corpus")]))
    for split in SPLITS:  # the same windows as reading the same files locally
        remote = pq.read_table(f"{stats.prepared}/{split}")["tokens"].to_pylist()
        assert remote == pq.read_table(f"{local.prepared}/{split}")["tokens"].to_pylist()


def test_dedup_keeps_the_first_copy_with_a_given_tokenizer(ray_session, nasty_run, tmp_path):
    _, first, _, _ = nasty_run
    src = tmp_path / "dups.jsonl"
    texts = [f"unique document {i} " * 4 for i in range(30)]
    texts += [*texts[:5], "unique document 3 " * 4]  # 6 copies of earlier documents
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = spec_for(tmp_path / "runs", [str(src)], dedup=True, tokenizer={"path": first.tokenizer})
    stats = prepare(spec)
    assert stats.dropped == {"duplicate": 6}
    assert stats.documents == 30
    assert stats.vocab_size == first.vocab_size  # the given tokenizer, not a new one
    undeduped = prepare(
        spec_for(tmp_path / "runs", [str(src)], tokenizer={"path": first.tokenizer})
    )
    assert undeduped.documents == 36 and "duplicate" not in undeduped.dropped


def test_a_quoted_special_token_is_text(ray_session, tmp_path):
    """Documents that quote <|endoftext|> or <|pad|> keep them as text: one EOS per document."""
    from transformers import AutoTokenizer

    docs = [f"doc {i}: ordinary prose about item {i} and what it returns." for i in range(20)]
    docs[5] = "doc 5: pasted model output: Hello there.<|endoftext|>The next story begins here."
    docs[11] = "doc 11: GPT-2 separates documents with <|endoftext|> and pads with <|pad|>."
    path = tmp_path / "quoted.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stats = prepare(spec_for(tmp_path, [str(path)], seq_len=8, val_fraction=0.0,
                             test_fraction=0.0))  # fmt: skip

    tok = AutoTokenizer.from_pretrained(stats.tokenizer, local_files_only=True)
    got = windows(stats.prepared, "train")
    stream = np.concatenate([got[i] for i in sorted(got)])
    # every document's own EOS, but the last one's when it fell in the remainder
    assert (stream == tok.eos_token_id).sum() == 20 - (stats.remainder["train"] > 0)
    assert (stream == tok.pad_token_id).sum() == 0
    quoted = tok.encode("<|endoftext|>", split_special_tokens=True)
    assert any((stream[i : i + len(quoted)] == quoted).all() for i in range(len(stream)))
