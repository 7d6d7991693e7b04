"""The sweep's outcome: the results table, the winner by validation metric, its one test figure.

The winner is the best trial that trained to the end (trials ASHA stopped have no export) by
the validation metric. Only then is the test split used: once for the winner's export and once
for the un-tuned base, both in Ray tasks, so the two figures compare like with like: the loss
and every task metric, each with the lift (winner minus base) and its 95% paired bootstrap
interval over the test records (`llm_dist.finetune.scores.lift`).
"""

import time

from llm_dist.base import UserError
from llm_dist.finetune import evaluate
from llm_dist.finetune.scores import lift
from llm_dist.records import (
    Lift,
    Lineage,
    Origin,
    PretrainLineage,
    TaskCounts,
    TaskData,
    TrainResult,
    TrialRow,
    Winner,
)
from llm_dist.run_folder import RunFolder, prepared_folder
from llm_dist.storage import filesystem

SETTINGS = ("method", "lr", "weight_decay", "warmup_steps", "micro_batch_size", "lora_r",
            "lora_alpha", "lora_dropout", "freeze_layers")  # what a trial trains with  # fmt: skip


def pick_winner(spec, run: str, results, base: str, base_result: TrainResult | None,
                task: TaskData, seconds: float, origin: Origin) -> Winner:  # fmt: skip
    """Table every trial, score the winner and the base on test, write winner.json and the
    results table; `base_result` is the base's pretraining result when it is this run's export,
    `origin` what the sweep was made from, `seconds` the sweep's wall time (this attempt's, when
    it was resumed)."""
    import os

    import ray

    from llm_dist.cluster import use_gpu

    t, folder = spec.tune, RunFolder(run)
    # the ranking metric first, then the loss and the task metrics beside it
    columns = [t.metric, *(m for m in ("val_loss", *(f"val_{m}" for m in t.task.metrics)) if m != t.metric)]  # fmt: skip
    rows, results_of = [], {}
    for result in results:
        trial_id = os.path.basename(result.path)
        done = folder.trial(trial_id).read_result()
        status = "failed" if result.error else "finished" if done else "stopped early"
        metrics = done.val | {"step": done.step} if done else result.metrics or {}
        rows.append(TrialRow(
            trial_id=trial_id, status=status, settings={k: result.config.get(k) for k in t.search_space},
            val={m: metrics.get(m) for m in columns}, step=metrics.get("step"),
            seconds=(result.metrics or {}).get("time_total_s"), error=_last_line(result.error),
        ))  # fmt: skip
        results_of[trial_id] = done
    finished = [r for r in rows if r.status == "finished" and r.val[t.metric] is not None]
    if not finished:
        failed = [r for r in rows if r.status == "failed"]
        raise UserError(
            f"tune: none of the {len(rows)} trials finished ({len(failed)} failed"
            + (f"; the first error: {failed[0].error}" if failed else "")
            + f"); each trial's log is under {folder.sweep}/"
        )
    sign = 1 if t.mode == "min" else -1
    best = min(finished, key=lambda r: sign * r.val[t.metric])
    trained = results_of[best.trial_id]
    start, gpus = time.perf_counter(), 1 if use_gpu(spec) else 0
    answers = evaluate.task_of(spec, task.prepared)
    score = ray.remote(num_cpus=1, num_gpus=gpus)(outcome_on_test)
    ours, theirs = ray.get([
        score.remote(trained.export, task.prepared, t.micro_batch_size, answers),
        score.remote(base, task.prepared, t.micro_batch_size, answers),
    ])  # fmt: skip
    test = {m: Lift(**lift(m, ours, theirs, spec.pretrain.seed))
            for m in ["loss", *(answers.metrics if answers else [])]}  # fmt: skip
    best.test = {m: v.winner for m, v in test.items()}
    base_row = TrialRow(trial_id="base", status="base (un-tuned)",
                        test={m: v.base for m, v in test.items()})  # fmt: skip
    folder.write_results([*rows, base_row])
    winner = Winner(
        trial_id=best.trial_id, metric=t.metric, mode=t.mode, value=best.val[t.metric],
        test=test, test_records=len(ours["targets"]),
        config={**{k: getattr(t, k) for k in SETTINGS}, **best.settings},
        export=trained.export, trial_folder=folder.trial(best.trial_id).uri,
        samples=trained.samples,
        trials={s: sum(r.status == s for r in rows) for s in ("finished", "stopped early", "failed")},
        # what the trials trained and were scored on, and what was left out (and why)
        task_data=TaskCounts.model_validate(task, from_attributes=True),
        sweep_seconds=round(seconds, 1), scoring_seconds=round(time.perf_counter() - start, 1),
        lineage=_lineage(spec, folder, base, base_result, task, best.trial_id), origin=origin,
    )  # fmt: skip
    folder.write_winner(winner)
    _print(rows, t, winner)
    return winner


