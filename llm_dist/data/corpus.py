"""Reading a corpus: expand sources, parse each record, clean it, and classify what is bad.

Every record becomes one row: `source`, `line` (1-based line, row or block number), `text`
(cleaned, or null), `reason` (null for a good document; a BAD reason sends the row to the
quarantine, a DROPPED reason is ordinary cleaning), `head` (the first bytes of a bad record).

Whatever one record's bytes do costs that record: a file that cannot be read on from some
point (a compressed stream that ends early, a Parquet row group that cannot be decoded) keeps
every record before it, and the rest becomes one `unreadable` row naming the error.
"""

import gzip
import hashlib
import io
import json
import re
import unicodedata
import zlib
from collections.abc import Iterator

import numpy as np

from llm_dist.base import UserError

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet", ".txt": "txt"}
BAD = ("invalid_json", "invalid_utf8", "invalid_unicode", "missing_field", "not_a_string",
       "line_too_long", "document_too_long", "unreadable")  # fmt: skip
# what reading a damaged stream raises: OSError (pyarrow, gzip.BadGzipFile), EOFError (gzip),
# zlib.error, ValueError (pyarrow.ArrowInvalid)
UNREADABLE = (OSError, EOFError, zlib.error, ValueError)
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape them; UTF-8 cannot hold them
DROPPED = ("empty", "too_short", "too_long", "duplicate")
ROWS_PER_BLOCK = 4096


def format_of(path: str) -> str | None:
    return next((f for ext, f in FORMATS.items() if path.endswith(ext)), None)


def expand_sources(sources: list[str], field: str = "data.sources") -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every corpus file the sources name, sorted and deduplicated.

    A source is a file, a folder (every corpus file under it) or a glob: `*` and `?` within one
    name, `**` across folders, zero or more (`d/**/*.jsonl` matches `d/a.jsonl` too), as in
    Python's `glob` and Ray Data. Names starting with `.` or `_` below the source are skipped.
    Local folders are walked following symlinks, each real folder and file once, so a link
    back up the tree (`sub/loop -> ..`) adds nothing. `field` is the spec field the sources
    came from, named in errors.
    """
    from llm_dist.storage import filesystem

    found: dict[str, tuple[str, int, int]] = {}
    for i, source in enumerate(sources):
        filesys, path = filesystem(source)
        scheme = source.split("://", 1)[0] + "://" if "://" in source else ""
        pattern = any(ch in path for ch in "*?[")
        base = path
        if pattern:  # the folder above the first wildcard; `.` for a bare `*.jsonl`
            prefix = re.split(r"[*?[]", path, maxsplit=1)[0]
            base = prefix.rsplit("/", 1)[0] if "/" in prefix else "."
        single, files = _listing(filesys, base, local=not scheme)
        if base == ".":
            files = [(name.removeprefix("./"), size, mtime) for name, size, mtime in files]
        glob = _glob(path) if pattern else None
        matched = [
            (name, size, mtime)
            for name, size, mtime in files
            if (glob is None or glob.fullmatch(name))
            and (single or format_of(name))
            and not any(
                part.startswith((".", "_"))
                for part in name[0 if base == "." else len(base) :].split("/")
            )
        ]
        if not matched:
            raise UserError(f"{field}.{i}: {source!r} matched no corpus files")
        for name, size, mtime in matched:
            if format_of(name) is None:
                raise UserError(
                    f"{field}.{i}: {scheme}{name} is not .jsonl, .jsonl.gz, .parquet or .txt"
                )
            found.setdefault(scheme + name, (scheme + name, size, mtime))
    return sorted(found.values())


def _glob(pattern: str) -> re.Pattern:
    """A glob as a regex over whole paths: `**/` zero or more folders, `**` anything, `*` and
    `?` within one name, `[...]` (`[!...]`) a set of characters."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and (close := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : close]
            out.append(
                "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
            )
            i = close + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _listing(filesys, base: str, local: bool) -> tuple[bool, list[tuple[str, int, int]]]:
    """(whether `base` is a file, [(path, size, mtime_ns)] of it or of the files under it)."""
    from pyarrow import fs

    info = filesys.get_file_info(base)
    if info.type == fs.FileType.File:
        return True, [(info.path, info.size, info.mtime_ns or 0)]
    if info.type != fs.FileType.Directory:
        return False, []
    if not local:  # object stores have no links
        selector = fs.FileSelector(base, recursive=True)
        return False, [(f.path, f.size, f.mtime_ns or 0) for f in filesys.get_file_info(selector)
                       if f.type == fs.FileType.File]  # fmt: skip
    import collections
    import os

    files, seen, queue = [], set(), collections.deque([base.rstrip("/") or "/"])
    while queue:  # breadth first: a file reached twice keeps its shallowest path, not via a link
        folder = queue.popleft()
        if os.path.realpath(folder) in seen:
            continue
        seen.add(os.path.realpath(folder))
        with os.scandir(folder) as entries:
            for e in sorted(entries, key=lambda e: (e.is_symlink(), e.name)):  # links last
                if e.is_dir():
                    queue.append(e.path)
                elif e.is_file() and (real := os.path.realpath(e.path)) not in seen:
                    seen.add(real)
                    stat = e.stat()
                    files.append((e.path, stat.st_size, stat.st_mtime_ns))
    return False, files


