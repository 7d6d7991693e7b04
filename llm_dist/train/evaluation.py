"""The worker loop's evaluations: the mean loss of a split, the validation figures (with a
trial's task metrics), a few greedy samples, and what a checkpoint reports to Ray Train."""

import math
import time

from llm_dist.data.feed import synced_batches
from llm_dist.train.losses import loss_sum_of


def mean_loss(engine, batches, T: int, device) -> float:
    """Mean loss per target token over every rank's `batches`."""
    import torch
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target tokens
    with torch.no_grad():
        for b in synced_batches(batches, T, device):
            total[0] += loss_sum_of(engine, b["tokens"], b["mask"]).item() * (len(b["ids"]) > 0)
            total[1] += b["targets"]
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item()


def validate(engine, tokenizer, val, T: int, device, task, synced: bool) -> dict:
    """`val_loss` over every rank's `val` batches and, for a task with metrics, `val_<metric>`
    of each over every rank's answers and `task_seconds`, the time the answers took."""
    import torch.distributed as dist

    from llm_dist.finetune.evaluate import outcome
    from llm_dist.finetune.scores import compute

    figures = {"val_loss": mean_loss(engine, val, T, device)}
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


def samples(model, tokenizer, val, device, synced: bool, prompts: int = 3,
            new_tokens: int = 32) -> list[dict]:  # fmt: skip
    """Greedy continuations of a few validation sequences: of their prompt (the tokens before
    the masked targets begin) when they have a mask, else of their first 16 tokens. `synced`:
    every rank calls this and each generation step waits for all of them (ZeRO-3)."""
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
            ids = model.generate(input_ids=prompt, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)  # fmt: skip
        out.append({"prompt": tokenizer.decode(prompt[0]),
                    "completion": tokenizer.decode(ids[0, prompt.shape[1]:])})  # fmt: skip
    model.train()
    return out


def validation(scores: dict | None) -> dict:
    """The latest validation figures: val_loss, val_ppl and each task metric's `val_<name>`."""
    figures = {k: v for k, v in (scores or {"val_loss": None}).items() if k.startswith("val_")}
    loss = figures["val_loss"]
    return figures | {"val_ppl": None if loss is None else math.exp(loss)}


def reported(state, scores: dict | None) -> dict:
    """What a checkpoint reports to Ray Train: progress and the latest validation figures,
    which Ray Tune's schedulers decide on."""
    return {"step": state.step, "tokens": state.tokens, **validation(scores)}
