"""Reading records without Ray: each format, each bad kind counted exactly, cleaning, splits."""

import json
import unicodedata
from collections import Counter

import numpy as np
import pytest
from conftest import GOOD, NASTY_BAD, NASTY_DROPPED, write_nasty
from pyarrow import fs

from llm_dist.base import UserError
from llm_dist.data import corpus
from llm_dist.data.config import DataConfig


def records(path: str, cfg: DataConfig, fields: list[str] | None = None) -> list[tuple]:
    local = fs.LocalFileSystem()
    if corpus.format_of(path) == "parquet":
        f = local.open_input_file(path)
    else:
        f = local.open_input_stream(path, compression=None)
    return list(corpus.read_records(f, path, cfg, fields))


@pytest.fixture
def nasty(tmp_path):
    write_nasty(tmp_path)
    return tmp_path


def test_each_bad_kind_counted_exactly_and_nothing_lost(nasty):
    cfg = DataConfig(sources=["x"], max_line_bytes=2048)
    rows = records(str(nasty / "nasty.jsonl"), cfg)
    reasons = Counter(r[2] for r in rows if r[2])
    assert reasons == Counter(NASTY_BAD) - Counter(unreadable=2) + Counter(NASTY_DROPPED)
    assert len(rows) == 32  # 33 lines, one of them blank: every other line is one row
    bad_lines = sorted(r[0] for r in rows if r[2] in corpus.BAD)
    assert bad_lines == [21, 22, 23, 24, 25, 26, 27, 28, 33]
    assert rows[-1][3] == repr("half an emoji \ud83d")  # the quarantine can still hold it
    assert all(r[3] for r in rows if r[2] in corpus.BAD)  # first bytes kept for the quarantine


def test_cleaning_nfc_bom_nul(nasty):
    rows = records(str(nasty / "nasty.jsonl"), DataConfig(sources=["x"], max_line_bytes=2048))
    cleaned = rows[-2][1]
    assert cleaned.startswith("Café menu ")  # BOM and NUL gone, e + combining accent composed
    assert "\u0301" not in cleaned and "\x00" not in cleaned and "\ufeff" not in cleaned


def test_each_format(nasty):
    cfg = DataConfig(sources=["x"])
    texts = lambda name, c=cfg: [r[1] for r in records(str(nasty / name), c) if r[1]]  # noqa: E731
    assert texts("more.jsonl.gz") == GOOD[21:40]
    assert texts("table.parquet") == GOOD[50:60]
    assert texts("notes.txt") == ["\n\n".join(GOOD[40:50]) + "\n"]  # one document per file
    blocks = records(str(nasty / "notes.txt"), DataConfig(sources=["x"], txt_split="blank_line"))
    assert [r[1] for r in blocks] == GOOD[40:50]
    assert [r[0] for r in blocks] == list(range(1, 20, 2))  # numbered by their first line


def test_damaged_files_keep_what_precedes_the_damage(nasty):
    """A BOM is no content; a cut-off gzip stream and a broken row group cost only their rest."""
    cfg = DataConfig(sources=["x"])
    bom = records(str(nasty / "bom.jsonl"), cfg)
    assert [(r[0], r[1], r[2]) for r in bom] == [
        (i + 1, t, None) for i, t in enumerate(GOOD[60:65])
    ]
    cut = records(str(nasty / "cut.jsonl.gz"), cfg)
    kept = [r[1] for r in cut[:-1]]
    assert kept == GOOD[65 : 65 + len(kept)] and 0 < len(kept) < 25  # exactly what was decoded
    assert cut[-1][:3] == (len(kept) + 1, None, "unreadable")
    assert "Compressed file ended before the end-of-stream marker" in cut[-1][3]
    broken = records(str(nasty / "broken.parquet"), cfg)
    assert [r[1] for r in broken[:5]] == GOOD[90:95]
    assert broken[5][:3] == (6, None, "unreadable") and len(broken) == 6
    (nasty / "garbage.parquet").write_bytes(b"not parquet at all")
    assert [r[:3] for r in records(str(nasty / "garbage.parquet"), cfg)] == [
        (1, None, "unreadable")
    ]