def clean(text: str, min_chars: int, max_chars: int | None) -> tuple[str | None, str | None]:
    """(cleaned text, None) or (None, a DROPPED reason): NFC, no BOM or NUL, not blank."""
    text = unicodedata.normalize("NFC", text.replace("\ufeff", "").replace("\x00", ""))
    if not text.strip():
        return None, "empty"
    if len(text) < min_chars:
        return None, "too_short"
    if max_chars is not None and len(text) > max_chars:
        return None, "too_long"
    return text, None


def doc_hash(text: str) -> int:
    """A signed 64-bit content hash: equal texts are duplicates and always share a split."""
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True
    )


def read_records(f, path: str, cfg, fields: list[str] | None = None) -> Iterator[tuple]:
    """(line, text, reason, head) for each record of one file; never raises on a bad record.

    `f` is the file as stored: a `.gz` one still compressed (it is decompressed here, so the
    records before a cut-off end are kept). With `fields` (a fine-tuning task's), a record's
    text is the JSON of just those of its fields (those it lacks left out), typed by nothing:
    the task's own checks come later.
    """
    kind = format_of(path)
    if kind == "parquet":
        rows = _parquet_records(f, cfg, fields)
    elif kind == "txt":
        rows = _txt_records(f, cfg)
    else:
        rows = _jsonl_records(gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f, cfg, fields)
    for number, text, reason, head in rows:
        if text is not None and _SURROGATE.search(text):  # would fail hashing and tokenizing
            yield number, None, "invalid_unicode", repr(text[:80])
        else:
            yield number, text, reason, head


def _jsonl_records(f, cfg, fields) -> Iterator[tuple]:
    for number, line, reason, head in _lines(f, cfg.max_line_bytes):
        if reason:
            yield number, None, reason, head
            continue
        try:  # a BOM is an encoding artefact (Windows editors write one), not content
            record = json.loads(line.decode("utf-8").removeprefix("\ufeff"))
        except UnicodeDecodeError:
            yield number, None, "invalid_utf8", repr(line[:80])
            continue
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
            yield number, None, "invalid_json", repr(line[:80])
            continue
        yield (number, *_field(record, cfg, repr(line[:80]), fields))


def _lines(f, max_bytes: int) -> Iterator[tuple]:
    """(number, line, None, None) per non-blank line, (number, None, reason, head) for one too
    long, and a last (number, None, "unreadable", error) if the stream fails part way."""
    # pyarrow streams lack readline; a GzipFile has its own buffer, and a bigger one on top
    # would drop the records it had decoded when the stream fails
    stream = f if isinstance(f, gzip.GzipFile) else io.BufferedReader(f, buffer_size=1 << 20)
    number = 0
    try:
        while line := stream.readline(max_bytes + 1):
            number += 1
            if len(line) > max_bytes and not line.endswith(b"\n"):
                head = line[:80]
                while line and not line.endswith(b"\n"):  # skip the rest of the over-long line
                    line = stream.readline(1 << 20)
                yield number, None, "line_too_long", repr(head)
            elif line.strip():  # a blank line is not a record
                yield number, line, None, None
    except UNREADABLE as e:
        yield number + 1, None, "unreadable", f"{type(e).__name__}: {e}"[:200]


def _field(record, cfg, head: str, fields) -> tuple:
    if fields is not None:
        if not isinstance(record, dict):
            return None, "missing_field", head
        return _picked(record, fields), None, None
    if not isinstance(record, dict) or cfg.text_field not in record:
        return None, "missing_field", head
    value = record[cfg.text_field]
    if not isinstance(value, str):
        return None, "not_a_string", head
    return (*clean(value, cfg.min_chars, cfg.max_chars), None)


