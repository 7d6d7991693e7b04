"""The sweep's outcome: the results table, the winner by validation metric, its one test figure.

The winner is the best trial that trained to the end (trials ASHA stopped have no export) by
the validation metric. Only then is the test split used: once for the winner's export and once
for the un-tuned base, both in Ray tasks, so the two figures compare like with like: the loss
and every task metric, each with the lift (winner minus base) and its 95% paired bootstrap
interval over the test records (`llm_dist.finetune.scores.lift`).
"""

import math
import os
import time

from llm_dist.base import UserError
from llm_dist.finetune import evaluate
from llm_dist.finetune.scores import lift
from llm_dist.manifest import filesystem, read_json, read_manifest, write_json


def pick_winner(spec, run: str, results, base: str, task: dict, seconds: float) -> dict:
    """Table every trial, score the winner and the base on test, write winner.json and a CSV.

    `seconds`: the sweep's wall time (this attempt's, when it was resumed).
    """
    import ray

    from llm_dist.cluster import use_gpu

    t = spec.tune
    # the ranking metric first, then the loss and the task metrics beside it
    columns = [t.metric, *(m for m in ("val_loss", *(f"val_{m}" for m in t.task.metrics)) if m != t.metric)]  # fmt: skip
    rows = []
    for result in results:
        trial_id = os.path.basename(result.path)
        out = f"{run}/tune/trials/{trial_id}"
        done = read_json(out, "result.json")
        status = "failed" if result.error else "finished" if done else "stopped early"
        metrics = done or result.metrics or {}
        rows.append({"trial_id": trial_id,
                     **{k: result.config.get(k) for k in t.search_space},
                     **{m: metrics.get(m) for m in columns}, "step": metrics.get("step"),
                     "status": status, "seconds": (result.metrics or {}).get("time_total_s"),
                     "error": _first_line(result.error), "out": out, "result": done})  # fmt: skip
    finished = [r for r in rows if r["status"] == "finished" and r[t.metric] is not None]
    if not finished:
        failed = [r for r in rows if r["status"] == "failed"]
        raise UserError(
            f"tune: none of the {len(rows)} trials finished ({len(failed)} failed"
            + (f"; the first error: {failed[0]['error']}" if failed else "")
            + f"); each trial's log is under {run}/tune/sweep/"
        )
    sign = 1 if t.mode == "min" else -1
    best = min(finished, key=lambda r: sign * r[t.metric])
    start, gpus = time.perf_counter(), 1 if use_gpu(spec) else 0
    answers = evaluate.task_of(spec, task["prepared"])
    score = ray.remote(num_cpus=1, num_gpus=gpus)(test_outcome)
    ours, theirs = ray.get([
        score.remote(f"{best['out']}/export", task["prepared"], t.micro_batch_size, answers),
        score.remote(base, task["prepared"], t.micro_batch_size, answers),
    ])  # fmt: skip
    test = {m: lift(m, ours, theirs, spec.pretrain.seed)
            for m in ["loss", *(answers.metrics if answers else [])]}  # fmt: skip
    winner_test, base_test = test["loss"]["winner"], test["loss"]["base"]
    for r in rows:
        r |= {f"test_{m}": v["winner"] if r is best else None for m, v in test.items()}
    base_row = {"trial_id": "base", "status": "base (un-tuned)", "out": base,
                **{f"test_{m}": v["base"] for m, v in test.items()}}  # fmt: skip
    _save_csv([*rows, base_row], f"{run}/tune", "results.csv")
    trial_result = best["result"]
    winner = {
        "trial_id": best["trial_id"], "metric": t.metric, "mode": t.mode,
        "value": best[t.metric], "test_loss": winner_test,
        "test_perplexity": math.exp(winner_test), "base_test_loss": base_test,
        "base_test_perplexity": math.exp(base_test),
        "test": test, "test_records": len(ours["targets"]),
        "config": {**{k: getattr(t, k) for k in ("method", "lr", "weight_decay",
                   "warmup_steps", "micro_batch_size", "lora_r", "lora_alpha", "lora_dropout",
                   "freeze_layers")}, **{k: best[k] for k in t.search_space}},
        "export": trial_result["export"], "trial_folder": best["out"],
        "samples": trial_result["samples"],
        "trials": {s: sum(r["status"] == s for r in rows)
                   for s in ("finished", "stopped early", "failed")},
        "results": f"{run}/tune/results.csv",
        # what the trials trained and were scored on, and what was left out (and why)
        "task_data": {k: task.get(k) for k in ("records", "sequences", "unusable")},
        "sweep_seconds": round(seconds, 1),
        "scoring_seconds": round(time.perf_counter() - start, 1),
        "lineage": _lineage(spec, run, base, task),
    }  # fmt: skip
    write_json(run, "winner.json", winner)
    _print(rows, t, winner)
    return winner


