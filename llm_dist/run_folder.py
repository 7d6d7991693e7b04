"""The one owner of the run folder `<storage_path>/<name>/` and of the prepared data beside it:
every path in them, and every read and write, as the typed records of `llm_dist.records`.

    <run>/manifest.json            Manifest: spec, versions, host, each stage's status
    <run>/lock, <run>/lock.json    who holds the folder now (`lock`: local flock, remote lease)
    <run>/data/                    the data stage's tokenizer/ and quarantine.jsonl, copied in
    <run>/pretrain/                a TrainFolder: checkpoints/, export/, metrics.jsonl,
                                   tensorboard/, ledger/, result.json (TrainResult)
    <run>/tune/sweep/              Ray Tune's own state (what --resume restores)
    <run>/tune/trials/<trial id>/  a TrainFolder per trial
    <run>/tune/results.csv         TrialRow per trial, and the base's test row
    <run>/tune/completed.json      trials that ended by themselves (finished or stopped)
    <run>/tune/origin.json         what the sweep in tune/sweep/ was started from
    <run>/winner.json              Winner
    <run>/serve/app.json           ServedApp: the Serve app this run deployed last
    <run>/report.html, logs/llm-dist.log
    <storage_path>/prepared/<fingerprint>/       DataResult in prepared.json, train/ val/ test/
    <storage_path>/prepared/task-<digest>/       TaskData in prepared.json, the same splits
    <storage_path>/prepared/.<key>.<random>.tmp/ one being prepared, moved into place whole
"""

import contextlib
import os
import platform
import socket
import time
import uuid
from importlib import metadata
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from llm_dist import storage
from llm_dist.base import UserError
from llm_dist.records import (
    RECORDS_VERSION,
    DataResult,
    Manifest,
    MetricsRow,
    Origin,
    ServedApp,
    StageEntry,
    TaskData,
    TrainResult,
    TrialRow,
    Winner,
)
from llm_dist.redact import public

PACKAGES = ("llm-dist", "ray", "deepspeed", "torch", "transformers", "tokenizers", "pyarrow")
R = TypeVar("R", bound=BaseModel)


def storage_uri(spec, *parts: str) -> str:
    """A place under storage_path: an absolute local path, or an s3:// / gs:// URI."""
    root = spec.storage_path
    if "://" in root and not root.startswith("file://"):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(os.path.abspath(root.removeprefix("file://")), *parts)


def run_uri(spec) -> str:
    """The run folder: an absolute local path, or an s3:// / gs:// URI."""
    return storage_uri(spec, spec.name)


def read_record(uri: str, model: type[R]) -> R | None:
    """The record in the JSON file `uri`, or None when there is none; a UserError naming the file
    when it is not one of this llm-dist's records."""
    raw = storage.read_json(uri)
    if raw is None:
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        raise UserError(
            f"{uri}: not a {model.__name__} record of llm-dist records version {RECORDS_VERSION} "
            f"({where}: {first['msg']}); it was written by another llm-dist: run under a new "
            "name (--set name=...) or with the llm-dist that wrote it"
        ) from None


def write_record(uri: str, record: BaseModel) -> None:
    storage.write_json(uri, record.model_dump(mode="json"))


class TrainFolder:
    """What one worker-loop run leaves: pretraining's `<run>/pretrain/`, or a trial's folder."""

    CHECKPOINTS = "checkpoints"  # the Ray Train run's name: its checkpoints land in there

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.checkpoints = f"{self.uri}/{self.CHECKPOINTS}"
        self.export = f"{self.uri}/export"
        self.metrics = f"{self.uri}/metrics.jsonl"
        self.tensorboard = f"{self.uri}/tensorboard"
        self.ledger = f"{self.uri}/ledger"
        self.result = f"{self.uri}/result.json"

    def read_result(self) -> TrainResult | None:
        return read_record(self.result, TrainResult)

    def write_result(self, result: TrainResult) -> None:
        write_record(self.result, result)

    def read_metrics(self) -> list[MetricsRow]:
        """The rows of metrics.jsonl; a torn or foreign line costs that line only."""
        rows = []
        for raw in storage.read_jsonl(self.metrics):
            try:
                rows.append(MetricsRow.model_validate(raw))
            except ValidationError:
                storage.log.warning("%s: a row that is not a metrics row; skipped", self.metrics)
        return rows


