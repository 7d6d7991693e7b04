"""Files on a local disk or object storage (s3://, gs://) through pyarrow: atomic JSON, tolerant
JSONL, CSV tables, folders copied in and out. It knows no file names: `run_folder` does."""

import io
import json
import logging
import os
import uuid
from typing import Any

log = logging.getLogger("llm_dist.storage")


def filesystem(uri: str):
    """A pyarrow filesystem and the path inside it, for a local path or an object-store URI."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), uri
    return fs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    from pyarrow import fs

    filesys, path = filesystem(uri)
    return filesys.get_file_info(path).type != fs.FileType.NotFound


def read_bytes(uri: str) -> bytes | None:
    """A file's bytes, or None when it does not exist."""
    if not exists(uri):
        return None
    filesys, path = filesystem(uri)
    with filesys.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write to a temporary name beside `uri`, then rename: readers never see half a file."""
    filesys, path = filesystem(uri)
    parent, name = path.rsplit("/", 1)
    filesys.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    with filesys.open_output_stream(tmp) as f:
        f.write(data)
    filesys.move(tmp, path)


def read_json(uri: str) -> Any:
    """A JSON file's content, or None when it does not exist."""
    data = read_bytes(uri)
    return None if data is None else json.loads(data)


def write_json(uri: str, data: Any) -> None:
    write_bytes(uri, json.dumps(data, indent=2, default=str).encode())


def read_jsonl(uri: str) -> list[dict]:
    """The JSON rows of a JSONL file ([] when it does not exist). A line that does not parse (a
    process killed mid-write leaves a torn last line) costs that line only, with a log line."""
    rows = []
    for number, line in enumerate((read_bytes(uri) or b"").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: line %d is not JSON (torn by a kill?); skipped", uri, number)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_csv(uri: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    buffer = io.BytesIO()
    pcsv.write_csv(pa.Table.from_pylist(rows), buffer)
    write_bytes(uri, buffer.getvalue())


def read_csv(uri: str, text_columns: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a CSV file ([] when it does not exist); `text_columns` stay strings."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    data = read_bytes(uri)
    if data is None:
        return []
    options = pcsv.ConvertOptions(column_types=dict.fromkeys(text_columns, pa.string()))
    return pcsv.read_csv(io.BytesIO(data), convert_options=options).to_pylist()


def save_into(save, uri: str) -> None:
    """Run `save(folder)` straight into a local `uri`, or via a temporary folder to object storage."""
    if "://" not in uri:
        save(uri)
        return
    import tempfile

    from pyarrow import fs

    filesys, path = filesystem(uri)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        fs.copy_files(tmp, path, destination_filesystem=filesys)


def copy(source: str, target: str) -> None:
    """Copy a file or folder between any two places (local or object storage)."""
    from pyarrow import fs

    src_fs, src = filesystem(source)
    dst_fs, dst = filesystem(target)
    folder = src_fs.get_file_info(src).type == fs.FileType.Directory
    dst_fs.create_dir(dst if folder else dst.rsplit("/", 1)[0], recursive=True)
    fs.copy_files(src, dst, src_fs, dst_fs)


def local_folder(uri: str) -> str:
    """A local folder with the contents of `uri`: itself, or a cached copy of an object-store folder.

    For what only reads local files (transformers' `from_pretrained`). The copy is this user's
    (`cache_home()`, mode 0700: no one else can plant or change a model there), keyed by the
    URI and every file's path, size and modification time as the store lists them (pyarrow
    shows no ETag), so a changed source is copied again; it is filled in a temporary folder
    and renamed into place whole, so a folder under its key is always complete. Each node
    copies a model once per version.
    """
    if "://" not in uri:
        return uri
    import hashlib
    import shutil
    import tempfile

    from pyarrow import fs

    filesys, path = filesystem(uri)
    listing = sorted((f.path[len(path) :], f.size, f.mtime_ns) for f in
                     filesys.get_file_info(fs.FileSelector(path, recursive=True))
                     if f.type == fs.FileType.File)  # fmt: skip
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:24]
    root = cache_home("models")
    local = os.path.join(root, key)
    if not os.path.isdir(local):
        tmp = tempfile.mkdtemp(dir=root, prefix=".fill-")
        try:
            fs.copy_files(path, tmp, source_filesystem=filesys)
            os.rename(tmp, local)  # atomic; a node's other process may have won the race
        except OSError:
            if not os.path.isdir(local):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def cache_home(*parts: str) -> str:
    """This user's llm-dist cache folder (`$XDG_CACHE_HOME/llm-dist`, else
    `~/.cache/llm-dist`), made mode 0700; a UserError when it is not this user's own."""
    from llm_dist.base import UserError

    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    folder = os.path.join(base, "llm-dist", *parts)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for level in (os.path.join(base, "llm-dist"), folder):
        info = os.stat(level)
        if info.st_uid != os.getuid():
            raise UserError(f"{level}: the llm-dist cache belongs to another user (uid "
                            f"{info.st_uid}); remove it or set XDG_CACHE_HOME")  # fmt: skip
        if info.st_mode & 0o077:
            os.chmod(level, 0o700)
    return folder


def delete(uri: str) -> None:
    """Delete the file or folder (with all in it) at `uri`; nothing when there is none."""
    from pyarrow import fs

    filesys, path = filesystem(uri)
    kind = filesys.get_file_info(path).type
    if kind == fs.FileType.Directory:
        filesys.delete_dir(path)
    elif kind == fs.FileType.File:
        filesys.delete_file(path)


def replace_folder(source: str, target: str, last: str) -> None:
    """Put the folder `source` in the place of `target`, whole; `source` is gone after.

    Locally by renames (what was at `target` is moved aside first, then deleted), so a reader
    sees the old folder or the new one, never a mix. Object storage cannot rename a folder:
    there `target`'s files are deleted and `source`'s copied in, the file named `last` (the
    one that commits the folder) after every other, so the folder counts as whole only once
    it is. Raises OSError when another writer's folder took the place meanwhile.
    """
    from pyarrow import fs

    if "://" not in target:
        aside = f"{target}.{uuid.uuid4().hex}.old"
        if os.path.exists(target):
            os.rename(target, aside)
        try:
            os.rename(source, target)
        finally:
            if os.path.exists(aside):
                import shutil

                shutil.rmtree(aside, ignore_errors=True)
        return
    filesys, dst = filesystem(target)
    src = filesystem(source)[1]
    filesys.delete_dir_contents(dst, missing_dir_ok=True)
    files = [f.path for f in filesys.get_file_info(fs.FileSelector(src, recursive=True))
             if f.type == fs.FileType.File]  # fmt: skip
    for path in sorted(files, key=lambda p: p.endswith("/" + last)):  # the commit last
        into = dst + path[len(src) :]
        filesys.create_dir(into.rsplit("/", 1)[0], recursive=True)
        filesys.copy_file(path, into)
    filesys.delete_dir(src)


def subfolders(uri: str) -> list[str]:
    """The names of the folders directly inside `uri`, sorted ([] when it does not exist)."""
    from pyarrow import fs

    filesys, path = filesystem(uri)
    found = filesys.get_file_info(fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in found if i.type == fs.FileType.Directory)
