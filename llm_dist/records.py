"""The typed records stages leave in a run folder: one model per thing, one name per quantity.

Stages return these; `run_folder` writes and reads them; tracking, the report, the console and
serve read nothing else. Validation figures keep the names Ray Tune ranks by (`val_loss`,
`val_ppl`, `val_<task metric>`), so `tune.metric` names a key of `val`. Every record that can be
reused carries its `Origin`, what it was made from, and is reused only when that matches.
"""

import hashlib
import json
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer

RECORDS_VERSION = 2
"""The run folder's record format: 1 was llm-dist 0.1.0's loose dicts (no `records_version`)."""


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Origin(Record):
    """What a result was made from: the spec settings that decide it (dotted keys) and its
    inputs (a data fingerprint, the base model and its step), with a digest of both."""

    settings: dict[str, Any]
    inputs: dict[str, Any] = Field(default_factory=dict)
    digest: str = ""

    @classmethod
    def of(cls, settings: dict[str, Any], inputs: dict[str, Any] | None = None) -> "Origin":
        inputs = inputs or {}
        key = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
        return cls(settings=settings, inputs=inputs,
                   digest=hashlib.sha256(key.encode()).hexdigest()[:16])  # fmt: skip

    def differences(self, wanted: "Origin") -> list[str]:
        """`key: recorded -> wanted` for each setting or input that differs; inputs that only
        one side knows (a reader that cannot fingerprint the data) are not compared."""
        out = []
        for key in sorted(self.settings.keys() | wanted.settings.keys()):
            old, new = self.settings.get(key), wanted.settings.get(key)
            if old != new:
                out.append(f"{key}: {_shown(old)} -> {_shown(new)}")
        for key in sorted(self.inputs.keys() & wanted.inputs.keys()):
            if self.inputs[key] != wanted.inputs[key]:
                out.append(f"{key}: {_shown(self.inputs[key])} -> {_shown(wanted.inputs[key])}")
        return out


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


Splits = dict[str, int]  # train, val, test -> a count


class DataResult(Record):
    """The data stage's result: its `prepared.json`, and whether this run reused it."""

    prepared: str  # the prepared folder: train/ val/ test/ shards, tokenizer/, quarantine.jsonl
    fingerprint: str  # what the windows depend on (`data.prepare.fingerprint`)
    files: int
    records: int  # documents + bad + dropped
    documents: int
    bad: dict[str, int]  # by reason: counted against data.max_bad_fraction
    dropped: dict[str, int]  # by reason: ordinary cleaning (empty, duplicate, ...)
    quarantine: str
    tokenizer: str
    vocab_size: int
    seq_len: int
    docs: Splits
    tokens: Splits
    sequences: Splits  # windows of seq_len + 1 tokens
    shards: Splits
    remainder: Splits  # tokens left over at the end of each split, too few for a window
    seconds: float
    tokens_per_s: float
    reused: bool = False


class TaskData(Record):
    """The tune task's prepared data (`prepared.json` of `prepared/task-<digest>/`)."""

    prepared: str
    format: str
    tokenizer: str
    seq_len: int
    quarantine: str
    records: int
    sequences: Splits
    unusable: dict[str, int]  # records left out, by reason (too_long is not counted as bad)
    labels: list[str] | None = None  # classify: the label set
    label_ids: list[list[int]] | None = None  # classify: each label's answer tokens
    packed_records: int | None = None  # packed: the train records in the sequences.train rows
    reused: bool = False


class Sample(Record):
    prompt: str
    completion: str


class TrainResult(Record):
    """A worker-loop run's `result.json`: pretraining's, or one trial's (no test split)."""

    step: int
    epoch: int
    tokens: int  # tokens trained on
    bad_steps: int  # NaN/inf steps skipped
    val_loss_at_start: float | None  # None when resumed from a checkpoint
    val: dict[str, float | None]  # val_loss, val_ppl and each task metric's val_<name>
    test_loss: float | None = None  # pretraining only: a trial never sees the test split
    test_ppl: float | None = None
    export: str  # the HF model folder
    samples: list[Sample]
    world_size: int
    flops_per_token: float
    peak_flops_per_worker: float
    peak_flops_source: str
    origin: Origin | None = None  # pretraining's; a trial's settings are in the winner


class Exploit(Record):
    """A PBT exploit: `trial_id` went on from `donor`'s checkpoint `source`, at its `step`
    (copied into the trial's checkpoints as `checkpoint`), with the perturbed searched
    `settings`."""

    trial_id: str
    donor: str
    step: int
    source: str
    checkpoint: str
    settings: dict[str, Any]