def ledger_file(folder: str, epoch: int) -> str:
    return f"{folder}/epoch-{epoch:04d}.npy"


def checkpoint_manifest(checkpoint: str) -> str:
    """The file that commits a checkpoint (`train.checkpoint`): written last, by rank 0."""
    return f"{checkpoint}/checkpoint.json"


class PreparedFolder:
    """Prepared windows: `train/`, `val/`, `test/` Parquet, `tokenizer/`, `quarantine.jsonl`,
    committed by `prepared.json` (written last: a crashed preparation is simply redone)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.tokenizer = f"{self.uri}/tokenizer"
        self.quarantine = f"{self.uri}/quarantine.jsonl"
        self.info = f"{self.uri}/prepared.json"

    def split(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def read(self, model: type[R]) -> R | None:
        return read_record(self.info, model)

    def commit(self, record: DataResult | TaskData) -> None:
        write_record(self.info, record)

    @contextlib.contextmanager
    def preparing(self):
        """A fresh folder beside this one to prepare into (the block's value); committed
        there, it is moved into this place whole when the block ends. Two runs preparing the
        same data at once never write into one folder, and the first to commit stays: the
        later one's (made from the same inputs) is dropped, so no reader of the first loses
        its files. What is here uncommitted (a crashed preparation's) is replaced. When the
        block raises a UserError (the data is refused), the quarantine it names is kept here;
        the rest is dropped.
        """
        parent, name = self.uri.rsplit("/", 1)
        work = PreparedFolder(f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            yield work
            if storage.exists(work.info) and not storage.exists(self.info):
                try:
                    storage.replace_folder(work.uri, self.uri, last=os.path.basename(self.info))
                except OSError:
                    if not storage.exists(self.info):  # not a writer beside us: a real failure
                        raise
        except UserError:
            if storage.exists(work.quarantine) and not storage.exists(self.info):
                storage.copy(work.quarantine, self.quarantine)
            raise
        finally:
            storage.delete(work.uri)


def prepared_folder(spec, key: str) -> PreparedFolder:
    """Where data prepared under `key` (a fingerprint) lives, shared by every run of storage_path."""
    return PreparedFolder(storage_uri(spec, "prepared", key))


class RunFolder:
    """The run folder at `uri` (local path or object-store URI) and its records."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.manifest = f"{self.uri}/manifest.json"
        self.data_tokenizer = f"{self.uri}/data/tokenizer"
        self.data_quarantine = f"{self.uri}/data/quarantine.jsonl"
        self.pretrain = TrainFolder(f"{self.uri}/pretrain")
        self.tune = f"{self.uri}/tune"
        self.sweep = f"{self.tune}/sweep"
        self.trials = f"{self.tune}/trials"
        self.results = f"{self.tune}/results.csv"
        self.completed = f"{self.tune}/completed.json"
        self.sweep_origin = f"{self.tune}/origin.json"
        self.winner = f"{self.uri}/winner.json"
        self.served_app = f"{self.uri}/serve/app.json"
        self.report = f"{self.uri}/report.html"
        self.logs = f"{self.uri}/logs"
        self.log_file = f"{self.logs}/llm-dist.log"

    @classmethod
    def of(cls, spec) -> "RunFolder":
        return cls(run_uri(spec))

    def trial(self, trial_id: str) -> TrainFolder:
        return TrainFolder(f"{self.trials}/{trial_id}")

    def trial_ids(self) -> list[str]:
        """The trials that have a folder (while a sweep runs, or after it failed)."""
        return storage.subfolders(self.trials)

    # ---- the manifest
    def read_manifest(self) -> Manifest | None:
        """The manifest, or None before the run's first start. A UserError for a run folder of
        another records version, naming it."""
        raw = storage.read_json(self.manifest)
        if raw is None:
            return None
        version = raw.get("records_version", 1) if isinstance(raw, dict) else None
        if version != RECORDS_VERSION:
            made_by = (raw.get("versions") or {}).get("llm-dist") if isinstance(raw, dict) else None
            raise UserError(
                f"{self.uri}: a run folder of records version {version} (written by llm-dist "
                f"{made_by or 'unknown'}); this llm-dist reads version {RECORDS_VERSION}: run "
                "under a new name (--set name=...) or with the llm-dist that wrote it"
            )
        return read_record(self.manifest, Manifest)

    def start(self, spec) -> Manifest:
        """Create or reopen the manifest and record this start: the spec, versions and host."""
        manifest = self.read_manifest()
        now = _now()
        fields = {
            "spec": public(spec), "started_at": now,
            "versions": {p: _version(p) for p in PACKAGES} | {"python": platform.python_version()},
            "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                     "cpus": os.cpu_count()},
        }  # fmt: skip
        if manifest is None:
            manifest = Manifest(name=spec.name, created_at=now, **fields)
        else:
            manifest = manifest.model_copy(update=fields)
        write_record(self.manifest, manifest)
        return manifest

    def update_stage(self, stage: str, status: str, outputs: BaseModel | None = None,
                     error: str | None = None) -> None:  # fmt: skip
        """Record a stage's status (running, succeeded, failed, interrupted) and its outputs."""
        manifest = self.read_manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.manifest}: the run has not started")
        entry = getattr(manifest.stages, stage)
        if status == "running" or entry is None:
            entry = StageEntry(status=status, started_at=_now())
        entry = StageEntry(**{**dict(entry), "status": status, "error": error})
        if status != "running":
            entry.ended_at = _now()
        if outputs is not None:
            entry.outputs = outputs
        setattr(manifest.stages, stage, entry)
        write_record(self.manifest, Manifest.model_validate(manifest.model_dump(mode="json")))

    # ---- tune
    def read_winner(self) -> Winner | None:
        return read_record(self.winner, Winner)

    def read_served_app(self) -> ServedApp | None:
        return read_record(self.served_app, ServedApp)

    def write_served_app(self, app: ServedApp) -> None:
        write_record(self.served_app, app)

    def write_winner(self, winner: Winner) -> None:
        write_record(self.winner, winner)

    def write_results(self, rows: list[TrialRow]) -> None:
        """results.csv: trial_id, the settings, val_*, step, status, seconds, error, test_*."""
        flat = [{"trial_id": r.trial_id, **r.settings, **r.val, "step": r.step,
                 "status": r.status, "seconds": r.seconds, "error": r.error,
                 **{f"test_{k}": v for k, v in r.test.items()}} for r in rows]  # fmt: skip
        columns = list(dict.fromkeys(k for row in flat for k in row))
        storage.write_csv(self.results, [{k: row.get(k) for k in columns} for row in flat])

    def read_results(self) -> list[TrialRow]:
        rows = []
        for raw in storage.read_csv(self.results, ("trial_id", "status", "error")):
            known = {"trial_id", "status", "step", "seconds", "error"}
            rows.append(TrialRow(
                **{k: raw[k] for k in known if raw.get(k) is not None},
                val={k: v for k, v in raw.items() if k.startswith("val_")},
                test={k[5:]: v for k, v in raw.items() if k.startswith("test_") and v is not None},
                settings={k: v for k, v in raw.items()
                          if k not in known and not k.startswith(("val_", "test_"))},
            ))  # fmt: skip
        return rows

    def completed_trials(self) -> set[str]:
        return set(storage.read_json(self.completed) or [])

    def add_completed(self, trial_id: str) -> None:
        storage.write_json(self.completed, sorted(self.completed_trials() | {trial_id}))

    def read_sweep_origin(self) -> Origin | None:
        return read_record(self.sweep_origin, Origin)

    def write_sweep_origin(self, origin: Origin) -> None:
        write_record(self.sweep_origin, origin)

    def write_report(self, page: str) -> str:
        storage.write_bytes(self.report, page.encode())
        return self.report


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
