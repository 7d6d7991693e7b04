"""The run folder `<storage_path>/<name>/` and its manifest.json, always replaced atomically."""

import json
import os
import platform
import socket
import time
import uuid
from importlib import metadata
from typing import Any

PACKAGES = ("llm-dist", "ray", "deepspeed", "torch", "transformers", "tokenizers", "pyarrow")


def run_uri(spec) -> str:
    """The run folder: an absolute local path, or an s3:// / gs:// URI."""
    return storage_uri(spec, spec.name)


def storage_uri(spec, *parts: str) -> str:
    """A place under storage_path: an absolute local path, or an s3:// / gs:// URI."""
    root = spec.storage_path
    if "://" in root and not root.startswith("file://"):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(os.path.abspath(root.removeprefix("file://")), *parts)


def filesystem(uri: str):
    """A pyarrow filesystem and the path inside it, for a local path or an object-store URI."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), uri
    return fs.FileSystem.from_uri(uri)


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


def local_folder(uri: str) -> str:
    """A local folder with the contents of `uri`: itself, or a cached copy of an object-store folder.

    For what only reads local files (transformers' `from_pretrained`); the copy is kept under
    the temp folder by a hash of the URI, so each node downloads a model once.
    """
    if "://" not in uri:
        return uri
    import hashlib
    import os
    import tempfile

    from pyarrow import fs

    local = os.path.join(
        tempfile.gettempdir(), "llm-dist", hashlib.sha256(uri.encode()).hexdigest()[:16]
    )
    if not os.path.exists(f"{local}/.complete"):
        filesys, path = filesystem(uri)
        os.makedirs(local, exist_ok=True)
        fs.copy_files(path, local, source_filesystem=filesys)
        open(f"{local}/.complete", "w").close()
    return local


def read_manifest(run: str) -> dict[str, Any] | None:
    """The run's manifest, or None when the run has not started yet."""
    return read_json(run, "manifest.json")


def read_json(folder: str, name: str) -> Any:
    """A JSON file's content, or None when it does not exist."""
    from pyarrow import fs as pafs

    filesys, path = filesystem(folder)
    if filesys.get_file_info(f"{path}/{name}").type == pafs.FileType.NotFound:
        return None
    with filesys.open_input_stream(f"{path}/{name}") as f:
        return json.loads(f.read())


def write_manifest(run: str, manifest: dict[str, Any]) -> None:
    write_json(run, "manifest.json", manifest)


def write_json(folder: str, name: str, data: Any) -> None:
    """Write to a temporary name, then rename: readers never see half a file."""
    filesys, path = filesystem(folder)
    filesys.create_dir(path, recursive=True)
    tmp = f"{path}/.{name}.{uuid.uuid4().hex}.tmp"
    with filesys.open_output_stream(tmp) as f:
        f.write(json.dumps(data, indent=2, default=str).encode())
    filesys.move(tmp, f"{path}/{name}")


def start_run(spec) -> str:
    """Create or reopen the run folder and record this start; returns the run folder."""
    run = run_uri(spec)
    manifest = read_manifest(run) or {"name": spec.name, "created_at": _now(), "stages": {}}
    manifest.update(
        spec=spec.model_dump(mode="json"),
        versions={p: _version(p) for p in PACKAGES} | {"python": platform.python_version()},
        host={"hostname": socket.gethostname(), "platform": platform.platform(),
              "cpus": os.cpu_count()},
        started_at=_now(),
    )  # fmt: skip
    write_manifest(run, manifest)
    return run


def update_stage(run: str, stage: str, status: str, **fields: Any) -> None:
    """Record a stage's status (running, succeeded, failed, interrupted) and its outputs."""
    manifest = read_manifest(run) or {"stages": {}}
    entry = manifest["stages"].setdefault(stage, {})
    if status == "running":
        entry.clear()
        entry["started_at"] = _now()
    else:
        entry["ended_at"] = _now()
    entry.update(status=status, **fields)
    write_manifest(run, manifest)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