def _txt_records(f, cfg) -> Iterator[tuple]:
    """A .txt file's documents (the file, or its blank-line-separated blocks, numbered by their
    first line), streamed: a document over `max_line_bytes` is quarantined as
    `document_too_long` without being held, as a JSONL line over it is."""
    cap = cfg.max_line_bytes
    for number, block, head in _blocks(f, cap, whole_file=cfg.txt_split == "file"):
        if block is None:
            yield number, None, head[0], head[1]
            continue
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            yield number, None, "invalid_utf8", repr(block[:80])
            continue
        yield (number, *clean(text, cfg.min_chars, cfg.max_chars), None)


def _blocks(f, cap: int, whole_file: bool) -> Iterator[tuple]:
    """(first line, bytes, None) per document, (first line, None, (reason, head)) for one over
    `cap` bytes (its bytes past the cap are read and dropped), and a last (line, None,
    ("unreadable", error)) if the stream fails part way."""
    stream = io.BufferedReader(f, buffer_size=1 << 20)
    number, start, parts, size, at_line_start = 1, None, [], 0, True
    try:  # readline(cap + 1) returns a line longer than the cap in pieces
        while chunk := stream.readline(cap + 1):
            if not whole_file and at_line_start and chunk.endswith(b"\n") and not chunk.strip():
                if start is not None:  # a blank line ends the block
                    yield _block(start, parts, size, cap, whole_file)
                start, parts, size = None, [], 0
            else:
                start = number if start is None else start
                size += len(chunk)
                if size <= cap or not parts:  # past the cap only the head is kept
                    parts.append(chunk)
            at_line_start = chunk.endswith(b"\n")
            number += at_line_start
    except UNREADABLE as e:
        yield number, None, ("unreadable", f"{type(e).__name__}: {e}"[:200])
        return
    if start is not None:
        yield _block(start, parts, size, cap, whole_file)


def _block(start: int, parts: list[bytes], size: int, cap: int, whole_file: bool) -> tuple:
    if size > cap:
        return start, None, ("document_too_long", repr(parts[0][:80]))
    block = b"".join(parts)  # a block: the text before its blank line, without its newline
    return start, block if whole_file else block.removesuffix(b"\n"), None


def _picked(record: dict, fields: list[str]) -> str:
    return json.dumps(
        {k: record[k] for k in fields if k in record}, ensure_ascii=False, default=str
    )


def _parquet_records(f, cfg, fields) -> Iterator[tuple]:
    """Rows numbered from 1; a row group that fails to decode costs its unread rows, a value
    that is not UTF-8 (Parquet strings are not checked on write) its row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    unreadable = (*UNREADABLE, pa.ArrowException)
    try:
        parquet = pq.ParquetFile(f)
    except unreadable as e:
        yield 1, None, "unreadable", f"{type(e).__name__}: {e}"[:200]
        return
    names = parquet.schema_arrow.names
    if fields is not None:  # only the columns the task reads, whatever the others hold
        columns = [c for c in fields if c in names] or names[:1]
    elif cfg.text_field in names:
        columns = [cfg.text_field]
    else:
        for row in range(parquet.metadata.num_rows):
            yield row + 1, None, "missing_field", f"columns: {names}"[:80]
        return
    row = 0
    for group in range(parquet.num_row_groups):
        end = row + parquet.metadata.row_group(group).num_rows
        try:
            for batch in parquet.iter_batches(ROWS_PER_BLOCK, [group], columns):
                try:
                    records = batch.to_pylist()
                except UnicodeDecodeError:  # then row by row, to find the ones that are not
                    records = None
                for i in range(batch.num_rows):
                    row += 1
                    try:
                        record = batch.slice(i, 1).to_pylist()[0] if records is None else records[i]
                    except UnicodeDecodeError as e:
                        yield row, None, "invalid_utf8", f"{e}"[:80]
                        continue
                    yield row, *_field(record, cfg, repr(record)[:80], fields)
        except unreadable as e:
            yield row + 1, None, "unreadable", f"{type(e).__name__}: {e}"[:200]
            row = end


def uniform(hashes: np.ndarray, seed: int) -> np.ndarray:
    """A seeded number in [0, 1) per document hash (splitmix64 of hash ^ seed), stable across runs."""
    with np.errstate(over="ignore"):
        x = hashes.astype(np.int64).view(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


def split_of(hashes: np.ndarray, seed: int, val: float, test: float) -> np.ndarray:
    """0 train, 1 val, 2 test for each document: by content, so duplicates share a split."""
    u = uniform(hashes, seed)
    return np.where(u < val, 1, np.where(u < val + test, 2, 0)).astype(np.int8)
