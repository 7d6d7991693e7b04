"""The worker loop: every Ray Train worker runs `train_loop`, one DeepSpeed engine per worker.

Top to bottom: set up (model, engine, resume), then per micro batch: forward, a NaN check,
backward, step; per optimizer step: metrics, evaluation and checkpoints every N steps; at the
end the final checkpoint's shard, then the test split, the HF export, a few sample generations
and `result.json`, and only then that checkpoint's report. The report is the last thing a run
does: a Tune scheduler may stop a trial at any report (ASHA does at `max_t`), so a run that
trained to its budget is whole before anyone can decide to stop it.

Pretraining and every fine-tuning trial run this same loop. A trial differs only in its
config: the model is the base folder (`spec.model.path`), `method` wraps it (LoRA adapters or
frozen layers), windows carry a `mask` of the tokens that are targets (an SFT response), each
evaluation adds the task's metrics (`tune.task.metrics`: greedy answers or label likelihoods,
`llm_dist.finetune.evaluate`), and the test split is left alone (only the sweep's winner is
ever scored on it).

Every rank consumes the same number of micro batches (`_synced`), so collectives never hang
and an epoch's tail is not dropped: a rank that is out of data joins with a weightless row.
The loss is a sum over target tokens divided by the step's global token count, so each step is
the mean over exactly the sequences in it, however they fell across ranks.
"""

import math
import time

import numpy as np

from llm_dist.train.losses import loss_sum_of


