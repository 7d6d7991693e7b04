"""Population Based Training over the sweep's trials (`tune.scheduler: pbt`).

Ray Tune's PBT decides every `tune.perturbation_interval` steps: a trial in the bottom quarter
by `tune.metric` is paused and restarted with a top trial's config, its searched settings
perturbed (x0.8 or x1.2, or one time in four drawn again from the search space), and
that trial's latest checkpoint (`llm_dist.tune.trial.adopt`). Only the optimizer's settings may
be searched (`tune.config.MUTABLE`, checked with the spec). Each exploit is an `exploited`
event in the clone's metrics.jsonl; the winner's lineage lists those its weights came through.
"""

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from llm_dist.records import Exploit
from llm_dist.run_folder import RunFolder


class _FinalReportsStay(PopulationBasedTraining):
    """PBT that leaves a trial's final report alone: the trial has trained its budget and
    written its export, and a clone made then would only redo its end."""

    def __init__(self, max_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.max_steps = max_steps

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("step", 0) >= self.max_steps:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def scheduler(t) -> PopulationBasedTraining:
    """Ray Tune's PBT for the spec's `tune` section, in optimizer steps (each report's `step`)."""
    from ray import tune

    # every searched setting is a number: perturbed by a factor, or drawn again from its
    # values (grid, choice) or range one time in four
    mutations = {
        name: _Draw(args) if kind in ("grid", "choice") else getattr(tune, kind)(*args)
        for name, dim in t.search_space.items() for kind, args in dim.items()
    }  # fmt: skip
    return _FinalReportsStay(
        t.max_steps, time_attr="step", metric=t.metric, mode=t.mode,
        perturbation_interval=t.perturbation_interval or t.eval_every,
        hyperparam_mutations=mutations, quantile_fraction=0.25, resample_probability=0.25,
        log_config=False,
    )  # fmt: skip


class _Draw:
    """A grid's or choice's values as PBT's resampling function (a list would be perturbed by
    stepping to a neighbouring value, which at either end of a short grid is no change)."""

    def __init__(self, values: list):
        self.values = values

    def __call__(self):
        import random

        return random.choice(self.values)


def chain(folder: RunFolder, trial_id: str, before: float = float("inf")) -> list[Exploit]:
    """The exploits a trial's final weights came through, earliest first: its last exploit
    (written before `before`, a time), and before it those of the donor up to the checkpoint
    taken from it. Empty for a trial that never took another's checkpoint."""
    from llm_dist.train.checkpoint import written

    taken = [r for r in folder.trial(trial_id).read_metrics()
             if r.event == "exploited" and r.exploit is not None and r.time < before]  # fmt: skip
    if not taken:
        return []
    last = taken[-1].exploit
    return [*chain(folder, last.donor, written(last.source)[0]), last]
