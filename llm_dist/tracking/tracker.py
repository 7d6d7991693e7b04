"""MLflow tracking on the driver: a parent run per llm-dist run, a nested run per stage and per
tune trial, and the sweep's winner registered as a model version with its lineage.

Tracking is on when `tracking.tracking_uri` or the standard `MLFLOW_TRACKING_URI` names a
store; off otherwise (the run folder and its report.html are the record). Only the driver talks
to MLflow, so credentials come from its environment alone (MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_USERNAME / _PASSWORD, as the mlflow client reads them). A store that cannot be
reached costs one warning and the run goes on untracked; so does one that fails later.

What goes where:
- the parent run (named after the run): the effective spec as parameters and spec.yaml, the
  served endpoint as a tag;
- `data`: the stage's counts as metrics, the quarantine counts as quarantine.json;
- `pretrain`: the model and pretrain settings, every metrics row as it is written (loss, lr,
  tokens/s, MFU, val and test loss at their step), metrics.jsonl and result.json;
- `tune`, and under it one run per trial (Ray Tune's MLflowLoggerCallback): the trial's
  settings, its validation figures at each evaluation, then its training rows, its
  metrics.jsonl and its status; the tune run gets results.csv, winner.json and the test figures;
- the registry: the winner's export as a version of `tracking.registered_model_name` (default:
  the run's name), tagged with its lineage.
"""

import contextlib
import json
import os
import time

from llm_dist.base import UserError, credentials_in, flat
from llm_dist.console import console
from llm_dist.records import DataResult, MetricsRow, Winner
from llm_dist.redact import public
from llm_dist.run_folder import RunFolder
from llm_dist.tracking.config import PARENT, RUN, STAGE, TRIAL, quoted, short

FLUSH_S = 10  # how often pretraining's rows go to the store
ROW_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait", "peak_memory_gb",
               "val_loss", "val_ppl", "test_loss", "test_ppl")  # fmt: skip