def train_loop(config: dict) -> None:
    """One worker's run; `config["loop"]` is its `LoopConfig`."""
    import deepspeed
    import ray.data
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from llm_dist.data import feed
    from llm_dist.data.tokenizer import load as load_tokenizer
    from llm_dist.finetune import evaluate
    from llm_dist.model import build, flops_per_token
    from llm_dist.records import Sample, TrainResult
    from llm_dist.run_folder import PreparedFolder, TrainFolder
    from llm_dist.storage import save_into
    from llm_dist.train import checkpoint
    from llm_dist.train.deepspeed_config import deepspeed_config, lr_lambda, param_groups
    from llm_dist.train.metrics import MetricsLog, peak_flops, peak_memory

    # ---- setup: plain values first, then the model and its engine
    c = config["loop"]
    spec, out, prepared, finetuning = c.spec, TrainFolder(c.out), c.prepared, c.finetuning
    p, T = spec.pretrain, spec.data.seq_len
    nan_at = dict(c.nan_at)  # injected NaN losses, to test recovery: {step: once|always}
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows progress
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    ds_config = deepspeed_config(p, use_gpu=device.type == "cuda")
    with ray.train.Checkpoint(PreparedFolder(prepared).tokenizer).as_directory() as folder:
        tokenizer = load_tokenizer(folder)
    torch.manual_seed(p.seed)
    # Alive while the model is built: transformers then creates it straight into ZeRO-3 shards.
    zero3 = HfDeepSpeedConfig(ds_config) if p.zero_stage == 3 else None  # noqa: F841
    model = build(spec.model, tokenizer)
    if finetuning is not None:  # a tune trial: LoRA adapters or frozen bottom blocks
        from llm_dist.finetune.methods import apply_method

        model = apply_method(model, finetuning)
    if p.activation_checkpointing:
        model.gradient_checkpointing_enable()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, p.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p)),
    )  # fmt: skip
    flops, (peak, peak_source) = flops_per_token(model, T), peak_flops(device)
    logs = MetricsLog(out, c.queue) if rank == 0 else None
    val = feed.head_batches(prepared, "val", p.eval_batches * p.micro_batch_size * world,
                            p.micro_batch_size, rank, world)  # fmt: skip
    # a trial's task metrics (tune.task.metrics), from greedy answers or label likelihoods
    task = evaluate.task_of(spec, prepared) if finetuning is not None else None
    synced = p.zero_stage == 3 and world > 1  # ZeRO-3 ranks generate in step

    def validate() -> dict:
        return _validate(engine, tokenizer, val, T, device, task, synced)

    # ---- resume: rank 0 picks the newest whole checkpoint, every rank loads it
    ckpt_root = out.checkpoints
    found = [checkpoint.latest_whole(ckpt_root) if rank == 0 else (None, [])]
    dist.broadcast_object_list(found, src=0)
    found, skipped = found[0]
    for folder, why in skipped:  # said on the console: the run goes back further than asked
        _note(logs, {"event": "checkpoint_skipped", "checkpoint": folder, "reason": why})
    state = {"step": 0, "epoch": 0, "tokens": 0, "bad_steps": 0, "val_loss_at_start": None}
    ledger = [np.zeros((0, 2), np.int64)]  # this rank's (step, id) rows of the epoch in progress
    consumed = np.zeros((0, 2), np.int64)  # every rank's rows, up to the checkpoint resumed
    scores = None  # the latest validation figures (val_loss, task metrics)
    if found is not None:
        folder, meta = found
        ledger[0], consumed = checkpoint.load(engine, folder)
        state = {k: meta[k] for k in state}
        _note(logs, {"event": "resumed", "step": state["step"], "checkpoint": folder})
    else:
        scores = validate()
        state["val_loss_at_start"] = scores["val_loss"]
        _write(logs, 0, "eval", {**scores, "val_ppl": math.exp(scores["val_loss"])})
    origin = None if c.origin is None else c.origin.model_dump(mode="json")

    # ---- train
    # loss sum, target tokens, tokens processed, data wait: since the last metrics row
    started, window, streak = time.perf_counter(), np.zeros(4), 0
    while state["step"] < p.max_steps:
        shard = feed.worker_shard(prepared, "train", rank, world, p.seed + state["epoch"],
                                  4 * p.micro_batch_size, exclude_ids=consumed[:, 1])  # fmt: skip
        batches = feed.epoch_batches(shard, p.micro_batch_size, p.seed, state["epoch"])
        for b in _synced(batches, T, device):
            step, ids = state["step"] + 1, b["ids"]
            boundary = engine.is_gradient_accumulation_boundary()
            loss_sum = loss_sum_of(engine, b["tokens"], b["mask"]) * (len(ids) > 0)
            if rank == 0 and nan_at.get(step) in ("once", "always"):
                loss_sum = loss_sum * float("nan")
                nan_at[step] = "done" if nan_at[step] == "once" else "always"
            ledger.append(np.stack([np.full(len(ids), step), ids], 1))
            bad = torch.tensor([0.0 if torch.isfinite(loss_sum) else 1.0], device=device)
            dist.all_reduce(bad)  # every rank skips together
            if not bad.item():
                engine.backward(loss_sum * world / b["targets_all"])  # the step's mean, see above
                engine.step()
                window += [loss_sum.item(), b["targets"], len(ids) * T, b["wait"]]
            if bad.item() or (boundary and not engine.was_step_applied()):  # NaN loss or grads
                state["bad_steps"], streak = state["bad_steps"] + 1, streak + 1
                _note(logs, {"event": "bad_step", "step": step, "in_a_row": streak})
                if streak > p.max_bad_steps:
                    raise RuntimeError(
                        f"{streak} steps in a row had a NaN or inf loss or gradient (at step "
                        f"{step}; pretrain.max_bad_steps is {p.max_bad_steps}): lower "
                        "pretrain.lr or check the data; the last whole checkpoint is kept"
                    )
                continue
            if not boundary:
                continue
            streak, state["step"], state["tokens"] = 0, step, state["tokens"] + b["rows_all"] * T

            if step % p.log_every == 0 or step == p.max_steps:
                elapsed = time.perf_counter() - started
                sums = torch.tensor([*window, elapsed, peak], dtype=torch.float64, device=device)
                dist.all_reduce(sums)
                most = torch.tensor([peak_memory(device)], dtype=torch.float64, device=device)
                dist.all_reduce(most, op=dist.ReduceOp.MAX)
                loss, targets, tokens_seen, waited, elapsed_sum, peak_sum = sums.tolist()
                tok_s = tokens_seen / (elapsed_sum / world)
                _write(logs, step, "train", {
                    "loss": loss / max(targets, 1), "lr": engine.get_lr()[0],
                    "grad_norm": _number(engine.get_global_grad_norm()),
                    "tokens_per_s": tok_s, "tokens_per_s_per_worker": tok_s / world,
                    "mfu": flops * tok_s / peak_sum, "data_wait": waited / elapsed_sum,
                    "peak_memory_gb": most.item() / 2**30, "epoch": state["epoch"],
                    "bad_steps": state["bad_steps"], "max_steps": p.max_steps,
                })  # fmt: skip
                started, window = time.perf_counter(), np.zeros(4)
            paused = time.perf_counter()  # evaluating and checkpointing are not training speed
            if step % p.eval_every == 0 or step == p.max_steps:
                scores = validate()
                _write(logs, step, "eval", {**scores, "val_ppl": math.exp(scores["val_loss"])})
            if step % p.checkpoint_every == 0 and step < p.max_steps:  # the last one: below
                folder = checkpoint.save(engine, state, np.concatenate(ledger), ckpt_root,
                                         _reported(state, scores), origin)  # fmt: skip
                _note(logs, {"event": "checkpoint", "step": step, "checkpoint": folder})
                logs and logs.publish()
            started += time.perf_counter() - paused
            if step == p.max_steps:
                break
        else:  # the epoch ran out before max_steps: record what it consumed, start the next
            feed.write_ledger(np.concatenate(ledger), out.ledger, state["epoch"])
            state["epoch"], ledger, consumed = state["epoch"] + 1, [ledger[0][:0]], consumed[:0]
    feed.write_ledger(np.concatenate(ledger), out.ledger, state["epoch"])

    if scores is None:  # resumed at max_steps: nothing was evaluated in this attempt
        scores = validate()

    # ---- the end, inside the final checkpoint (see the module docstring): its state is written
    # first, since the export's LoRA merge changes the model; its report comes last.
    def finish() -> None:
        """The test split once (not in a trial), a few samples, the HF export, result.json."""
        test_loss = None
        if finetuning is None:  # a trial never sees the test split
            test = feed.worker_shard(prepared, "test", rank, world, p.seed, 4 * p.micro_batch_size)
            test_loss = _evaluate(engine, test.iter_torch_batches(batch_size=p.micro_batch_size), T, device)  # fmt: skip
        samples = []
        # ZeRO-3: gathers the whole weights on every rank; otherwise a no-op. Generation's own
        # ZeRO-3 hooks hand weights back to their shards, so the export gathers them afresh.
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            if rank == 0:
                samples = _samples(engine.module, tokenizer, val, device)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            if rank == 0:
                # LoRA adapters are merged into the base weights: the export is a plain model
                merged = getattr(engine.module, "merge_and_unload", lambda: engine.module)()

                def save(folder: str) -> None:
                    merged.save_pretrained(folder, safe_serialization=True)
                    tokenizer.save_pretrained(folder)

                save_into(save, out.export)
        dist.barrier()
        if rank == 0:
            test_ppl = None if test_loss is None else math.exp(test_loss)
            result = TrainResult(
                **state, val=_validation(scores), test_loss=test_loss, test_ppl=test_ppl,
                export=out.export, samples=[Sample(**s) for s in samples], world_size=world,
                flops_per_token=flops, peak_flops_per_worker=peak, peak_flops_source=peak_source,
                origin=c.origin,
            )  # fmt: skip
            if test_loss is not None:
                _write(logs, state["step"], "test", {"test_loss": test_loss, "test_ppl": test_ppl})
            logs.publish()  # metrics.jsonl, when on object storage, before result.json
            out.write_result(result)

    # The local disk holds the checkpoint's shard and the export at once while `finish` runs.
    folder = checkpoint.save(engine, state, np.concatenate(ledger), ckpt_root,
                             _reported(state, scores), origin, before_report=finish)  # fmt: skip
    _note(logs, {"event": "checkpoint", "step": state["step"], "checkpoint": folder})
    if logs is not None:
        logs.close()


