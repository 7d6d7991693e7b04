"""Ray Data reading of corpus files: one row per record, good or bad, with its line number.

Ray's own JSON reader fails a whole block on one bad line, and a damaged file fails the whole
read; this datasource parses each record itself (see `corpus.read_records`), so one bad line
costs one record and a damaged file costs only what cannot be read of it.
"""

import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from llm_dist.data import corpus

SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("text", pa.string()),
                    ("reason", pa.string()), ("head", pa.string()), ("hash", pa.int64())])  # fmt: skip


class CorpusDatasource(FileBasedDatasource):
    """.jsonl, .jsonl.gz, .txt and .parquet files, local or on object storage."""

    def __init__(self, paths: list[str], cfg, fields: list[str] | None = None):
        super().__init__(paths)
        self._cfg, self._fields = cfg, fields

    def _open_input_source(self, filesystem, path: str, **open_args):
        if corpus.format_of(path) == "parquet":  # Parquet needs random access, not a stream
            return filesystem.open_input_file(path)
        if path.endswith(".gz"):  # decompressed by read_records, which keeps what precedes a cut
            return filesystem.open_input_stream(path, compression=None)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str):
        rows = []
        for line, text, reason, head in corpus.read_records(f, path, self._cfg, self._fields):
            rows.append((line, text, reason, head, corpus.doc_hash(text) if text else None))
            if len(rows) == corpus.ROWS_PER_BLOCK:
                yield _block(path, rows)
                rows = []
        if rows:
            yield _block(path, rows)


def _block(path: str, rows: list[tuple]) -> pa.Table:
    line, text, reason, head, hashes = zip(*rows, strict=True)
    columns = [[path] * len(rows), line, text, reason, head, hashes]
    return pa.Table.from_arrays([pa.array(c, t.type) for c, t in zip(columns, SCHEMA, strict=True)],
                                schema=SCHEMA)  # fmt: skip


def read_corpus(paths: list[str], cfg, fields: list[str] | None = None) -> ray.data.Dataset:
    """Every record of `paths` as a row (see `corpus` for the columns and `fields`)."""
    return ray.data.read_datasource(CorpusDatasource(paths, cfg, fields))
