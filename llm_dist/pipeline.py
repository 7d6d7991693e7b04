"""Runs the stages a spec names, in order, recording each one in the run manifest."""

from llm_dist.manifest import read_json, start_run, update_stage
from llm_dist.tracking import start as start_tracking


def run_stage(spec, stage: str, run: str, resume: bool = False, keep_serving: bool = False,
              tracker=None) -> dict:  # fmt: skip
    """Run one stage of `spec` in the run folder `run`; returns its outputs for the manifest.

    `resume` continues an interrupted tune sweep; `keep_serving` keeps the served model up;
    `tracker` (a `tracking.Tracker`) gets pretraining's rows, the trials' runs and the served
    endpoint as they come.
    """
    if stage == "data":
        from llm_dist.data.prepare import run_stage as data_stage

        return data_stage(spec, run)
    if stage == "pretrain":
        from llm_dist.train.run import run_stage as pretrain_stage

        return pretrain_stage(spec, run, tracker)
    if stage == "tune":
        from llm_dist.tune.run import run_stage as tune_stage

        return tune_stage(spec, run, resume, tracker)
    if stage == "serve":
        from llm_dist.serve.run import run_stage as serve_stage

        return serve_stage(spec, run, keep_serving, tracker)
    raise ValueError(f"unknown stage {stage!r}")  # the spec allows only the four above


def run(spec, stages: list[str] | None = None, resume: bool = False,
        keep_serving: bool = False) -> str:  # fmt: skip
    """Run `stages` (default: the spec's own list); returns the run folder.

    On a cluster that no autoscaler grows, the workers of training stages not yet done are
    checked to fit before any stage runs: the stages ahead of them (data) may take hours.
    """
    folder = start_run(spec)
    stages = stages or spec.stages
    if {"pretrain", "tune"} & set(stages[1:]) and spec.cluster.address:
        from llm_dist.cluster import autoscaling, connect

        connect(spec)
        if not autoscaling(spec):
            if "pretrain" in stages and read_json(f"{folder}/pretrain", "result.json") is None:
                from llm_dist.train.run import ensure_workers_fit

                ensure_workers_fit(spec)
            if "tune" in stages and read_json(folder, "winner.json") is None:
                from llm_dist.tune.run import ensure_trials_fit

                ensure_trials_fit(spec)
    tracker = start_tracking(spec, folder)
    for stage in stages:
        update_stage(folder, stage, "running")
        try:
            if tracker:
                tracker.start_stage(stage)
            outputs = run_stage(spec, stage, folder, resume, keep_serving, tracker)
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            update_stage(folder, stage, "interrupted" if interrupted else "failed",
                         error=f"{type(e).__name__}: {e}")  # fmt: skip
            if tracker:
                tracker.end_stage(stage, "KILLED" if interrupted else "FAILED", None)
                tracker.finish("KILLED" if interrupted else "FAILED")
            raise
        update_stage(folder, stage, "succeeded", outputs=outputs)
        if tracker:
            tracker.end_stage(stage, "FINISHED", outputs)
    if tracker:
        tracker.finish("FINISHED")
    return folder
