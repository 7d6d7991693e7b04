"""MLflow tracking when the store does not answer: one warning, and the run goes on untracked.

The tracked runs themselves are checked where they are made, against a real `mlflow server`
on loopback: data and pretraining in test_pretrain.py
(`test_data_and_pretraining_are_tracked_in_mlflow`), the sweep, its trials and the registered
winner in test_tune.py (`tracked_in_mlflow`).
"""

import socket
import time
from pathlib import Path

import pytest
from run_records import train_result

from llm_dist.records import MetricsRow
from llm_dist.spec import JobSpec
from llm_dist.tracking import tracker as tracking


@pytest.fixture
def nowhere() -> str:
    """An MLflow tracking URI on a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("tracking:")]


def test_a_store_that_does_not_answer_at_start_is_one_warning(
    nowhere, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", nowhere)  # the standard variable turns tracking on
    spec = JobSpec(name="d", storage_path=str(tmp_path), stages=["data"],
                   data={"sources": ["corpus.jsonl"]})  # fmt: skip
    run = str(tmp_path / "d")
    start = time.monotonic()
    assert tracking.start(spec, run) is None  # the pipeline then runs untracked
    assert time.monotonic() - start < 30  # told at once, not after MLflow's minutes of retries
    (line,) = warnings(capsys.readouterr().out)
    assert line.startswith(f"tracking: MLflow at {nowhere} failed (")
    assert line.endswith(f"the run goes on untracked; its record stays in {run}")


def test_a_store_that_fails_later_is_one_warning_and_tracking_stops(nowhere, tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own setting, for speed
    spec = JobSpec(name="d", storage_path=str(tmp_path), stages=["data"],
                   data={"sources": ["corpus.jsonl"]})  # fmt: skip
    tracker = tracking.Tracker(MlflowClient(nowhere), nowhere, spec, str(tmp_path / "d"), "1", "p")
    tracker.stages["pretrain"] = "r"  # as if the store had answered until now
    for step in range(1, 4):
        tracker.log_row("pretrain", MetricsRow(step=step, kind="train", time=time.time(), loss=1.0))
    assert len(tracker.rows) == 3  # held for the next batch, not queued as three requests
    # the batch finds the store gone
    tracker.end_stage("pretrain", "FINISHED", train_result(spec, "/x/export", step=3))
    tracker.start_stage("tune")
    tracker.log_row("pretrain", MetricsRow(step=4, kind="train", time=time.time(), loss=1.0))
    tracker.finish("FINISHED")
    assert not tracker.on and tracker.rows == []
    assert len(warnings(capsys.readouterr().out)) == 1


def test_submit_passes_on_a_tracking_uri_the_cluster_can_reach_and_never_credentials(
    tmp_path, monkeypatch, capsys
):
    from llm_dist.base import UserError
    from llm_dist.jobs import _tracking_uri

    spec = JobSpec(name="d", storage_path=str(tmp_path), stages=["data"],
                   data={"sources": ["corpus.jsonl"]})  # fmt: skip
    assert _tracking_uri(spec, "http://head:8265") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert _tracking_uri(spec, "http://head:8265") == "http://mlflow.internal:5000"
    spec.tracking.tracking_uri = "http://127.0.0.1:5000"  # the spec's own wins over the shell's
    assert _tracking_uri(spec, "http://127.0.0.1:8265") == "http://127.0.0.1:5000"
    assert _tracking_uri(spec, "http://head:8265") is None  # this machine's loopback: not there
    assert "is on this machine, which the job's driver on the cluster cannot reach" in (
        capsys.readouterr().out
    )
    spec.tracking.tracking_uri = None
    for uri in (
        "https://bob:s3cr3t@mlflow.internal",
        "https://mlflow.internal/?access_token=s3cr3t",
    ):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(UserError, match=r"^MLFLOW_TRACKING_URI: it holds a credential") as e:
            _tracking_uri(spec, "http://head:8265")
        assert "s3cr3t" not in str(e.value)


def test_a_torn_metrics_line_reaching_tracking_costs_that_line_only(tmp_path, capsys):
    """A trial killed mid-write leaves a torn last line in its metrics.jsonl: tracking logs
    the whole rows, stays on, and warns of nothing."""
    from mlflow import MlflowClient

    from llm_dist.run_folder import RunFolder

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = JobSpec(name="d", storage_path=str(tmp_path), stages=["data"],
                   data={"sources": ["corpus.jsonl"]})  # fmt: skip
    client = MlflowClient(uri)
    experiment = client.create_experiment("torn")
    trial_run = client.create_run(experiment).info.run_id
    folder = RunFolder(str(tmp_path / "d"))
    trial = folder.trial("t_00000")
    rows = [MetricsRow(step=5, kind="train", time=1.0, loss=2.0, lr=1e-3),
            MetricsRow(step=5, kind="eval", time=2.0, val_loss=2.5, val_rouge_l=0.25)]  # fmt: skip
    (tmp_path / "d" / "tune" / "trials" / "t_00000").mkdir(parents=True)
    Path(trial.metrics).write_text(
        "".join(r.model_dump_json(exclude_none=True) + "\n" for r in rows) + '{"step": 10, "ki'
    )
    tracker = tracking.Tracker(client, uri, spec, folder.uri, experiment, "p")
    tracker._trial_rows(trial_run, "t_00000", "val_loss")
    assert tracker.on and warnings(capsys.readouterr().out) == []
    logged = client.get_run(trial_run).data.metrics
    assert logged == {"loss": 2.0, "lr": 1e-3, "val_loss": 2.5, "val_rouge_l": 0.25}
