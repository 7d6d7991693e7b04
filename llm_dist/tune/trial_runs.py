"""Ray Tune's MLflow logger for the sweep's trials, each a run nested under the tune stage's run.

Kept apart from `llm_dist.tracking` because it subclasses a Ray class (a heavy import), and Tune
pickles it with the sweep's state, so it must live at a module's top level.
"""

import contextlib
import json

from ray.air.integrations.mlflow import MLflowLoggerCallback

from llm_dist.console import console
from llm_dist.tracking import ROW_METRICS, RUN, TRIAL


class TrialRuns(MLflowLoggerCallback):
    """Ray Tune's MLflow logger, with each figure at the loop's optimizer `step` (not Tune's
    iteration), the trial id as a tag, and, when the trial ends, its training rows and
    metrics.jsonl from its folder."""

    def setup(self, *args, **kwargs) -> None:
        self.logged: dict[str, set[int]] = {}  # trial id -> the steps logged as they came
        self.on = True
        with self._guard():
            super().setup(*args, **kwargs)

    @contextlib.contextmanager
    def _guard(self):
        """A store that fails costs the trials their tracking, never the sweep."""
        try:
            yield
        except Exception as e:
            console.print(f"[yellow]tracking: MLflow at {self.tracking_uri} failed ({e}); the "
                          "sweep goes on and its trials are no longer tracked[/]")  # fmt: skip
            self.on = False

    def log_trial_start(self, trial) -> None:
        if self.on:
            with self._guard():
                super().log_trial_start(trial)
                self.mlflow_util._get_client().set_tag(
                    self._trial_runs[trial], TRIAL, trial.trial_id
                )

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if self.on:
            with self._guard():
                self._result(trial, result)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if self.on:
            with self._guard():
                self._end(trial, failed)

    def _result(self, trial, result: dict) -> None:
        figures = {k: v for k, v in result.items() if k.startswith(("val_", "test_"))}
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=figures,
                                     step=result["step"])  # fmt: skip
        self.logged.setdefault(trial.trial_id, set()).add(result["step"])

    def _end(self, trial, failed: bool) -> None:
        from mlflow.entities import Metric

        from llm_dist.manifest import filesystem

        run_id, client = self._trial_runs[trial], self.mlflow_util._get_client()
        filesys, path = filesystem(f"{self.tags[RUN]}/tune/trials/{trial.trial_id}/metrics.jsonl")
        text = ""
        with contextlib.suppress(FileNotFoundError), filesys.open_input_stream(path) as f:
            text = f.read().decode()
        metrics, live = [], self.logged.get(trial.trial_id, set())
        for row in (json.loads(line) for line in text.splitlines() if line.strip()):
            if row["kind"] == "train":
                keys = ROW_METRICS
            elif row["kind"] == "eval" and row["step"] not in live:
                # Tune hands a trial's final report over with its completion, which reaches
                # no log_trial_result: the evaluations not logged as they came come from here
                keys = [k for k in row if k.startswith("val_")]
            else:
                continue
            metrics += [Metric(k, float(row[k]), int(row["time"] * 1000), row["step"])
                        for k in keys if isinstance(row.get(k), int | float)]  # fmt: skip
        for i in range(0, len(metrics), 1000):  # at most 1000 metrics a request
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        if text:
            client.log_text(run_id, text, "metrics.jsonl")
        super().log_trial_end(trial, failed)
