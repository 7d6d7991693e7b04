"""The tune stage on a real local Ray: sweeps of real fine-tuning trials from a small base model."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from ray.tune.schedulers import FIFOScheduler
from tune_specs import results, spec_for

from llm_dist import pipeline
from llm_dist.base import UserError
from llm_dist.tune.run import run_stage


@pytest.fixture(scope="module")
def base(tiny_base) -> str:
    return tiny_base


@pytest.mark.slow
def test_asha_sweep_picks_the_best_finished_trial_and_beats_the_base(
    ray_session, tmp_path, task, base, mlflow_server
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_dist.finetune.evaluate import task_of
    from llm_dist.finetune.scores import lift
    from llm_dist.tune.winner import outcome_on_test

    spec = spec_for(tmp_path, task, base, scheduler="asha", grace_period=1, reduction_factor=3,
                    search_space={"lr": {"grid": [1e-5, 3e-3]},
                                  "method": {"grid": ["full", "lora"]}})  # fmt: skip
    spec.tune.task.metrics, spec.tune.task.max_new_tokens = ["rouge_l", "chrf"], 16
    spec.tracking.tracking_uri, spec.tracking.registered_model_name = mlflow_server, "docstrings"
    spec.cluster.env = {"LLM_DIST_NOTE": "s3cr3t-0c41e9"}  # reaches every trial's workers
    run = tmp_path / "t"
    pipeline.run(spec)
    winner = json.loads((run / "winner.json").read_text())
    # no record of the sweep holds it: Tune's own state (tune/sweep/), the trials, MLflow's
    assert [f for f in run.rglob("*") if f.is_file() and b"s3cr3t-0c41e9" in f.read_bytes()] == []

    table, (base_row,) = results(run), results(run, base=True)
    assert len(table) == 4
    assert {(float(r["lr"]), r["method"]) for r in table} == {
        (lr, m) for lr in (1e-5, 3e-3) for m in ("full", "lora")
    }
    stopped = [r for r in table if r["status"] == "stopped early"]
    finished = [r for r in table if r["status"] == "finished"]
    assert stopped and all(int(r["step"]) < 20 for r in stopped)
    assert all(int(r["step"]) == 20 for r in finished)
    best = min(finished, key=lambda r: float(r["val_loss"]))
    assert winner["trial_id"] == best["trial_id"]
    assert winner["value"] == pytest.approx(float(best["val_loss"]))
    assert json.loads((run / "winner.json").read_text())["trial_id"] == best["trial_id"]
    # one test figure, for the winner only, and it beats the un-tuned base
    assert [r["test_loss"] for r in table if r["test_loss"]] == [best["test_loss"]]
    assert winner["test"]["loss"]["winner"] < winner["test"]["loss"]["base"]
    assert base_row["status"] == "base (un-tuned)"
    assert float(base_row["test_loss"]) == pytest.approx(winner["test"]["loss"]["base"])
    # the task metrics: each with the lift over the base and its interval
    assert list(winner["test"]) == ["loss", "rouge_l", "chrf"]
    for metric, v in winner["test"].items():
        assert v["low"] <= v["lift"] <= v["high"]
        assert v["lift"] == pytest.approx(v["winner"] - v["base"])
        assert float(best[f"test_{metric}"]) == pytest.approx(v["winner"])
        assert float(base_row[f"test_{metric}"]) == pytest.approx(v["base"])
    assert winner["test"]["loss"]["high"] < 0  # tuning lowered the loss beyond the noise
    assert winner["lineage"]["base_model"] == str(Path(base).resolve())
    assert winner["trials"] == {"finished": len(finished), "stopped early": len(stopped),
                                "failed": 0}  # fmt: skip
    # the export (LoRA merged when the winner used it) reloads as a plain HF model, offline
    export = winner["export"]
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(export, local_files_only=True).chat_template
    prepared = winner["lineage"]["task_prepared"]
    again = outcome_on_test(export, prepared, 8, task_of(spec, prepared))
    assert len(again["targets"]) == winner["test_records"]
    for metric, v in winner["test"].items():
        assert lift(metric, again, again)["winner"] == pytest.approx(v["winner"], rel=1e-4)
    # every trial evaluated every 5 steps (what it reported to ASHA) until it stopped
    for r in table:
        lines = (run / "tune" / "trials" / r["trial_id"] / "metrics.jsonl").read_text()
        evals = [
            row["step"] for row in map(json.loads, lines.splitlines()) if row["kind"] == "eval"
        ]
        assert evals[: int(r["step"]) // 5 + 1] == list(range(0, int(r["step"]) + 1, 5))
        if r["status"] == "finished":
            assert evals == [0, 5, 10, 15, 20]
        rows = [row for row in map(json.loads, lines.splitlines()) if row["kind"] == "eval"]
        assert all(0 <= row["val_rouge_l"] <= 1 and 0 <= row["val_chrf"] <= 1 for row in rows)
    # a finished sweep is reported, not rerun (nor its winner registered again)
    assert run_stage(spec, str(run)).trial_id == winner["trial_id"]
    pipeline.run(spec)
    tracked_in_mlflow(mlflow_server, run, table, winner)
    reported(run, table, winner)


def reported(run: Path, table: list[dict], winner: dict) -> None:
    """The report of the sweep's real run folder: every trial's curve with its status, the
    winner, its test figures; only the stages this run did not have are said to be missing."""
    import re

    from llm_dist.report import write_report

    page = Path(write_report(str(run))).read_text()
    legend = re.search(r'alt="val_loss by step: ([^"]*)"', page).group(1)
    for r in table:
        won = ", winner" if r["trial_id"] == winner["trial_id"] else ""
        assert f"{r['trial_id']} ({r['status']}{won})" in legend
    assert f"Winner: trial {winner['trial_id']}." in page
    assert f"<td>loss</td><td>{winner['test']['loss']['base']:.4g}</td>" in page
    assert re.findall(r'<p class="missing">([^<]*)</p>', page) == [
        "the data stage has no outputs", "no metrics rows and no result: not started",
        "the serve stage has no outputs"]  # fmt: skip


def tracked_in_mlflow(uri: str, run: Path, table: list[dict], winner: dict) -> None:
    """The sweep in MLflow: a run per trial under the tune run, with its figures at their steps
    and its status; the winner registered with its lineage and its export as the version."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("llm-dist")
    runs = client.search_runs([experiment.experiment_id], f"tags.`llm_dist.run_folder` = '{run}'")
    (parent,) = [r for r in runs if r.data.tags["llm_dist.stage"] == "run"]
    (tune,) = [r for r in runs if r.data.tags["llm_dist.stage"] == "tune"]
    trials = {
        r.data.tags["llm_dist.trial_id"]: r
        for r in runs
        if r.data.tags["llm_dist.stage"] == "trial"
    }
    assert tune.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert tune.data.params["tune.scheduler"] == "asha"
    assert tune.data.metrics["test.loss.lift"] == pytest.approx(winner["test"]["loss"]["lift"])
    assert tune.data.metrics["task_data.records"] == winner["task_data"]["records"]
    assert {a.path for a in client.list_artifacts(tune.info.run_id)} >= {
        "results.csv",
        "winner.json",
    }
    assert sorted(trials) == sorted(r["trial_id"] for r in table)
    for r in table:
        trial = trials[r["trial_id"]]
        assert trial.data.tags["mlflow.parentRunId"] == tune.info.run_id
        assert trial.data.tags["llm_dist.status"] == r["status"]
        assert float(trial.data.params["lr"]) == float(r["lr"])
        rows = [json.loads(line) for line in
                (run / "tune" / "trials" / r["trial_id"] / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
        for key, kind in (("val_loss", "eval"), ("val_rouge_l", "eval"), ("loss", "train")):
            history = client.get_metric_history(trial.info.run_id, key)
            assert sorted((m.step, m.value) for m in history) == [
                (row["step"], pytest.approx(row[key])) for row in rows if row["kind"] == kind
            ], (r["trial_id"], key)
    (version,) = client.search_model_versions("name='docstrings'")
    assert version.run_id == trials[winner["trial_id"]].info.run_id
    assert trials[winner["trial_id"]].data.tags["llm_dist.winner"] == "true"
    tags = version.tags
    assert tags["trial_id"] == winner["trial_id"]
    assert tags["base_model"] == winner["lineage"]["base_model"]
    assert tags["task_prepared"] == winner["lineage"]["task_prepared"]
    assert json.loads(tags["config"])["method"] == winner["config"]["method"]
    low, high = winner["test"]["loss"]["low"], winner["test"]["loss"]["high"]
    assert f"[{low:+.6g}, {high:+.6g}]" in tags["test.loss"] and "test.rouge_l" in tags
    files = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= files


class StopAtTheFinalReport(FIFOScheduler):
    """A Tune scheduler that stops every trial at its final report (as ASHA does at max_t, but
    always), noting which files the trial's folder held at that moment."""

    def __init__(self, trials: Path, max_steps: int):
        super().__init__()
        self.trials, self.max_steps, self.held = trials, max_steps, {}

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("step", 0) < self.max_steps:
            return self.CONTINUE
        self.held[trial.trial_id] = {p.name for p in (self.trials / trial.trial_id).iterdir()}
        return self.STOP


@pytest.mark.slow
def test_a_trial_stopped_at_its_final_report_is_whole(ray_session, tmp_path, task, base,
                                                       monkeypatch):  # fmt: skip
    """Whatever a scheduler decides at a trial's last report, a trial that trained to its
    budget has its export and result.json: they are written before that report."""
    from transformers import AutoModelForCausalLM

    spec = spec_for(tmp_path, task, base, scheduler="fifo", max_steps=10,
                    search_space={"method": {"grid": ["lora", "full"]}})  # fmt: skip
    run = tmp_path / "t"
    scheduler = StopAtTheFinalReport(run / "tune" / "trials", 10)
    monkeypatch.setattr("llm_dist.tune.run._scheduler", lambda t: scheduler)
    ctrl_c = signal.getsignal(signal.SIGINT)
    winner = run_stage(spec, str(run)).model_dump(mode="json")
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # Tune's own handler is not left behind

    table = results(run)
    assert scheduler.held.keys() == {r["trial_id"] for r in table}  # both stopped at step 10
    for held in scheduler.held.values():
        assert {"export", "result.json"} <= held
    assert [(r["status"], r["step"]) for r in table] == [("finished", "10")] * 2
    assert winner["trials"] == {"finished": 2, "stopped early": 0, "failed": 0}
    assert AutoModelForCausalLM.from_pretrained(winner["export"], local_files_only=True)


@pytest.mark.slow
def test_optuna_sweep_survives_a_failing_trial(ray_session, tmp_path, task, base, capsys):
    """Optuna (TPE) proposes the learning rates; one trial loses its worker and fails."""
    from ray.util.state import list_actors

    spec = spec_for(tmp_path, task, base, search="optuna", scheduler="fifo", num_samples=2,
                    method="lora", max_failures=0, max_concurrent_trials=1,
                    search_space={"lr": {"loguniform": [1e-4, 1e-2]}})  # fmt: skip
    run = tmp_path / "t"
    killed = []

    def kill_first_worker():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            trials = list((run / "tune" / "trials").glob("*/metrics.jsonl"))
            if trials:  # a trial is training: kill its Ray Train worker, as a lost node would
                for actor in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                  ("state", "=", "ALIVE")]):  # fmt: skip
                    os.kill(actor.pid, signal.SIGKILL)
                    killed.append(actor.pid)
                    break
            time.sleep(0.5)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    winner = run_stage(spec, str(run)).model_dump(mode="json")
    killer.join()

    assert killed
    table = results(run)
    assert [r["status"] for r in table].count("failed") == 1
    assert [r["status"] for r in table].count("finished") == 1
    failed = next(r for r in table if r["status"] == "failed")
    assert failed["error"]  # the reason is recorded
    console = capsys.readouterr().out  # the failure and its reason reach the console
    (line,) = [x for x in console.splitlines() if x.startswith(f"tune: trial {failed['trial_id']}")]
    assert line.startswith(f"tune: trial {failed['trial_id']} failed at step ")
    assert "· 1 failed" in line
    assert "(the whole traceback: " in console
    lrs = [float(r["lr"]) for r in table]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert winner["trial_id"] != failed["trial_id"]
    assert winner["trials"]["failed"] == 1


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_resumes(ray_session, tmp_path, task, base):
    """SIGTERM (a container's stop) to `llm-dist tune` mid-trial acts as Ctrl-C: Tune saves the
    sweep, the process exits 143 with no Ray process left, and `--resume` finishes the sweep."""
    from ray_head import cli_in_background, no_marked_process_within

    spec = spec_for(tmp_path, task, base, scheduler="fifo", method="lora", max_steps=10,
                    search_space={"lr": {"grid": [3e-3]}})  # fmt: skip
    run = tmp_path / "t"
    proc, mark, log = cli_in_background("tune", spec, tmp_path)
    deadline = time.monotonic() + 300
    while not list((run / "tune" / "trials").glob("*/checkpoints/*/checkpoint.json")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    out = log.read_text()
    assert "continue it with `llm-dist tune SPEC --resume`" in out
    full = (run / "logs" / "llm-dist.log").read_text()  # the rest of the process's output
    assert "SIGTERM received" not in out + full  # Ray's own handler: a stack dump, then exit 15
    assert no_marked_process_within(mark, 30) == []
    assert not (run / "winner.json").exists()
    with pytest.raises(UserError, match="continue it with `llm-dist tune SPEC --resume`"):
        run_stage(spec, str(run))

    winner = run_stage(spec, str(run), resume=True).model_dump(mode="json")
    table = results(run)
    assert [r["status"] for r in table] == ["finished"]
    lines = (run / "tune" / "trials" / winner["trial_id"] / "metrics.jsonl").read_text()
    events = [row.get("event") for row in map(json.loads, lines.splitlines())]
    assert "resumed" in events  # the interrupted trial went on from its checkpoint
