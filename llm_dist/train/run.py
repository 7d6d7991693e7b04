"""The pretrain stage on the driver: a Ray Train TorchTrainer over the worker loop, a live display.

What the workers produce lands in `<run>/pretrain/`: checkpoints/, export/, metrics.jsonl,
tensorboard/, ledger/ and result.json (read back here for the manifest).
"""

import threading
import time

from llm_dist.base import UserError
from llm_dist.console import VERBOSE, console
from llm_dist.records import MetricsRow, Origin, TrainResult
from llm_dist.run_folder import RunFolder, TrainFolder


def run_stage(spec, run: str, tracker=None) -> TrainResult:
    """Pretrain (or resume pretraining) the spec's model; returns its result.

    A finished result is reused when it was made from this spec's settings and data and has
    trained `pretrain.max_steps`; a higher max_steps continues from its last checkpoint; other
    settings are refused (`llm_dist.reuse`). Every metrics row the workers write reaches the
    live display, and `tracker` when given.
    """
    from ray.util.queue import Queue

    from llm_dist.cluster import connect
    from llm_dist.data.prepare import current_fingerprint, prepare
    from llm_dist.reuse import check, check_pretrain, pretrain_origin
    from llm_dist.train.checkpoint import committed

    p, folder = spec.pretrain, RunFolder(run).pretrain
    done = folder.read_result()
    if done is not None and done.step >= p.max_steps:
        check_pretrain(spec, done, folder.result, current_fingerprint(spec))
        console.print(f"pretrain: reused {folder.result} (step {done.step} of max_steps "
                      f"{p.max_steps}, made from this spec's data, model and pretrain settings)")  # fmt: skip
        _report(done)
        return done
    connect(spec)
    ensure_workers_fit(spec)
    data = prepare(spec)  # the data stage's output, or made now when missing
    origin = pretrain_origin(spec, data.fingerprint)
    if done is not None:
        check("the pretraining result", done.origin, origin, folder.result)
    for split, least in (("train", p.num_workers), ("val", p.num_workers), ("test", 1)):
        if data.sequences[split] < least:
            fix = "lower data.seq_len" if split == "train" else f"raise data.{split}_fraction"
            raise UserError(
                f"data: the {split} split has {data.sequences[split]} sequences of "
                f"{spec.data.seq_len + 1} tokens; pretraining needs at least {least}: add "
                f"text or {fix}"
            )
    for checkpoint, meta in committed(folder.checkpoints):
        recorded = Origin.model_validate(meta["origin"]) if meta.get("origin") else None
        check("the checkpoint", recorded, origin, checkpoint)
        if meta["world_size"] != p.num_workers:
            raise UserError(
                f"pretrain.num_workers: the run's checkpoint {checkpoint} was written by "
                f"{meta['world_size']} workers and this run has {p.num_workers}; DeepSpeed's "
                f"ZeRO shards resume only on the same number of workers: set "
                f"pretrain.num_workers: {meta['world_size']}, or start afresh under a new name"
            )
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = make_trainer(spec, folder.uri, data.prepared, queue=queue, origin=origin)
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    fit.start()
    try:
        _follow(fit, queue, p.max_steps, tracker)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; the CLI then shuts Ray down
        console.print(f"pretrain: interrupted; run the same spec again to resume from its "
                      f"newest checkpoint in {folder.checkpoints}")  # fmt: skip
        raise
    fit.join()
    if isinstance(outcome["result"], BaseException):
        raise outcome["result"]
    result = folder.read_result()
    _report(result)
    return result


def ensure_workers_fit(spec) -> None:
    """`pretrain.num_workers` fit the cluster beside a CPU for Ray Data, or a UserError now."""
    from llm_dist.cluster import DATA_CPUS, ensure_room, worker_resources

    ensure_room(spec, "pretrain.num_workers", worker_resources(spec), spec.pretrain.num_workers,
                spec.cluster.placement_strategy, spare=DATA_CPUS)  # fmt: skip