class MetricsRow(BaseModel):
    """A row of `metrics.jsonl`: a train row, an evaluation (`eval`, `test`) or an `event`.
    Task metrics come as extra `val_<name>` fields."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["train", "eval", "test", "event"]
    time: float
    step: int | None = None
    # train rows
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_per_worker: float | None = None
    mfu: float | None = None
    data_wait: float | None = None  # share of training time spent waiting for data
    peak_memory_gb: float | None = None
    epoch: int | None = None
    bad_steps: int | None = None
    max_steps: int | None = None
    # evaluations
    val_loss: float | None = None
    val_ppl: float | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    task_seconds: float | None = None
    # events: resumed, checkpoint, checkpoint_skipped, bad_step
    event: str | None = None
    checkpoint: str | None = None
    reason: str | None = None
    in_a_row: int | None = None
    phases: dict[str, float] | None = None  # seconds per phase (events started, finished)
    exploit: Exploit | None = None  # event exploited: what a PBT trial took, from whom

    def figures(self) -> dict[str, float]:
        """Every number the row carries (step and time aside): what tracking logs."""
        values = self.model_dump(exclude={"kind", "time", "step", "epoch", "max_steps"})
        return {k: float(v) for k, v in values.items()
                if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip


TrialStatus = Literal["finished", "stopped early", "failed", "base (un-tuned)"]


class TrialRow(Record):
    """A row of `tune/results.csv`: one trial, or the un-tuned base's test figures."""

    trial_id: str
    status: TrialStatus
    settings: dict[str, Any] = Field(default_factory=dict)  # its draw of tune.search_space
    val: dict[str, float | None] = Field(default_factory=dict)  # at its last evaluation
    step: int | None = None
    seconds: float | None = None
    error: str | None = None  # the last line of its error
    test: dict[str, float | None] = Field(default_factory=dict)  # winner and base only


class Lift(Record):
    """One metric on the test split: winner, base, lift = winner - base, its 95% paired
    bootstrap interval (None from a single test record)."""

    winner: float
    base: float
    lift: float
    low: float | None
    high: float | None


class TaskCounts(Record):
    records: int
    sequences: Splits
    unusable: dict[str, int]
    packed_records: int | None = None  # packed: the train records in the sequences.train rows

    def line(self) -> str:
        """`N of M records prepared (train ..., val ..., test ...)`, and how train was packed."""
        s = self.sequences
        kept = (
            (s["train"] if self.packed_records is None else self.packed_records)
            + s["val"]
            + s["test"]
        )
        text = f"{kept:,} of {self.records:,} records prepared (" + ", ".join(
            f"{k} {v:,}" for k, v in s.items()
        )
        if self.packed_records is not None:
            text += f"; train packed: {self.packed_records:,} records in {s['train']:,} windows"
        return text + ")"


class PretrainLineage(Record):
    """The pretraining a winner's base came from, when it is this run's export."""

    result: str  # its result.json
    step: int
    tokens: int
    test_loss: float | None
    data_prepared: str | None
    data_fingerprint: str | None
    data_tokenizer: str | None  # the tokenizer pretraining used (the base's own)


class Lineage(Record):
    base_model: str
    tokenizer: str  # the tokenizer the winner was trained and is served with (the task's)
    task_sources: list[str]
    task_prepared: str
    pretrain: PretrainLineage | None = None
    # under PBT, the exploits the winner's weights came through, earliest first
    exploits: list[Exploit] = Field(default_factory=list)


class Winner(Record):
    """`winner.json`: the best trial by the validation metric, scored once on test with the base."""

    trial_id: str
    metric: str
    mode: Literal["min", "max"]
    value: float  # the winner's validation metric
    test: dict[str, Lift]  # loss first, then each task metric
    test_records: int
    config: dict[str, Any]  # the fine-tuning settings it trained with
    export: str
    trial_folder: str
    samples: list[Sample]
    trials: dict[str, int]  # finished, stopped early, failed
    task_data: TaskCounts
    sweep_seconds: float
    scoring_seconds: float
    lineage: Lineage
    origin: Origin


class ServedApp(Record):
    """The Serve application a run deployed (`<run>/serve/app.json`), written as soon as it is
    up: Ray Serve's `last_deployed_time_s` for it tells it from another run's app of the
    same name, which `serve` neither replaces nor deletes."""

    name: str
    route_prefix: str
    deployed_at: float


class ServeResult(Record):
    url: str
    model: str
    folder: str
    source: str
    seconds_to_ready: float
    test_prompt: str
    answer: str
    usage: dict[str, Any]


Out = TypeVar("Out")


class StageEntry(Record, Generic[Out]):
    status: Literal["running", "succeeded", "failed", "interrupted"]
    started_at: str | None = None
    ended_at: str | None = None
    error: str | None = None
    outputs: Out | None = None


class Stages(Record):
    """Each stage that has started, by name (stages that have not are left out of the file)."""

    data: StageEntry[DataResult] | None = None
    pretrain: StageEntry[TrainResult] | None = None
    tune: StageEntry[Winner] | None = None
    serve: StageEntry[ServeResult] | None = None

    @model_serializer(mode="wrap")
    def _started_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class Manifest(Record):
    """`manifest.json`: the spec of the latest start, versions, host, and each stage's status."""

    records_version: int = RECORDS_VERSION
    name: str
    created_at: str
    started_at: str
    spec: dict[str, Any]
    versions: dict[str, str | None]
    host: dict[str, Any]
    stages: Stages = Field(default_factory=Stages)
