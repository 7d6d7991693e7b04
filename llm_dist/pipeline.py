"""Runs the stages a spec names, in order, recording each one in the run manifest."""

from llm_dist.run_folder import RunFolder
from llm_dist.tracking.tracker import start as start_tracking


def run_stage(spec, stage: str, run: str, resume: bool = False, keep_serving: bool = False,
              tracker=None):  # fmt: skip
    """Run one stage of `spec` in the run folder `run`; returns its record (`llm_dist.records`).

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
        keep_serving: bool = False, wait: bool = False) -> str:  # fmt: skip
    """Run `stages` (default: the spec's own list); returns the run folder.

    The run folder is held while they run (`lock.hold`): a UserError naming the holder when
    another process has it, unless `wait`, which waits for it to let go.
    """
    from llm_dist.lock import hold

    with hold(RunFolder.of(spec).uri, wait):
        return _run(spec, stages, resume, keep_serving)


def _run(spec, stages: list[str] | None, resume: bool, keep_serving: bool) -> str:
    """`run`, with the run folder held.

    Before anything is written, the results these stages would reuse are checked to be made
    from this spec (`reuse.check_run`). On a cluster that no autoscaler grows, the workers of
    training stages not yet done are checked to fit before any stage runs: the stages ahead of
    them (data) may take hours.
    """
    from llm_dist.reuse import check_run

    folder = RunFolder.of(spec)
    stages = stages or spec.stages
    fingerprint = None
    if "pretrain" in stages:  # what pretraining would be made from now
        from llm_dist.data.prepare import current_fingerprint

        fingerprint = current_fingerprint(spec)
    check_run(spec, folder, stages, resume, fingerprint)
    folder.start(spec)
    if {"pretrain", "tune"} & set(stages[1:]) and spec.cluster.address:
        from llm_dist.cluster import autoscaling, connect

        connect(spec)
        if not autoscaling(spec):
            if "pretrain" in stages and folder.pretrain.read_result() is None:
                from llm_dist.train.run import ensure_workers_fit

                ensure_workers_fit(spec)
            if "tune" in stages and folder.read_winner() is None:
                from llm_dist.tune.run import ensure_trials_fit

                ensure_trials_fit(spec)
    tracker = start_tracking(spec, folder.uri)
    for stage in stages:
        folder.update_stage(stage, "running")
        try:
            if tracker:
                tracker.start_stage(stage)
            outputs = run_stage(spec, stage, folder.uri, resume, keep_serving, tracker)
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            folder.update_stage(stage, "interrupted" if interrupted else "failed",
                                error=f"{type(e).__name__}: {e}")  # fmt: skip
            if tracker:
                tracker.end_stage(stage, "KILLED" if interrupted else "FAILED", None)
                tracker.finish("KILLED" if interrupted else "FAILED")
            raise
        folder.update_stage(stage, "succeeded", outputs=outputs)
        if tracker:
            tracker.end_stage(stage, "FINISHED", outputs)
    if tracker:
        tracker.finish("FINISHED")
    return folder.uri