class Tracker:
    """The MLflow runs of one llm-dist run, made by `start`; each call warns once and turns
    tracking off when the store fails, so that a run never fails for its tracking."""

    def __init__(self, client, uri: str, spec, run: str, experiment_id: str, parent: str):
        self.client, self.uri, self.spec, self.run = client, uri, spec, run
        self.experiment_id, self.parent = experiment_id, parent
        self.stages: dict[str, str] = {}  # stage -> its nested run id
        self.rows: list = []  # metrics of `log_row` not sent yet
        self.flushed = time.monotonic()
        self.on = True

    @contextlib.contextmanager
    def _guard(self):
        try:
            yield
        except Exception as e:  # the tracking store failed: the run folder stays the record
            if self.on:
                console.print(f"[yellow]tracking: MLflow at {self.uri} failed ({short(e)}); "
                              f"the run goes on untracked; its record stays in {self.run}[/]")  # fmt: skip
            self.on = False

    def start_stage(self, stage: str) -> None:
        """Open (or, on a rerun, reopen) the stage's nested run with its spec section."""
        with self._guard():
            if not self.on:
                return
            found = self._find(
                f"tags.`{PARENT}` = {quoted(self.parent)} and tags.`{STAGE}` = {quoted(stage)}"
            )
            if found:  # a rerun: the stage runs again
                self.client.update_run(found, "RUNNING")
            run_id = found or self.client.create_run(
                self.experiment_id, run_name=stage,
                tags={PARENT: self.parent, STAGE: stage, RUN: self.run}).info.run_id  # fmt: skip
            sections = {"data": ["data"], "pretrain": ["model", "pretrain"], "tune": ["tune"],
                        "serve": ["serve"]}[stage]  # fmt: skip
            effective = public(self.spec)
            self._params(run_id, flat({k: effective[k] for k in sections}))
            self.stages[stage] = run_id

    def log_row(self, stage: str, row: MetricsRow) -> None:
        """One metrics row of the worker loop (`MetricsLog.write`) at its step. Rows are sent in
        batches every FLUSH_S seconds and when the stage ends, so a slow store costs one
        request per batch, and a dead one one warning, not a queue of retries."""
        if not self.on or stage not in self.stages or row.step is None:
            return
        self.rows += _metrics(row, ROW_METRICS)
        if time.monotonic() - self.flushed > FLUSH_S:
            self._flush(stage)

    def _flush(self, stage: str) -> None:
        rows, self.rows, self.flushed = self.rows, [], time.monotonic()
        with self._guard():
            for i in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics a request
                self.client.log_batch(self.stages[stage], metrics=rows[i : i + 1000])

    def trial_callback(self):
        """Ray Tune's MLflow logger for the sweep's trials, nested under the tune run."""
        if not self.on or "tune" not in self.stages:
            return None
        from llm_dist.tracking.trials import TrialRuns

        return TrialRuns(self.uri, experiment_name=self.spec.tracking.experiment_name,
                         tags={PARENT: self.stages["tune"], STAGE: "trial", RUN: self.run})  # fmt: skip

    def end_stage(self, stage: str, status: str, outputs=None) -> None:
        """Log what the stage left in the run folder (`outputs`, its record), then close its
        run with `status`."""
        run_id = self.stages.get(stage)
        with self._guard():
            if not self.on or run_id is None:
                return
            if self.rows:
                self._flush(stage)
            if not self.on:  # the flush found the store gone
                return
            if outputs:
                self._outputs(stage, run_id, outputs)
            self.client.set_terminated(run_id, status)

    def served(self, url: str) -> None:
        """The endpoint, as a tag of the parent run, as soon as it answers."""
        with self._guard():
            if self.on:
                self.client.set_tag(self.parent, "llm_dist.endpoint", url)

    def finish(self, status: str) -> None:
        with self._guard():
            if self.on:
                self.client.set_terminated(self.parent, status)

    def _outputs(self, stage: str, run_id: str, record) -> None:
        from mlflow.entities import Metric

        folder = RunFolder(self.run)
        outputs = record.model_dump(mode="json")
        live = ROW_METRICS if stage == "pretrain" else ()  # already there, each at its step
        numbers = {k: v for k, v in flat(outputs).items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k not in live}  # fmt: skip
        step = outputs.get("step") if isinstance(outputs.get("step"), int) else 0
        metrics = [Metric(k, float(v), 0, step) for k, v in numbers.items()]
        if isinstance(record, DataResult):  # 0 too, where no reason has a count
            metrics += [Metric(f"{k}.total", float(sum(getattr(record, k).values())), 0, 0)
                        for k in ("bad", "dropped")]  # fmt: skip
        self._batch(run_id, metrics)
        self.client.log_dict(run_id, outputs, "outputs.json")
        if isinstance(record, DataResult):
            counts = {k: outputs[k] for k in ("bad", "dropped", "records", "documents")}
            self.client.log_dict(run_id, counts, "quarantine.json")
        elif stage == "pretrain":
            self._copy(run_id, [folder.pretrain.metrics, folder.pretrain.result])
        elif isinstance(record, Winner):
            self._copy(run_id, [folder.winner, folder.results])
            self._trials(record)

    def _trials(self, winner: Winner) -> None:
        """Each trial run gets the status results.csv gives it (finished, stopped early...) and
        what its folder holds; the winner's export is registered from its run."""
        folder = RunFolder(self.run)
        runs, token = {}, None  # trial id -> its run, the newest where a trial has several
        while True:
            page = self.client.search_runs(
                [self.experiment_id], f"tags.`{PARENT}` = {quoted(self.stages['tune'])}",
                max_results=1000, order_by=["attributes.start_time DESC"], page_token=token)  # fmt: skip
            for found in page:
                runs.setdefault(found.data.tags.get(TRIAL), found.info.run_id)
            if not (token := page.token):
                break
        for row in folder.read_results():
            if run_id := runs.get(row.trial_id):
                self.client.set_tag(run_id, "llm_dist.status", row.status)
                self.client.set_tag(run_id, "llm_dist.winner", str(row.trial_id == winner.trial_id).lower())  # fmt: skip
                self._trial_rows(run_id, row.trial_id, winner.metric)
        if run_id := runs.get(winner.trial_id):
            self._register(winner, run_id)

    def _trial_rows(self, run_id: str, trial_id: str, metric: str) -> None:
        """A trial's training rows, the evaluations Tune did not hand over as they came (a final
        report reaches Tune with the trial's completion), and its metrics.jsonl. A torn line
        (a trial killed mid-write) costs that line only."""
        trial = RunFolder(self.run).trial(trial_id)
        live = {m.step for m in self.client.get_metric_history(run_id, metric)}
        metrics = []
        for row in trial.read_metrics():
            if row.kind == "train":
                metrics += _metrics(row, ROW_METRICS)
            elif row.kind == "eval" and row.step not in live:
                metrics += _metrics(row, [k for k in row.figures() if k.startswith("val_")])
        self._batch(run_id, metrics)
        self._copy(run_id, [trial.metrics])

    def _register(self, winner: Winner, run_id: str) -> None:
        """The winner's export, as a new version of the registered model, tagged with lineage,
        from the winner's trial run `run_id`."""
        from mlflow.exceptions import MlflowException

        from llm_dist.storage import local_folder

        name = self.spec.tracking.registered_model_name or self.spec.name
        if self.client.search_model_versions(
            f"name = {quoted(name)} and run_id = {quoted(run_id)}"
        ):
            return  # a rerun of a finished sweep does not register its winner again
        self.client.log_artifacts(run_id, local_folder(winner.export), "model")
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(name, source, run_id, tags=lineage(winner))
        console.print(f"tracking: the winner is version {version.version} of the registered "
                      f"model {name!r} at {self.uri}")  # fmt: skip

    def _copy(self, run_id: str, files: list[str]) -> None:
        """The run folder's `files` as text artifacts under their own names (missing ones: none)."""
        from llm_dist.storage import read_bytes

        for uri in files:
            data = read_bytes(uri)
            if data is not None:
                self.client.log_text(run_id, data.decode(errors="replace"), uri.rsplit("/", 1)[1])

    def _batch(self, run_id: str, metrics: list) -> None:
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a request
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def _find(self, where: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], where, max_results=1,
                                       order_by=["attributes.start_time DESC"])  # fmt: skip
        return runs[0].info.run_id if runs else None

    def _params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        # MLflow keeps a parameter's first value: a rerun with another spec is a new run folder
        todo = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(todo), 100):  # at most 100 parameters a request
            self.client.log_batch(run_id, params=todo[i : i + 100])