def outcome_on_test(folder: str, prepared: str, batch_size: int, answers) -> dict:
    """The HF model in `folder` on every record of a prepared split `test`, in order: per-record
    `loss_sum` (nats) and `targets` (tokens), and with `answers` (an `evaluate.TaskEval`) its
    answers for the task metrics (`evaluate.outcome`)."""
    import pyarrow.dataset as pds
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_dist.run_folder import PreparedFolder
    from llm_dist.storage import local_folder
    from llm_dist.train.losses import loss_sum_of

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = local_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    model = model.to(device).eval()
    filesys, path = filesystem(PreparedFolder(prepared).split("test"))
    table = pds.dataset(path, filesystem=filesys, format="parquet").to_table()
    width = table.schema.field("tokens").type.list_size
    batches = [{name: torch.from_numpy(batch[name].flatten().to_numpy().reshape(-1, width).astype("int64"))
                for name in ("tokens", "mask") if name in batch.schema.names}
               for batch in table.to_batches(batch_size)]  # fmt: skip
    out = {"loss_sum": [], "targets": []}
    with torch.no_grad():
        for b in batches:
            mask = b.get("mask")
            tokens = b["tokens"].to(device)
            out["loss_sum"] += loss_sum_of(model, tokens, mask if mask is None else mask.to(device), per_row=True).tolist()  # fmt: skip
            out["targets"] += [width - 1] * len(tokens) if mask is None else mask[:, 1:].sum(1).tolist()  # fmt: skip
    if answers is not None:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        out |= evaluate.outcome(model, tokenizer, batches, answers, device)
    return out


def _lineage(spec, folder: RunFolder, base: str, base_result: TrainResult | None,
             task: TaskData, trial_id: str) -> Lineage:  # fmt: skip
    """Where the winner `trial_id` came from: the base model, the task, for this run's own
    export the pretraining and its data, and under PBT the exploits its weights came through."""
    pretrain = None
    if base_result is not None:
        fingerprint = (base_result.origin.inputs if base_result.origin else {}).get(
            "data_fingerprint"
        )
        data = prepared_folder(spec, fingerprint) if fingerprint else None
        pretrain = PretrainLineage(
            result=folder.pretrain.result, step=base_result.step, tokens=base_result.tokens,
            test_loss=base_result.test_loss, data_prepared=data and data.uri,
            data_fingerprint=fingerprint, data_tokenizer=data and data.tokenizer,
        )  # fmt: skip
    exploits = []
    if spec.tune.scheduler == "pbt":
        from llm_dist.tune.pbt import chain

        exploits = chain(folder, trial_id)
    return Lineage(base_model=base, tokenizer=task.tokenizer, task_sources=spec.tune.task.sources,
                   task_prepared=task.prepared, pretrain=pretrain, exploits=exploits)  # fmt: skip


def _last_line(error) -> str | None:
    """The last non-blank line of an error (a traceback's is the exception), cut at 300."""
    if error is None:
        return None
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _print(rows: list[TrialRow], t, winner: Winner) -> None:
    from rich.table import Table

    from llm_dist.console import console

    table = Table(title=f"tune: {len(rows)} trials, ranked by {t.metric} ({t.mode})")
    validation = list(rows[0].val)  # the ranking metric first
    for column in ("trial", *t.search_space, *validation, "step", "status", "time", "test loss"):
        table.add_column(
            column, justify="left" if column in ("trial", "status") else "right", no_wrap=True
        )
    for r in rows:
        loss = r.test.get("loss")
        table.add_row(
            r.trial_id, *(str(r.settings[k]) for k in t.search_space),
            *("" if r.val[k] is None else f"{r.val[k]:.4f}" for k in validation), str(r.step or ""),
            r.status + (" (winner)" if r.trial_id == winner.trial_id else ""),
            "" if r.seconds is None else f"{r.seconds:.0f}s", "" if loss is None else f"{loss:.4f}",
        )  # fmt: skip
    scores = Table(title=f"test split ({winner.test_records:,} records): the winner against "
                         "the un-tuned base, once each")  # fmt: skip
    for column in ("metric", "base", "winner", "lift", "95% interval"):
        scores.add_column(column, justify="left" if column == "metric" else "right")
    for metric, v in winner.test.items():
        scores.add_row(metric + (" (lower is better)" if metric == "loss" else ""),
                       f"{v.base:.4f}", f"{v.winner:.4f}", f"{v.lift:+.4f}",
                       "" if v.low is None else f"[{v.low:+.4f}, {v.high:+.4f}]")  # fmt: skip
    out = console
    if not console.is_terminal:  # a log file: no 80-column squeeze of the table
        from rich.console import Console

        out = Console(file=console.file, width=160)
    out.print(table)
    out.print(scores)
    console.print(f"winner {winner.trial_id}: {t.metric} {winner.value:.4f}; "
                  f"export: {winner.export}")  # fmt: skip
