"""Ray Tune's MLflow logger for the sweep's trials, each a run nested under the tune stage's run.

Kept apart from `llm_dist.tracking` because it subclasses a Ray class (a heavy import), and Tune
pickles it with the sweep's state, so it must live at a module's top level.
"""

import contextlib

from ray.air.integrations.mlflow import MLflowLoggerCallback

from llm_dist.console import console
from llm_dist.tracking import PARENT, TRIAL, _q, _short


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
            console.print(f"[yellow]tracking: MLflow at {self.tracking_uri} failed ({_short(e)}); the "
                          "sweep goes on and its trials are no longer tracked[/]")  # fmt: skip
            self.on = False

    def log_trial_start(self, trial) -> None:
        if self.on:
            with self._guard():
                if trial not in self._trial_runs:  # a resumed sweep: the trial's own run again
                    found = self.mlflow_util._get_client().search_runs(
                        [self.mlflow_util.experiment_id],
                        f"tags.`{PARENT}` = {_q(self.tags[PARENT])} and "
                        f"tags.`{TRIAL}` = {_q(trial.trial_id)}", max_results=1)  # fmt: skip
                    if found:
                        self._trial_runs[trial] = found[0].info.run_id
                        self.mlflow_util._get_client().update_run(found[0].info.run_id, "RUNNING")
                super().log_trial_start(trial)
                self.mlflow_util._get_client().set_tag(
                    self._trial_runs[trial], TRIAL, trial.trial_id
                )

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        figures = {k: v for k, v in result.items() if k.startswith(("val_", "test_"))}
        if self.on:
            with self._guard():
                self.mlflow_util.log_metrics(run_id=self._trial_runs[trial],
                                             metrics_to_log=figures, step=result["step"])  # fmt: skip

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if self.on:
            with self._guard():
                super().log_trial_end(trial, failed)
