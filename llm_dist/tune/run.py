"""The tune stage on the driver: a Ray Tune sweep whose trials are Ray Train runs of the worker loop.

Each trial is a function trainable (`llm_dist.tune.trial`) that builds the pretrain stage's
TorchTrainer on its own settings and passes the workers' reports on to Tune, so ASHA and PBT
decide on the validation figures the loop reports at every evaluation. A trial's files
live in `<run>/tune/trials/<trial id>/` (checkpoints/, metrics.jsonl, export/, result.json);
Tune's own state in `<run>/tune/sweep/`, which `llm-dist tune SPEC --resume` restores.
"""

import math
import os
import signal
import threading
import time

from ray import tune  # this module is imported only when the tune stage runs

from llm_dist.base import UserError
from llm_dist.console import console, status
from llm_dist.records import TaskCounts, TrainResult, Winner
from llm_dist.run_folder import RunFolder
from llm_dist.tune.config import TUNABLE
from llm_dist.tune.display import SweepDisplay

TRIAL_CPU = 0.01  # the trial's own process only waits on its trainer; Tune needs a nonzero ask


def run_stage(spec, run: str, resume: bool = False, tracker=None) -> Winner:
    """Run (or resume) the sweep, pick and score the winner; returns it (winner.json).

    A finished sweep is reused when it was made from this spec's tune settings and base model
    (`llm_dist.reuse`), and refused otherwise. With a `tracker` (`llm_dist.tracking.Tracker`),
    each trial is an MLflow run of its own.
    """
    from pydantic import ValidationError

    from llm_dist.cluster import connect
    from llm_dist.reuse import check, tune_origin
    from llm_dist.spec import JobSpec
    from llm_dist.storage import exists
    from llm_dist.tune.task import prepare_task
    from llm_dist.tune.trial import run_trial, trial_spec
    from llm_dist.tune.winner import pick_winner

    t, folder = spec.tune, RunFolder(run)
    base, base_result = _base_model(spec, run)
    origin = tune_origin(spec, base, base_result)
    done = folder.read_winner()
    if done is not None and not resume:
        check("the tune winner", done.origin, origin, folder.winner)
        _report_done(done, folder.winner)
        return done
    connect(spec)  # before Ray Data reads the task, which would start a default Ray
    concurrency = ensure_trials_fit(spec)
    task = prepare_task(spec, base)  # a clear error here, before any trial starts
    if t.task.format != "text":  # the data stage reports its own counts
        line = "tune.task: " + TaskCounts.model_validate(task, from_attributes=True).line()
        if task.reused:
            line += f", reused from {task.prepared}"
        if task.unusable:
            left_out = ", ".join(f"{k} {v:,}" for k, v in sorted(task.unusable.items()))
            line += f"; left out: {left_out}, listed in {task.quarantine}"
        console.print(line)
    for split, least in (("train", t.num_workers), ("val", t.num_workers), ("test", 1)):
        if task.sequences[split] < least:
            fix = "add records" + (
                "" if split == "train" else f" or raise tune.task.{split}_fraction"
            )
            raise UserError(
                f"tune.task: the {split} split has {task.sequences[split]} records; the "
                f"sweep needs at least {least} (tune.num_workers is {t.num_workers}): {fix}"
            )
    first = trial_spec(spec, {k: getattr(t, k) for k in TUNABLE}, base, task.sequences["val"])
    try:  # the cross-field checks, with the base model in place of `model`
        JobSpec.model_validate(first.model_dump(mode="json"))
    except ValidationError as e:
        problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise UserError(f"tune: with the base model {base}: {problems}") from None
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, run=run, base=base, prepared=task.prepared,
                             val_rows=task.sequences["val"]),
        {"CPU": TRIAL_CPU},
    )  # fmt: skip
    display = SweepDisplay(t.metric, t.mode, t.max_steps)
    if resume:
        if not exists(folder.sweep) or not tune.Tuner.can_restore(folder.sweep):
            raise UserError(f"tune: no sweep to resume in {folder.sweep}; run without --resume")
        check("the sweep", folder.read_sweep_origin(), origin, folder.sweep)
        tuner = tune.Tuner.restore(folder.sweep, trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)  # fmt: skip
    elif exists(folder.sweep):
        raise UserError(
            f"tune: an unfinished sweep is in {folder.sweep}; continue it with `llm-dist tune "
            "SPEC --resume`, or delete that folder to start over"
        )
    else:
        folder.write_sweep_origin(origin)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(t.search_space),
            tune_config=tune.TuneConfig(
                # each part gets its own metric: ASHA decides on the best evaluation so far
                search_alg=_searcher(t, concurrency),
                scheduler=_scheduler(t), num_samples=t.num_samples,
                # Optuna is wrapped in a ConcurrencyLimiter; random/grid takes it directly
                max_concurrent_trials=concurrency if t.search == "optuna" else None,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name=folder.sweep.rsplit("/", 1)[1], storage_path=folder.tune,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[_Completed(run), display,
                           *filter(None, [tracker and tracker.trial_callback()])],
            ),
        )  # fmt: skip
    start, ctrl_c = time.perf_counter(), signal.getsignal(signal.SIGINT)
    try:
        with status("tune: starting the trials") as display.show:
            results = tuner.fit()
    finally:  # Tune leaves its own Ctrl-C handler behind, which would swallow the next one
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, ctrl_c)
    seconds = time.perf_counter() - start
    expected = t.num_samples * math.prod(
        len(args) for dim in t.search_space.values() for kind, args in dim.items() if kind == "grid"
    )
    done_ids = folder.completed_trials()
    ended = [r for r in results if r.error or os.path.basename(r.path) in done_ids]
    if len(ended) < expected:  # Ctrl-C: Tune saved its state and ended the unfinished trials
        console.print(f"tune: the sweep was interrupted; continue it with `llm-dist tune SPEC "
                      f"--resume` (state in {folder.sweep})")  # fmt: skip
        raise KeyboardInterrupt
    return pick_winner(spec, run, results, base, base_result, task, seconds, origin)


