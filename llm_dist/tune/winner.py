"""The sweep's outcome: the results table, the winner by validation metric, its one test figure.

The winner is the best trial that trained to the end (trials ASHA stopped have no export) by
the validation metric. Only then is the test split used: once for the winner's export and once
for the un-tuned base, both in Ray tasks, so the two figures compare like with like.
"""

import math
import os
import time

from llm_dist.base import UserError
from llm_dist.manifest import filesystem, read_json, read_manifest, write_json


def pick_winner(spec, run: str, results, base: str, task: dict, seconds: float) -> dict:
    """Table every trial, score the winner and the base on test, write winner.json and a CSV.

    `seconds`: the sweep's wall time (this attempt's, when it was resumed).
    """
    import ray

    from llm_dist.cluster import use_gpu

    t = spec.tune
    rows = []
    for result in results:
        trial_id = os.path.basename(result.path)
        out = f"{run}/tune/trials/{trial_id}"
        done = read_json(out, "result.json")
        status = "failed" if result.error else "finished" if done else "stopped early"
        metrics = result.metrics or {}
        value = done[t.metric] if done else metrics.get(t.metric)
        rows.append({"trial_id": trial_id,
                     **{k: result.config.get(k) for k in t.search_space},
                     t.metric: value, "step": done["step"] if done else metrics.get("step"),
                     "status": status, "seconds": metrics.get("time_total_s"),
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
    score = ray.remote(num_cpus=1, num_gpus=gpus)(test_loss)
    winner_test, base_test = ray.get([
        score.remote(f"{best['out']}/export", task["prepared"], t.micro_batch_size),
        score.remote(base, task["prepared"], t.micro_batch_size),
    ])  # fmt: skip
    for r in rows:
        r["test_loss"] = winner_test if r is best else None
    _save_csv(rows, f"{run}/tune", "results.csv")
    trial_result = best["result"]
    winner = {
        "trial_id": best["trial_id"], "metric": t.metric, "mode": t.mode,
        "value": best[t.metric], "test_loss": winner_test,
        "test_perplexity": math.exp(winner_test), "base_test_loss": base_test,
        "base_test_perplexity": math.exp(base_test),
        "config": {**{k: getattr(t, k) for k in ("method", "lr", "weight_decay",
                   "warmup_steps", "micro_batch_size", "lora_r", "lora_alpha", "lora_dropout",
                   "freeze_layers")}, **{k: best[k] for k in t.search_space}},
        "export": trial_result["export"], "trial_folder": best["out"],
        "samples": trial_result["samples"],
        "trials": {s: sum(r["status"] == s for r in rows)
                   for s in ("finished", "stopped early", "failed")},
        "results": f"{run}/tune/results.csv",
        "sweep_seconds": round(seconds, 1),
        "scoring_seconds": round(time.perf_counter() - start, 1),
        "lineage": _lineage(spec, run, base, task),
    }  # fmt: skip
    write_json(run, "winner.json", winner)
    _print(rows, t, winner)
    return winner


def test_loss(folder: str, prepared: str, batch_size: int) -> float:
    """Mean loss per target token of the HF model in `folder` over a prepared split `test`."""
    import pyarrow.dataset as pds
    import torch
    from transformers import AutoModelForCausalLM

    from llm_dist.train.loop import loss_sum_of

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from llm_dist.manifest import local_folder

    model = AutoModelForCausalLM.from_pretrained(local_folder(folder), local_files_only=True)
    model = model.to(device).eval()
    filesys, path = filesystem(f"{prepared}/test")
    table = pds.dataset(path, filesystem=filesys, format="parquet").to_table()
    width = table.schema.field("tokens").type.list_size
    total, targets = 0.0, 0
    with torch.no_grad():
        for batch in table.to_batches(batch_size):
            tokens = batch["tokens"].flatten().to_numpy().reshape(-1, width)
            tokens = torch.from_numpy(tokens.astype("int64")).to(device)
            mask = None
            if "mask" in batch.schema.names:
                mask = torch.from_numpy(batch["mask"].flatten().to_numpy().reshape(-1, width))
                mask = mask.to(device)
            total += loss_sum_of(model, tokens, mask).item()
            targets += (width - 1) * len(tokens) if mask is None else int(mask[:, 1:].sum())
    return total / targets


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
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tune: {len(rows)} trials, ranked by {t.metric} ({t.mode})")
    for column in ("trial", *t.search_space, t.metric, "step", "status", "time", "test loss"):
        table.add_column(
            column, justify="left" if column in ("trial", "status") else "right", no_wrap=True
        )
    for r in rows:
        value, seconds = r[t.metric], r["seconds"]
        table.add_row(
            r["trial_id"], *(str(r[k]) for k in t.search_space),
            "" if value is None else f"{value:.4f}", str(r["step"] or ""),
            r["status"] + (" (winner)" if r["trial_id"] == winner["trial_id"] else ""),
            "" if seconds is None else f"{seconds:.0f}s",
            "" if r["test_loss"] is None else f"{r['test_loss']:.4f}",
        )  # fmt: skip
    console = Console()
    if not console.is_terminal:  # a log file: no 80-column squeeze of the table
        console = Console(width=160)
    console.print(table)
    console.print(
        f"winner {winner['trial_id']}: {t.metric} {winner['value']:.4f}; test loss "
        f"{winner['test_loss']:.4f} vs the un-tuned base's {winner['base_test_loss']:.4f}; "
        f"export: {winner['export']}"
    )