def make_trainer(spec, out: str, prepared: str, queue=None, finetuning=None, callbacks=(),
                 origin: Origin | None = None, exploit=None):  # fmt: skip
    """A TorchTrainer running the worker loop on `spec.pretrain`'s settings, its outputs in the
    TrainFolder `out`; `origin`, what pretraining is made from, goes into its checkpoints and
    result.

    The pretrain stage makes one; each fine-tuning trial makes its own, with its `finetuning`
    (a `FineTuning`: the method and its settings), `callbacks` that pass its reports to Tune,
    and under PBT the `exploit` (`records.Exploit`) whose checkpoint it starts from.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from llm_dist.cluster import worker_resources
    from llm_dist.train.checkpoint import on_disk
    from llm_dist.train.config import LoopConfig
    from llm_dist.train.faults import injected_kill, injected_nans
    from llm_dist.train.loop import train_loop

    p, resources = spec.pretrain, worker_resources(spec)
    gpu = "GPU" in resources  # worker_resources asks for GPUs exactly when they are used
    config = LoopConfig(spec, out, prepared, queue, finetuning, injected_nans(), origin,
                        launched=time.time(), exploit=exploit,
                        kill_at_commit=injected_kill())  # fmt: skip
    return TorchTrainer(
        train_loop,
        train_loop_config={"loop": config},  # Ray Train hands the workers a dict
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=p.num_workers, use_gpu=gpu, resources_per_worker=resources,
            accelerator_type=spec.cluster.accelerator_type if gpu else None,
            placement_strategy=spec.cluster.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=TrainFolder.CHECKPOINTS, storage_path=out, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            # Ray Train deletes the oldest checkpoint when it registers a new one, before rank
            # 0 commits the new one's manifest: one more than kept, so that at every moment
            # keep_checkpoints whole ones exist (a worker lost in that window resumes from one)
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=on_disk(p)),
        ),
    )  # fmt: skip


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as e:  # handed to the main thread, which raises it
        return e


def _follow(fit: threading.Thread, queue, total: int, tracker) -> None:
    """The live display: a progress bar with loss, tokens/s, MFU and ETA on a terminal; where the
    console is a file or a job's log, a line per tenth of the run. Evaluations and bad steps
    always get a line; under `--verbose` every row does."""
    from queue import Empty

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())  # fmt: skip
    every, next_line = max(1, total // 10), 0
    # the workers' output, which Ray prints through sys.stdout, stays where `capture` sends it
    with Progress(*columns, console=console, redirect_stdout=False, redirect_stderr=False,
                  disable=VERBOSE.is_set()) as progress:  # fmt: skip
        task = progress.add_task("pretrain", total=total, info="starting workers")
        while fit.is_alive() or not queue.empty():
            try:
                row = queue.get(timeout=0.5)
            except Empty:
                continue
            if tracker:
                tracker.log_row("pretrain", row)
            train = row.kind == "train"
            # a resume and a torn checkpoint passed over are always said, as evaluations are
            show = VERBOSE.is_set() or row.kind in ("eval", "test") or row.event in ALWAYS_SAID
            if train and not console.is_terminal and row.step >= next_line:
                show, next_line = True, row.step + every
            if show:
                progress.console.print(_line(row), soft_wrap=True)
            if train:
                info = f"loss {row.loss:.3f} · {row.tokens_per_s:,.0f} tok/s · MFU {row.mfu:.1%}"
                progress.update(task, completed=row.step, info=info)


ALWAYS_SAID = ("bad_step", "resumed", "checkpoint_skipped")


def _line(row: MetricsRow) -> str:
    kind, step = row.kind, row.step
    if kind == "train":
        return (f"step {step}/{row.max_steps}  loss {row.loss:.4f}  lr {row.lr:.2e}  "
                f"grad norm {row.grad_norm or 0:.3f}  {row.tokens_per_s:,.0f} tok/s "
                f"({row.tokens_per_s_per_worker:,.0f}/worker)  MFU {row.mfu:.2%}  "
                f"data wait {row.data_wait:.1%}  peak mem {row.peak_memory_gb:.2f} GB")  # fmt: skip
    if kind == "eval":
        return f"step {step}  val loss {row.val_loss:.4f}  ppl {row.val_ppl:.2f}"
    if kind == "test":
        return f"step {step}  test loss {row.test_loss:.4f}  ppl {row.test_ppl:.2f}"
    if row.event == "bad_step":
        return f"step {step}: NaN/inf loss or gradient, step skipped ({row.in_a_row} in a row)"
    if row.event == "resumed":
        return f"pretrain: resumed at step {step} from the checkpoint {row.checkpoint}"
    if row.event == "checkpoint_skipped":
        return (f"pretrain: the checkpoint {row.checkpoint} is not whole ({row.reason}); "
                "falling back to the one before it")  # fmt: skip
    if row.phases is not None:  # started, finished: where the time went (under --verbose)
        spent = ", ".join(f"{k} {v:.1f} s" for k, v in row.phases.items())
        return f"pretrain: {row.event} at step {step} ({spent})"
    return f"{row.event} at step {step}: {row.checkpoint or ''}"


def _report(result: TrainResult) -> None:
    start, val = result.val_loss_at_start, result.val["val_loss"]
    console.print(
        f"pretrain: {result.step} steps, {result.tokens:,} tokens, {result.bad_steps} bad steps "
        f"skipped; val loss {'' if start is None else f'{start:.3f} -> '}{val:.3f}; test loss "
        f"{result.test_loss:.3f} (ppl {result.test_ppl:.1f}); export: {result.export}"
    )
    for sample in result.samples:
        console.print(f"  [bold]{sample.prompt!r}[/bold] -> {sample.completion!r}")
