"""The sweep's live display: trials running, finished, stopped and failed, with the best so far.

A line for every trial that ends; on a terminal, also a status line that follows the sweep.
Tune's own trial tables go to the run's log file (see `llm_dist.console`).
"""

import os
from pathlib import Path

from ray import tune

from llm_dist.console import console


class SweepDisplay(tune.Callback):
    """Follows the sweep from Tune's driver-side events; `show` replaces the status line's text."""

    def __init__(self, metric: str, mode: str, max_steps: int):
        self.metric, self.mode, self.max_steps = metric, mode, max_steps
        self.counts = {"finished": 0, "stopped early": 0, "failed": 0}
        self.running: set[str] = set()  # a trial PBT restarts is still the same running trial
        self.best: tuple[str, float] | None = None
        self.show = None

    def __getstate__(self):  # Tune saves its callbacks with the sweep; a live display stays here
        return {**self.__dict__, "show": None}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._exploited(trial, {t.trial_id: t for t in trials})
        self._update()

    def _exploited(self, trial, trials: dict) -> None:
        """A line for a trial PBT restarts from another trial's checkpoint."""
        from llm_dist.tune.trial import read_pointer

        pointer = read_pointer(trial.checkpoint)
        if pointer is None or pointer["trial_id"] == trial.trial_id:
            return
        donor = trials.get(pointer["trial_id"])
        changes = ", ".join(
            f"{k} {_short(donor.config.get(k) if donor else None)} -> {_short(v)}"
            for k, v in trial.config.items()
        )  # fmt: skip
        console.print(f"tune: trial {trial.trial_id} exploits trial {pointer['trial_id']}: goes "
                      f"on from its checkpoint at step {pointer['step']} with {changes}")  # fmt: skip

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, int | float) and (
            self.best is None or (value < self.best[1]) == (self.mode == "min")
        ):
            self.best = (trial.trial_id, value)
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        # a trial's final report reaches Tune with its completion, not as a result event
        self.on_trial_result(iteration, trials, trial, trial.last_result or {})
        step = (trial.last_result or {}).get("step") or 0
        how = "finished" if step >= self.max_steps else "stopped early"
        self._end(trial, how, step, trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        self._end(trial, "failed", result.get("step") or 0, result)
        path = trial.error_file  # Tune writes it before it calls back; errors reach the console
        text = Path(path).read_text() if path and os.path.exists(path) else ""
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            console.print(f"  {lines[-1][:300]} (the whole traceback: {path})")

    def _end(self, trial, how: str, step: int, result: dict) -> None:
        self.running.discard(trial.trial_id)
        self.counts[how] += 1
        value = result.get(self.metric)
        figure = f": {self.metric} {value:.4f}" if isinstance(value, int | float) else ""
        console.print(
            f"tune: trial {trial.trial_id} {how} at step {step}{figure}; {self._summary()}"
        )
        self._update()

    def _summary(self) -> str:
        counts = " · ".join(f"{n} {what}" for what, n in
                            {"running": len(self.running), **self.counts}.items())  # fmt: skip
        best = f"; best {self.best[0]} {self.metric} {self.best[1]:.4f}" if self.best else ""
        return counts + best

    def _update(self) -> None:
        if self.show is not None:
            self.show(f"tune: {self._summary()}")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