def _synced(batches, T: int, device):
    """Batches until every rank is out, each a dict: `tokens` (b, T+1), `mask` (b, T+1) or None,
    `ids` (b,), `targets` (this rank's target tokens), `rows_all` and `targets_all` (across
    ranks), `wait` (seconds spent waiting for data).

    A rank with no batch left gets one weightless row (no ids) so it still joins the step.
    """
    import torch
    import torch.distributed as dist

    it = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(it, None)
        wait = time.perf_counter() - start
        if batch is None:
            tokens, mask, ids = torch.zeros(1, T + 1, dtype=torch.long), None, np.zeros(0, np.int64)
        else:
            tokens, mask, ids = (
                batch["tokens"],
                batch.get("mask"),
                np.asarray(batch["id"], np.int64),
            )
        targets = len(ids) * T if mask is None else int(mask[:, 1:].sum()) * (len(ids) > 0)
        counts = torch.tensor([len(ids), targets], device=device)
        dist.all_reduce(counts)
        if counts[0].item() == 0:
            return
        yield {"tokens": tokens.to(device, torch.long),
               "mask": None if mask is None else mask.to(device), "ids": ids,
               "targets": targets, "rows_all": int(counts[0]), "targets_all": int(counts[1]),
               "wait": wait}  # fmt: skip


