"""What the sweep's schedulers decide on: ASHA a trial's best evaluation so far, PBT the last."""

import math

from llm_dist.spec import JobSpec

TUNE = {"base_model": "/b", "task": {"sources": ["task.jsonl"]}}


def test_a_trials_reports_carry_its_best_evaluation_so_far():
    from llm_dist.tune.trial import BestSoFar

    lower = BestSoFar("val_loss", "min")
    seen = [lower.add({"step": s, "val_loss": v}) for s, v in
            ((10, 5.0), (20, 4.0), (30, 6.5), (40, math.nan), (50, 4.5))]  # fmt: skip
    assert [r.get("best_val_loss") for r in seen] == [5.0, 4.0, 4.0, 4.0, 4.0]
    assert math.isnan(seen[3]["val_loss"])  # the report itself is left as it was
    higher = BestSoFar("val_accuracy", "max")
    # a report without the metric (none before the first evaluation) gets no best either
    assert higher.add({"step": 0}) == {"step": 0}
    seen = [higher.add({"val_accuracy": v}) for v in (0.4, 0.7, 0.1)]  # one collapsed evaluation
    assert [r["best_val_accuracy"] for r in seen] == [0.4, 0.7, 0.7]


def test_asha_decides_on_the_best_so_far_and_pbt_on_the_last():
    from llm_dist.tune.run import _scheduler

    spec = JobSpec(name="s", stages=["tune"], tune={**TUNE, "metric": "val_accuracy",
                   "task": {"sources": ["t.jsonl"], "format": "classify"},
                   "search_space": {"lr": {"grid": [1e-4, 1e-3]}}})  # fmt: skip
    asha = _scheduler(spec.tune)
    assert (asha._metric, asha._mode) == ("best_val_accuracy", "max")
    spec = JobSpec(name="s", stages=["tune"], tune={**TUNE, "scheduler": "pbt", "search_space": {
        "lr": {"grid": [1e-4, 1e-3]}}})  # fmt: skip
    pbt = _scheduler(spec.tune)
    assert (pbt._metric, pbt._mode, pbt._perturbation_interval) == ("val_loss", "min", 20)