def start(spec, run: str) -> Tracker | None:
    """The run's Tracker when tracking is on and the store answers, else None (with a warning
    when it does not answer). A rerun of the same run folder reopens its parent run."""
    uri = spec.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    if where := credentials_in(uri):  # the spec's field refuses them; the environment's too
        raise UserError(f"MLFLOW_TRACKING_URI: holds a credential ({where}), which the run "
                        "would log and show; set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME "
                        "and MLFLOW_TRACKING_PASSWORD, instead")  # fmt: skip
    from mlflow import MlflowClient

    tracker = Tracker(MlflowClient(uri), uri, spec, run, "", "")
    with _no_retries(), tracker._guard():
        client, name = tracker.client, spec.tracking.experiment_name
        experiment = client.get_experiment_by_name(name)
        tracker.experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)  # fmt: skip
        tracker.parent = tracker._find(f"tags.`{RUN}` = {quoted(run)} and tags.`{STAGE}` = 'run'")
        if tracker.parent:  # a rerun of the run folder
            client.update_run(tracker.parent, "RUNNING")
        else:
            tracker.parent = client.create_run(tracker.experiment_id, run_name=spec.name,
                                               tags={RUN: run, STAGE: "run"}).info.run_id  # fmt: skip
        effective = public(spec)
        tracker._params(tracker.parent, flat(effective))
        import yaml

        client.log_text(tracker.parent, yaml.safe_dump(effective, sort_keys=False), "spec.yaml")
        console.print(f"tracking: MLflow run {tracker.parent} in experiment {name!r} at {uri}")
    return tracker if tracker.on else None


def lineage(winner: Winner) -> dict[str, str]:
    """The registered version's tags: where the winner came from and what it scored."""
    found = winner.lineage
    tags = {"trial_id": winner.trial_id, "base_model": found.base_model,
            "task_prepared": found.task_prepared, "tokenizer": found.tokenizer,
            "config": json.dumps(winner.config, sort_keys=True),
            f"val.{winner.metric}": f"{winner.value:.6g}"}  # fmt: skip
    if found.pretrain is not None:
        if found.pretrain.data_fingerprint:
            tags["data_fingerprint"] = found.pretrain.data_fingerprint
        tags["pretrain"] = found.pretrain.model_dump_json()
    for metric, f in winner.test.items():  # no interval from a single test record
        interval = "n/a" if f.low is None else f"[{f.low:+.6g}, {f.high:+.6g}]"
        tags[f"test.{metric}"] = (f"{f.winner:.6g} (base {f.base:.6g}, lift "
                                  f"{f.lift:+.6g} {interval})")  # fmt: skip
    return tags


def _metrics(row: MetricsRow, keys) -> list:
    """MLflow metrics of the row's `keys` that it carries, at its step and time."""
    from mlflow.entities import Metric

    figures = row.figures()
    return [Metric(k, figures[k], int(row.time * 1000), row.step) for k in keys if k in figures]


@contextlib.contextmanager
def _no_retries():
    """A store that does not answer is told at once, not after MLflow's minutes of retries."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in keys.items() if before[k] is None})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