def test_a_task_read_has_the_same_guarantees(tmp_path):
    """Picked fields: a BOM-led first record is read, a lone surrogate costs its record only."""
    path = tmp_path / "task.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "response": "b", "other": 1}\n'
                     b'{"prompt": "\\udc80", "response": "c"}\n{"prompt": "d", "response": 7}\n')  # fmt: skip
    rows = records(str(path), DataConfig(sources=["x"]), fields=["prompt", "response"])
    assert [r[1:3] for r in rows] == [('{"prompt": "a", "response": "b"}', None),
                                      (None, "invalid_unicode"),
                                      ('{"prompt": "d", "response": 7}', None)]  # fmt: skip


def test_control_characters_and_odd_escapes_are_text(tmp_path):
    """What UTF-8 can hold is kept as written (only BOM and NUL are removed): nothing is lost."""
    odd = ["\x1b[1mbold\x1b[0m and a bell \x07", "tab\tform feed\x0c line sep\u2028 para\u2029",
           "\U0001f600 emoji, \u00e9 and e\u0301, \ufffd replacement", "a\rcarriage return"]  # fmt: skip
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in odd))
    rows = records(str(path), DataConfig(sources=["x"]))
    assert [r[1] for r in rows] == [unicodedata.normalize("NFC", t) for t in odd]
    assert all(corpus.doc_hash(r[1]) for r in rows)