def _evaluate(engine, batches, T: int, device) -> float:
    """Mean loss per target token over every rank's `batches`."""
    import torch
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target tokens
    with torch.no_grad():
        for b in _synced(batches, T, device):
            total[0] += loss_sum_of(engine, b["tokens"], b["mask"]).item() * (len(b["ids"]) > 0)
            total[1] += b["targets"]
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item()


def _validate(engine, tokenizer, val, T: int, device, task, synced: bool) -> dict:
    """`val_loss` over every rank's `val` batches and, for a task with metrics, `val_<metric>`
    of each over every rank's answers and `task_seconds`, the time the answers took."""
    import torch.distributed as dist

    from llm_dist.finetune.evaluate import outcome
    from llm_dist.finetune.scores import compute

    figures = {"val_loss": _evaluate(engine, val, T, device)}
    if task is None:
        return figures
    start = time.perf_counter()
    mine = outcome(engine.module, tokenizer, val, task, device, synced_gpus=synced)
    engine.train()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged = {k: [v for answers in everyone for v in answers[k]] for k in mine}
    figures |= {f"val_{m}": v for m, v in compute(task.metrics, merged).items()}
    return figures | {"task_seconds": time.perf_counter() - start}


def _samples(model, tokenizer, val, device, prompts: int = 3, new_tokens: int = 32) -> list[dict]:
    """Greedy continuations of a few validation sequences: of their prompt (the tokens before
    the masked targets begin) when they have a mask, else of their first 16 tokens."""
    import torch

    model.eval()
    out = []
    batch = val[0]
    for i, row in enumerate(batch["tokens"][:prompts]):
        cut = 16
        if batch.get("mask") is not None and batch["mask"][i].any():
            cut = int(batch["mask"][i].nonzero()[0])
        prompt = row[:cut].to(device, torch.long)[None]
        with torch.no_grad():
            # only rank 0 generates: transformers must not wait for the others under ZeRO-3
            ids = model.generate(input_ids=prompt, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=False)  # fmt: skip
        out.append({"prompt": tokenizer.decode(prompt[0]),
                    "completion": tokenizer.decode(ids[0, prompt.shape[1]:])})  # fmt: skip
    model.train()
    return out


def _validation(scores: dict | None) -> dict:
    """The latest validation figures: val_loss, val_ppl and each task metric's `val_<name>`."""
    figures = {k: v for k, v in (scores or {"val_loss": None}).items() if k.startswith("val_")}
    loss = figures["val_loss"]
    return figures | {"val_ppl": None if loss is None else math.exp(loss)}


def _reported(state: dict, scores: dict | None) -> dict:
    """What a checkpoint reports to Ray Train: progress and the latest validation figures,
    which Ray Tune's schedulers decide on."""
    return {"step": state["step"], "tokens": state["tokens"], **_validation(scores)}


def _write(logs, step: int, kind: str, values: dict) -> None:
    if logs is not None:  # rank 0 only
        logs.write(step, kind, values)


def _note(logs, event: dict) -> None:
    if logs is not None:
        logs.note(event)


def _number(value) -> float | None:
    return None if value is None else float(value)