class _Completed(tune.Callback):
    """Records in the run folder every trial that ended by itself: it finished or the scheduler
    stopped it. Trials Tune ends because the sweep was interrupted are not recorded, which tells
    an interrupted sweep from a finished one. Restored with the sweep."""

    def __init__(self, run: str):
        self.run = run

    def on_trial_complete(self, iteration, trials, trial, **info):
        RunFolder(self.run).add_completed(trial.trial_id)


def search_space(space: dict) -> dict:
    """The spec's search space in Ray Tune's terms (randint's high is excluded, as in Ray)."""
    make = {"choice": tune.choice, "grid": tune.grid_search,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}  # fmt: skip
    return {name: make[kind](args) for name, dim in space.items() for kind, args in dim.items()}


def _base_model(spec, run: str) -> tuple[str, TrainResult | None]:
    """The model folder trials start from, checked: it loads, has a tokenizer that fits it, and
    every method the sweep can draw fits its architecture; with this run's pretraining result
    when the base is its export (checked to be made from this spec)."""
    from pathlib import Path

    from llm_dist.finetune.methods import check_base
    from llm_dist.model import check_folder
    from llm_dist.reuse import check_pretrain
    from llm_dist.storage import local_folder

    result = None
    if spec.tune.base_model:
        base, field = spec.tune.base_model, "tune.base_model"
    else:
        pretrain = RunFolder(run).pretrain
        result = pretrain.read_result()
        if result is None:
            raise UserError(
                f"tune.base_model: empty, and this run has no pretrain export ({pretrain.result} "
                "is missing); run the pretrain stage first or name a model folder"
            )
        check_pretrain(spec, result, pretrain.result)
        base, field = result.export, "the pretrain export"
    check_folder(base, field)
    check_base(local_folder(base), spec.tune)
    return (base if "://" in base else str(Path(base).resolve())), result


def _searcher(t, concurrency: int):
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=t.metric, mode=t.mode, seed=t.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)


def _scheduler(t):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if t.scheduler == "fifo":
        return FIFOScheduler()
    if t.scheduler == "pbt":
        from llm_dist.tune.pbt import scheduler

        return scheduler(t)
    # Counted in optimizer steps, the `step` every report carries. ASHA compares each trial's
    # best evaluation so far (`trial.BEST`): on a small validation split one evaluation can
    # collapse and recover, and a trial stopped on it is lost for good.
    from llm_dist.tune.trial import BEST

    return ASHAScheduler(time_attr="step", metric=BEST + t.metric, mode=t.mode, max_t=t.max_steps,
                         grace_period=t.grace_period * t.eval_every,
                         reduction_factor=t.reduction_factor)  # fmt: skip


def ensure_trials_fit(spec) -> int:
    """How many trials run at once, or a UserError now when even one never can.

    One trial's workers must fit (the autoscaler adds nodes for more as Tune asks for them);
    `tune.max_concurrent_trials` of them must fit together, else as many run at once as the
    nodes hold now. Either way a CPU stays free for Ray Data, which streams the trials' data
    (trials that took every CPU would wait for it forever), beside the trials' own actors.
    """
    from llm_dist.cluster import DATA_CPUS, ensure_room, free_nodes, room, worker_resources

    t, bundle = spec.tune, worker_resources(spec)
    ensure_room(spec, "tune.num_workers", bundle, t.num_workers, spec.cluster.placement_strategy,
                spare=DATA_CPUS + TRIAL_CPU)  # fmt: skip
    if t.max_concurrent_trials:
        ensure_room(spec, "tune.max_concurrent_trials × tune.num_workers", bundle,
                    t.max_concurrent_trials * t.num_workers,
                    spare=DATA_CPUS + TRIAL_CPU * t.max_concurrent_trials)  # fmt: skip
        return t.max_concurrent_trials
    nodes = free_nodes()
    most = room(bundle, "PACK", nodes, DATA_CPUS) // t.num_workers
    return max(1, room(bundle, "PACK", nodes, DATA_CPUS + TRIAL_CPU * most) // t.num_workers)


def _report_done(winner: Winner, where: str) -> None:
    tests = "; ".join(f"test {m} {v.winner:.4f} (base {v.base:.4f})"
                      for m, v in winner.test.items())  # fmt: skip
    console.print(
        f"tune: reused {where} (made from this spec's tune settings and base model): winner "
        f"{winner.trial_id} {winner.metric} {winner.value:.4f}; {tests}; export: {winner.export}"
    )
