"""The worker loop: every Ray Train worker runs `train_loop`, one DeepSpeed engine per worker.

Top to bottom: set up (model, engine, resume), then per micro batch: forward, a NaN check,
backward, step; per optimizer step: metrics, evaluation and checkpoints every N steps; at the
end the test split, the HF export and a few sample generations.

Every rank consumes the same number of micro batches (`_synced`), so collectives never hang
and an epoch's tail is not dropped: a rank that is out of data joins with a weightless row.
The loss is a sum over target tokens divided by the step's global token count, so each step is
the mean over exactly the sequences in it, however they fell across ranks.
"""

import math
import time

import numpy as np


def train_loop(config: dict) -> None:
    import deepspeed
    import ray.data
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from llm_dist.data import feed
    from llm_dist.data.tokenizer import load as load_tokenizer
    from llm_dist.manifest import save_into, write_json
    from llm_dist.model import build, flops_per_token
    from llm_dist.spec import JobSpec
    from llm_dist.train import checkpoint
    from llm_dist.train.deepspeed_config import deepspeed_config, lr_lambda, param_groups
    from llm_dist.train.metrics import MetricsLog, peak_flops, peak_memory

    # ---- setup: plain values first, then the model and its engine
    spec = JobSpec.model_validate(config["spec"])
    p, run, prepared, T = spec.pretrain, config["run"], config["prepared"], spec.data.seq_len
    nan_at = dict(config["nan_at"])  # injected NaN losses, to test recovery: {step: once|always}
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows progress
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    ds_config = deepspeed_config(p, use_gpu=device.type == "cuda")
    with ray.train.Checkpoint(f"{prepared}/tokenizer").as_directory() as folder:
        tokenizer = load_tokenizer(folder)
    torch.manual_seed(p.seed)
    # Alive while the model is built: transformers then creates it straight into ZeRO-3 shards.
    zero3 = HfDeepSpeedConfig(ds_config) if p.zero_stage == 3 else None  # noqa: F841
    model = build(spec.model, tokenizer)
    if p.activation_checkpointing:
        model.gradient_checkpointing_enable()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, p.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p)),
    )  # fmt: skip
    flops, (peak, peak_source) = flops_per_token(model, T), peak_flops(device)
    logs = MetricsLog(run, config["queue"]) if rank == 0 else None
    val = feed.head_batches(prepared, "val", p.eval_batches * p.micro_batch_size * world,
                            p.micro_batch_size, rank, world)  # fmt: skip

    # ---- resume: rank 0 picks the newest whole checkpoint, every rank loads it
    ckpt_root = f"{run}/pretrain/checkpoints"
    found = [checkpoint.latest_whole(ckpt_root) if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    state = {"step": 0, "epoch": 0, "tokens": 0, "bad_steps": 0, "val_loss_at_start": None}
    ledger = [np.zeros((0, 2), np.int64)]  # this rank's (step, id) rows of the epoch in progress
    consumed = np.zeros((0, 2), np.int64)  # every rank's rows, up to the checkpoint resumed
    val_loss = None  # the latest validation loss
    if found[0] is not None:
        folder, meta = found[0]
        ledger[0], consumed = checkpoint.load(engine, folder)
        state = {k: meta[k] for k in state}
        _note(logs, {"event": "resumed", "step": state["step"], "checkpoint": folder})
    else:
        state["val_loss_at_start"] = val_loss = _evaluate(engine, val, T, device)
        _write(logs, 0, "eval", {"val_loss": val_loss, "val_ppl": math.exp(val_loss)})

    # ---- train
    started, window, streak = time.perf_counter(), np.zeros(3), 0  # loss sum, tokens, data wait
    while state["step"] < p.max_steps:
        shard = feed.worker_shard(prepared, "train", rank, world, p.seed + state["epoch"],
                                  4 * p.micro_batch_size, exclude_ids=consumed[:, 1])  # fmt: skip
        batches = feed.epoch_batches(shard, p.micro_batch_size, p.seed, state["epoch"])
        for tokens, ids, n, wait in _synced(batches, T, device):
            step = state["step"] + 1
            boundary = engine.is_gradient_accumulation_boundary()
            loss_sum = _loss_sum(engine, tokens) * (len(ids) > 0)
            if rank == 0 and nan_at.get(step) in ("once", "always"):
                loss_sum = loss_sum * float("nan")
                nan_at[step] = "done" if nan_at[step] == "once" else "always"
            ledger.append(np.stack([np.full(len(ids), step), ids], 1))
            bad = torch.tensor([0.0 if torch.isfinite(loss_sum) else 1.0], device=device)
            dist.all_reduce(bad)  # every rank skips together
            if not bad.item():
                engine.backward(loss_sum * world / (n * T))  # the step's mean, see the docstring
                engine.step()
                window += [loss_sum.item(), len(ids) * T, wait]
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
            streak, state["step"], state["tokens"] = 0, step, state["tokens"] + n * T

            if step % p.log_every == 0 or step == p.max_steps:
                elapsed = time.perf_counter() - started
                sums = torch.tensor([*window, elapsed, peak], dtype=torch.float64, device=device)
                dist.all_reduce(sums)
                most = torch.tensor([peak_memory(device)], dtype=torch.float64, device=device)
                dist.all_reduce(most, op=dist.ReduceOp.MAX)
                loss, tokens_seen, waited, elapsed_sum, peak_sum = sums.tolist()
                tok_s = tokens_seen / (elapsed_sum / world)
                _write(logs, step, "train", {
                    "loss": loss / tokens_seen, "lr": engine.get_lr()[0],
                    "grad_norm": _number(engine.get_global_grad_norm()),
                    "tokens_per_s": tok_s, "tokens_per_s_per_worker": tok_s / world,
                    "mfu": flops * tok_s / peak_sum, "data_wait": waited / elapsed_sum,
                    "peak_memory_gb": most.item() / 2**30, "epoch": state["epoch"],
                    "bad_steps": state["bad_steps"], "max_steps": p.max_steps,
                })  # fmt: skip
                started, window = time.perf_counter(), np.zeros(3)
            if step % p.eval_every == 0 or step == p.max_steps:
                val_loss = _evaluate(engine, val, T, device)
                _write(logs, step, "eval", {"val_loss": val_loss, "val_ppl": math.exp(val_loss)})
            if step % p.checkpoint_every == 0 or step == p.max_steps:
                folder = checkpoint.save(engine, state, np.concatenate(ledger), ckpt_root,
                                         metrics={"step": step, "tokens": state["tokens"]})  # fmt: skip
                _note(logs, {"event": "checkpoint", "step": step, "checkpoint": folder})
                logs and logs.publish()
            if step == p.max_steps:
                break
        else:  # the epoch ran out before max_steps: record what it consumed, start the next
            feed.write_ledger(np.concatenate(ledger), f"{run}/pretrain/ledger", state["epoch"])
            state["epoch"], ledger, consumed = state["epoch"] + 1, [ledger[0][:0]], consumed[:0]
    feed.write_ledger(np.concatenate(ledger), f"{run}/pretrain/ledger", state["epoch"])

    # ---- the end: the test split once, the HF export, samples
    test = feed.worker_shard(prepared, "test", rank, world, p.seed, 4 * p.micro_batch_size)
    test_loss = _evaluate(engine, test.iter_torch_batches(batch_size=p.micro_batch_size), T, device)  # fmt: skip
    if val_loss is None:  # resumed at max_steps: nothing was evaluated in this attempt
        val_loss = _evaluate(engine, val, T, device)
    samples = []
    # ZeRO-3: gathers the whole weights on every rank for the save; otherwise a no-op
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        if rank == 0:

            def save(folder: str) -> None:
                engine.module.save_pretrained(folder, safe_serialization=True)
                tokenizer.save_pretrained(folder)

            save_into(save, f"{run}/pretrain/export")
            samples = _samples(engine.module, tokenizer, val, device)
    dist.barrier()
    if rank == 0:
        result = {**state, "val_loss": val_loss, "test_loss": test_loss,
                  "test_ppl": math.exp(test_loss), "export": f"{run}/pretrain/export",
                  "samples": samples, "world_size": world, "flops_per_token": flops,
                  "peak_flops_per_worker": peak, "peak_flops_source": peak_source}  # fmt: skip
        _write(logs, state["step"], "test", {"test_loss": test_loss, "test_ppl": math.exp(test_loss)})  # fmt: skip
        logs.close()
        write_json(f"{run}/pretrain", "result.json", result)


def _synced(batches, T: int, device):
    """(tokens (b, T+1), ids (b,), rows across ranks, seconds waited) until every rank is out.

    A rank with no batch left gets one weightless row (no ids) so it still joins the step.
    """
    import torch
    import torch.distributed as dist

    it = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(it, None)
        wait = time.perf_counter() - start
        n = torch.tensor([0 if batch is None else len(batch["id"])], device=device)
        dist.all_reduce(n)
        if n.item() == 0:
            return
        if batch is None:
            tokens, ids = torch.zeros(1, T + 1, dtype=torch.long), np.zeros(0, np.int64)
        else:
            tokens, ids = batch["tokens"], np.asarray(batch["id"], np.int64)
        yield tokens.to(device, torch.long), ids, int(n.item()), wait


def _loss_sum(engine, tokens):
    """Summed next-token cross-entropy of `tokens` (b, T+1): inputs [:, :-1], targets [:, 1:]."""
    import torch.nn.functional as F

    logits = engine(input_ids=tokens[:, :-1]).logits  # (b, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")


def _evaluate(engine, batches, T: int, device) -> float:
    """Mean loss per target token over every rank's `batches`."""
    import torch
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target tokens
    with torch.no_grad():
        for tokens, ids, _, _ in _synced(batches, T, device):
            total[0] += _loss_sum(engine, tokens).item() * (len(ids) > 0)
            total[1] += len(ids) * T
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item()


def _samples(model, tokenizer, val, device, prompts: int = 3, new_tokens: int = 32) -> list[dict]:
    """Greedy continuations of the first 16 tokens of a few validation sequences."""
    import torch

    model.eval()
    out = []
    for row in val[0]["tokens"][:prompts]:
        prompt = row[:16].to(device, torch.long)[None]
        with torch.no_grad():
            # only rank 0 generates: transformers must not wait for the others under ZeRO-3
            ids = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=False)  # fmt: skip
        out.append({"prompt": tokenizer.decode(prompt[0]),
                    "completion": tokenizer.decode(ids[0, prompt.shape[1]:])})  # fmt: skip
    model.train()
    return out


def _write(logs, step: int, kind: str, values: dict) -> None:
    if logs is not None:  # rank 0 only
        logs.write(step, kind, values)


def _note(logs, event: dict) -> None:
    if logs is not None:
        logs.note(event)


def _number(value) -> float | None:
    return None if value is None else float(value)
