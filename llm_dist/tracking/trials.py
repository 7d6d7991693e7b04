"""Ray Tune's MLflow logger for the sweep's trials, each a run nested under the tune stage's run.

The tracker hands it to the tune stage (`Tracker.trial_callback`). A module of its own: it
subclasses a Ray class (a heavy import), and Tune pickles it with the sweep's state, so it must
live at a module's top level.
"""

import contextlib
import time

from ray.air.integrations.mlflow import MLflowLoggerCallback

from llm_dist.compat import tune_mlflow
from llm_dist.console import console
from llm_dist.tracking.config import PARENT, TRIAL, quoted, short


class TrialRuns(MLflowLoggerCallback):
    """Ray Tune's MLflow logger, with each validation figure at the loop's optimizer `step` (not
    Tune's iteration) and the trial id as a tag. The trial's training rows and metrics.jsonl
    come when the sweep ends (`Tracker.end_stage`): a trial's workers may still write rows
    after Tune has ended it."""

    def setup(self, *args, **kwargs) -> None:
        self.on = True
        with self._guard():
            super().setup(*args, **kwargs)

    @contextlib.contextmanager
    def _guard(self):
        """A store that fails costs the trials their tracking, never the sweep."""
        try:
            yield
        except Exception as e:
            console.print(f"[yellow]tracking: MLflow at {self.tracking_uri} failed ({short(e)}); the "
                          "sweep goes on and its trials are no longer tracked[/]")  # fmt: skip
            self.on = False

    def log_trial_start(self, trial) -> None:
        if self.on:
            with self._guard():
                client, experiment, runs = tune_mlflow(self)
                if trial not in runs:  # a resumed sweep: the trial's own run again
                    found = client.search_runs(
                        [experiment], f"tags.`{PARENT}` = {quoted(self.tags[PARENT])} and "
                        f"tags.`{TRIAL}` = {quoted(trial.trial_id)}", max_results=1)  # fmt: skip
                    if found:
                        runs[trial] = found[0].info.run_id
                        client.update_run(found[0].info.run_id, "RUNNING")
                super().log_trial_start(trial)
                client.set_tag(runs[trial], TRIAL, trial.trial_id)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        from mlflow.entities import Metric

        if self.on:
            with self._guard():
                client, _, runs = tune_mlflow(self)
                ms = int(time.time() * 1000)
                figures = [Metric(k, float(v), ms, result["step"]) for k, v in result.items()
                           if k.startswith(("val_", "test_")) and isinstance(v, int | float)
                           and not isinstance(v, bool)]  # fmt: skip
                client.log_batch(runs[trial], metrics=figures)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if self.on:
            with self._guard():
                super().log_trial_end(trial, failed)