def test_outcome(folder: str, prepared: str, batch_size: int, answers) -> dict:
    """The HF model in `folder` on every record of a prepared split `test`, in order: per-record
    `loss_sum` (nats) and `targets` (tokens), and with `answers` (an `evaluate.TaskEval`) its
    answers for the task metrics (`evaluate.outcome`)."""
    import pyarrow.dataset as pds
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_dist.manifest import local_folder
    from llm_dist.train.loop import loss_sum_of

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = local_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    model = model.to(device).eval()
    filesys, path = filesystem(f"{prepared}/test")
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


def _lineage(spec, run: str, base: str, task: dict) -> dict:
    """Where the winner came from: the base model (and, for this run's export, its data)."""
    lineage = {"base_model": base, "task_sources": spec.tune.task.sources,
               "task_prepared": task["prepared"]}  # fmt: skip
    if not spec.tune.base_model:
        stages = (read_manifest(run) or {}).get("stages", {})
        pretrain = stages.get("pretrain", {}).get("outputs") or read_json(
            f"{run}/pretrain", "result.json"
        )
        lineage["pretrain"] = {"result": f"{run}/pretrain/result.json",
                               "step": pretrain.get("step"), "tokens": pretrain.get("tokens"),
                               "test_loss": pretrain.get("test_loss")}  # fmt: skip
        data = stages.get("data", {}).get("outputs") or {}
        lineage["data_prepared"] = data.get("prepared")
    return lineage


def _save_csv(rows: list[dict], folder: str, name: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    table = pa.Table.from_pylist(
        [{k: v for k, v in r.items() if k not in ("out", "result")} for r in rows]
    )
    filesys, path = filesystem(folder)
    filesys.create_dir(path, recursive=True)
    with filesys.open_output_stream(f"{path}/{name}") as f:
        pcsv.write_csv(table, f)


def _first_line(error) -> str | None:
    if error is None:
        return None
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _print(rows: list[dict], t, winner: dict) -> None:
    from rich.table import Table

    from llm_dist.console import console

    table = Table(title=f"tune: {len(rows)} trials, ranked by {t.metric} ({t.mode})")
    validation = [k for k in rows[0] if k.startswith("val_")]  # the ranking metric first
    for column in ("trial", *t.search_space, *validation, "step", "status", "time", "test loss"):
        table.add_column(
            column, justify="left" if column in ("trial", "status") else "right", no_wrap=True
        )
    for r in rows:
        seconds = r["seconds"]
        table.add_row(
            r["trial_id"], *(str(r[k]) for k in t.search_space),
            *("" if r[k] is None else f"{r[k]:.4f}" for k in validation), str(r["step"] or ""),
            r["status"] + (" (winner)" if r["trial_id"] == winner["trial_id"] else ""),
            "" if seconds is None else f"{seconds:.0f}s",
            "" if r["test_loss"] is None else f"{r['test_loss']:.4f}",
        )  # fmt: skip
    scores = Table(title=f"test split ({winner['test_records']:,} records): the winner against "
                         "the un-tuned base, once each")  # fmt: skip
    for column in ("metric", "base", "winner", "lift", "95% interval"):
        scores.add_column(column, justify="left" if column == "metric" else "right")
    for metric, v in winner["test"].items():
        scores.add_row(metric + (" (lower is better)" if metric == "loss" else ""),
                       f"{v['base']:.4f}", f"{v['winner']:.4f}", f"{v['lift']:+.4f}",
                       "" if v["low"] is None else f"[{v['low']:+.4f}, {v['high']:+.4f}]")  # fmt: skip
    out = console
    if not console.is_terminal:  # a log file: no 80-column squeeze of the table
        from rich.console import Console

        out = Console(file=console.file, width=160)
    out.print(table)
    out.print(scores)
    console.print(f"winner {winner['trial_id']}: {t.metric} {winner['value']:.4f}; "
                  f"export: {winner['export']}")  # fmt: skip