def test_a_parquet_value_that_is_not_utf8_costs_its_row(tmp_path):
    """Parquet writers do not check strings: one bad value, not its row group, is lost."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = pa.array([b"first good row", b"bad \xff byte", b"third good row"], pa.binary())
    pq.write_table(pa.table({"text": texts.view(pa.string())}), tmp_path / "t.parquet")
    rows = records(str(tmp_path / "t.parquet"), DataConfig(sources=["x"]))
    assert [r[:3] for r in rows] == [(1, "first good row", None), (2, None, "invalid_utf8"),
                                     (3, "third good row", None)]  # fmt: skip


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b", None]}), tmp_path / "t.parquet")
    rows = records(str(tmp_path / "t.parquet"), DataConfig(sources=["x"]))
    assert [r[2] for r in rows] == ["missing_field"] * 3


def test_length_limits():
    assert corpus.clean("abc", 5, None) == (None, "too_short")
    assert corpus.clean("abcdef", 1, 3) == (None, "too_long")
    assert corpus.clean("abc", 1, 3) == ("abc", None)


def test_expand_sources(nasty):
    files = corpus.expand_sources([str(nasty), str(nasty / "*.jsonl")])
    assert [p.rsplit("/", 1)[1] for p, _, _ in files] == [
        "bom.jsonl", "broken.parquet", "cut.jsonl.gz", "more.jsonl.gz", "nasty.jsonl",
        "notes.txt", "table.parquet"
    ]  # fmt: skip
    assert all(size > 0 and mtime > 0 for _, size, mtime in files)
    with pytest.raises(
        UserError, match=r"data.sources.1: '.*nothing\*.jsonl' matched no corpus files"
    ):
        corpus.expand_sources([str(nasty), str(nasty / "nothing*.jsonl")])
    (nasty / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"data.sources.0: .*x.csv is not .jsonl"):
        corpus.expand_sources([str(nasty / "x.csv")])


def test_splits_by_content_are_seeded_and_sized():
    hashes = np.array([corpus.doc_hash(f"doc {i}") for i in range(20_000)], np.int64)
    a = corpus.split_of(hashes, 0, 0.1, 0.05)
    assert np.array_equal(a, corpus.split_of(hashes, 0, 0.1, 0.05))
    assert not np.array_equal(a, corpus.split_of(hashes, 1, 0.1, 0.05))
    shares = np.bincount(a, minlength=3) / len(a)
    assert abs(shares[1] - 0.1) < 0.01 and abs(shares[2] - 0.05) < 0.01
    same = np.array([corpus.doc_hash("same text")] * 3, np.int64)
    assert len(set(corpus.split_of(same, 0, 0.3, 0.3))) == 1  # duplicates share a split


@pytest.mark.slow  # two walks of the standard library: 10 s
def test_stdlib_corpus(tmp_path):
    from llm_dist.data.stdlib import collect

    counts = collect(tmp_path)
    assert counts["documents"] > 3000 and counts["docstring_pairs"] > 1000
    first = json.loads((tmp_path / "stdlib.jsonl").open().readline())
    assert first["text"] and first["source"].endswith(".py")
    system, user, assistant = json.loads((tmp_path / "stdlib_docstrings.jsonl").open().readline())[
        "messages"
    ]
    assert [system["role"], user["role"], assistant["role"]] == ["system", "user", "assistant"]
    assert user["content"].startswith(("def ", "async def ")) and user["content"].endswith("):")
    assert assistant["content"]
    # collected again, the same content leaves the files alone: their fingerprint holds
    files = sorted(tmp_path.iterdir())
    before = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    (tmp_path / "stdlib_packages.jsonl").write_text("stale\n")
    assert collect(tmp_path) == counts
    after = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(tmp_path.iterdir())]
    assert after[:2] == before[:2] and after[2][1] != before[2][1]  # only the stale one made anew


def test_a_symlink_loop_is_read_once_and_globs_match_as_pythons_glob(tmp_path):
    """`sub/loop -> ..` multiplied one file into 81 (the same data 40 levels deep): each real
    file and folder is read once, by its shallowest path not through a link. `**/` matches no folder too, `*`
    stays within one name, as `glob.glob(..., recursive=True)`."""
    import os

    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.jsonl", "d/sub/b.jsonl", "d/_skip.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    os.symlink("..", tmp_path / "d" / "sub" / "loop")
    os.symlink(tmp_path / "d" / "sub", tmp_path / "d" / "again")  # another path to sub/
    d = tmp_path / "d"
    names = lambda sources: [p[len(str(d)) + 1 :] for p, _, _ in corpus.expand_sources(sources)]  # noqa: E731
    assert names([str(d)]) == ["a.jsonl", "sub/b.jsonl"]
    assert names([f"{d}/**/*.jsonl"]) == ["a.jsonl", "sub/b.jsonl"]
    assert names([f"{d}/*.jsonl"]) == ["a.jsonl"]
    assert names([f"{d}/[ab].jsonl", f"{d}/s?b/*"]) == ["a.jsonl", "sub/b.jsonl"]
    os.chdir(d)  # a bare relative glob reads the working folder
    assert [p for p, _, _ in corpus.expand_sources(["*.jsonl"])] == ["a.jsonl"]


def test_a_txt_document_over_the_byte_cap_is_quarantined_not_held(tmp_path):
    """A 30 MB one-line .txt became one 30-million-character document: a .txt document (the
    file, or a blank-line block) over `max_line_bytes` is quarantined as a JSONL line over it
    is, and the blocks around it are kept with their line numbers."""
    text = b"first\nblock\n\n\n" + b"x" * 5000 + b"\n\nlast\r\n"
    (tmp_path / "t.txt").write_bytes(text)
    blocks = DataConfig(sources=["x"], txt_split="blank_line", max_line_bytes=1024)
    got = [(n, t, r, h) for n, t, r, h in records(str(tmp_path / "t.txt"), blocks)]
    assert got == [(1, "first\nblock", None, None), (5, None, "document_too_long", repr(b"x" * 80)),
                   (7, "last\r", None, None)]  # fmt: skip
    whole = DataConfig(sources=["x"], max_line_bytes=1024)
    assert [r for _, _, r, _ in records(str(tmp_path / "t.txt"), whole)] == ["document_too_long"]
    (tmp_path / "s.txt").write_bytes(b"small\n")
    assert records(str(tmp_path / "s.txt"), whole) == [(1, "small\n", None, None)]


def test_a_leading_tilde_is_the_home_folder(monkeypatch, tmp_path):
    """`storage_path: ~/runs` made a folder named `~`: every place a spec names expands it."""
    from llm_dist.model import ModelConfig
    from llm_dist.spec import JobSpec
    from llm_dist.tune.config import TuneConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    spec = JobSpec(
        name="r",
        storage_path="~/runs",
        stages=["data"],
        data={"sources": ["~/c.jsonl", "s3://b/~x"]},
    )
    assert spec.storage_path == f"{tmp_path}/runs"
    assert spec.data.sources == [f"{tmp_path}/c.jsonl", "s3://b/~x"]
    tune = TuneConfig(base_model="~/base", task={"sources": ["~/t.jsonl"]})
    assert (tune.base_model, tune.task.sources) == (f"{tmp_path}/base", [f"{tmp_path}/t.jsonl"])
    assert ModelConfig(preset=None, path="~/m").path == f"{tmp_path}/m"
