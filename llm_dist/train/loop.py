"""The worker loop: every Ray Train worker runs `train_loop`, one DeepSpeed engine per worker.

In named parts, top to bottom: `setup` (model, engine, data, logs: plain values in a `Worker`),
`resume` (the newest whole checkpoint, or an evaluation at step 0), then per micro batch
`train_step` (forward, a NaN check, backward, step) and per optimizer step a metrics row, the
evaluation and checkpoints every N steps; at the end `finish` inside the final checkpoint: its
shard first, then the test split, a few sample generations, the HF export and `result.json`,
and only then that checkpoint's report. The report is the last thing a run does: a Tune
scheduler may stop a trial at any report (ASHA does at `max_t`), so a run that trained to its
budget is whole before anyone can decide to stop it.

Pretraining and every fine-tuning trial run this same loop. A trial differs only in its
config: the model is the base folder (`spec.model.path`), `method` wraps it (LoRA adapters or
frozen layers), windows carry a `mask` of the tokens that are targets (an SFT response), each
evaluation adds the task's metrics (`tune.task.metrics`: greedy answers or label likelihoods,
`llm_dist.finetune.evaluate`), and the test split is left alone (only the sweep's winner is
ever scored on it).

Every rank consumes the same number of micro batches (`feed.synced_batches`), so collectives
never hang and an epoch's tail is not dropped: a rank that is out of data joins with a
weightless row. The loss is a sum over target tokens divided by the step's global token count,
so each step is the mean over exactly the sequences in it, however they fell across ranks.
"""

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_dist.train import evaluation
from llm_dist.train.state import TrainState


@dataclass
class Worker:
    """One worker's run, as `setup` made it: settings, its engine and what feeds and records it."""

    c: Any  # the LoopConfig
    out: Any  # its TrainFolder
    rank: int
    world: int
    device: Any
    engine: Any  # the DeepSpeed engine
    tokenizer: Any
    loss: Any  # loss_sum_of, or a test's faulty stand-in (`train.faults`)
    val: list  # this rank's fixed validation batches
    task: Any  # a trial's task metrics (`finetune.evaluate.TaskEval`), or None
    logs: Any  # rank 0's MetricsLog, else None
    flops: float  # per token
    peak: float  # this worker's peak FLOP/s
    peak_source: str
    zero3: Any = None  # transformers' handle on a ZeRO-3 config: kept alive for the run
    phases: Any = None  # the start's `metrics.Phases`, written at the first optimizer step
    state: TrainState = field(default_factory=TrainState)  # what `resume` found, then progress

    @property
    def p(self):
        return self.c.spec.pretrain

    def write(self, step: int, kind: str, values: dict) -> None:
        if self.logs is not None:  # rank 0 only
            self.logs.write(step, kind, values)

    def note(self, event: dict) -> None:
        if self.logs is not None:
            self.logs.note(event)

    def validate(self) -> dict:
        from llm_dist.train.zero import synced_generation

        synced = synced_generation(self.p.zero_stage, self.world)
        return evaluation.validate(self.engine, self.tokenizer, self.val, self.c.spec.data.seq_len,
                                   self.device, self.task, synced)  # fmt: skip


def train_loop(config: dict) -> None:
    """One worker's run; `config["loop"]` is its `LoopConfig`."""
    from llm_dist.data import feed
    from llm_dist.train import checkpoint

    w = setup(config["loop"])
    scores = resume(w)
    p, state = w.p, w.state
    meter, first = Meter(w), state.step + 1
    w.phases.lap("step0_eval" if scores is not None else "resume")
    while state.step < p.max_steps:
        shard = feed.worker_shard(w.c.prepared, "train", w.rank, w.world, p.seed + state.epoch,
                                  4 * p.micro_batch_size, exclude_ids=state.consumed[:, 1],
                                  in_memory=w.c.finetuning is not None)  # fmt: skip
        batches = feed.epoch_batches(shard, p.micro_batch_size, p.seed, state.epoch)
        if state.step < first:
            w.phases.lap("data_split")
        for b in feed.synced_batches(batches, w.c.spec.data.seq_len, w.device):
            if not train_step(w, b, meter):
                continue  # within an accumulation, or a bad step skipped
            step = state.step
            if step == first:  # the start is over: where its time went
                w.phases.lap("first_step")
                waited = float(meter.window[3])  # this rank's wait for its first batches
                w.phases.seconds |= {"first_batch": waited,
                                     "first_step": w.phases.seconds["first_step"] - waited}  # fmt: skip
                w.note({"event": "started", "step": step, "phases": w.phases.seconds})
            if step % p.log_every == 0 or step == p.max_steps:
                meter.row()
            with meter.paused():  # evaluating and checkpointing are not training speed
                if step % p.eval_every == 0 or step == p.max_steps:
                    scores = w.validate()
                    w.write(step, "eval", {**scores, "val_ppl": math.exp(scores["val_loss"])})
                if step % p.checkpoint_every == 0 and step < p.max_steps:  # the last: finish
                    fault = _kill_in_window(w, step, fresh=first == 1)
                    folder = checkpoint.save(w.engine, state, w.out.checkpoints,
                                             evaluation.reported(state, scores), _origin(w),
                                             before_commit=fault)  # fmt: skip
                    w.note({"event": "checkpoint", "step": step, "checkpoint": folder})
                    w.logs and w.logs.publish()
            if step == p.max_steps:
                break
        else:  # the epoch ran out before max_steps: record what it consumed, start the next
            feed.write_ledger(state.rows(), w.out.ledger, state.epoch)
            state.next_epoch()
    feed.write_ledger(state.rows(), w.out.ledger, state.epoch)
    if scores is None:  # resumed at max_steps: nothing was evaluated in this attempt
        scores = w.validate()
    finish(w, scores)


def setup(c) -> Worker:
    """The worker's plain values first, then its model (a trial's method applied) and engine."""
    from llm_dist.train.metrics import Phases

    phases = Phases(c.launched)
    phases.lap("worker_group")  # the trainer's placement group, worker actors, process group
    import deepspeed
    import ray.data
    import ray.train
    import ray.train.torch
    import torch

    from llm_dist.data import feed
    from llm_dist.data.tokenizer import load as load_tokenizer
    from llm_dist.finetune import evaluate
    from llm_dist.model import build, flops_per_token
    from llm_dist.run_folder import PreparedFolder, TrainFolder
    from llm_dist.train import faults, zero
    from llm_dist.train.deepspeed_config import deepspeed_config, lr_lambda, param_groups
    from llm_dist.train.losses import loss_sum_of
    from llm_dist.train.metrics import MetricsLog, peak_flops

    phases.lap("imports")
    spec, p = c.spec, c.spec.pretrain
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows progress
    zero.init_distributed(device)
    ds_config = deepspeed_config(p, use_gpu=device.type == "cuda")
    phases.lap("distributed")
    with ray.train.Checkpoint(PreparedFolder(c.prepared).tokenizer).as_directory() as folder:
        tokenizer = load_tokenizer(folder)
    torch.manual_seed(p.seed)
    zero3 = zero.build_config(ds_config, p.zero_stage)  # before the model is built
    model = build(spec.model, tokenizer)
    if c.finetuning is not None:  # a tune trial: LoRA adapters or frozen bottom blocks
        from llm_dist.finetune.methods import apply_method

        model = apply_method(model, c.finetuning)
    if p.activation_checkpointing:
        model.gradient_checkpointing_enable()
    phases.lap("model")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, p.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p)),
    )  # fmt: skip
    phases.lap("deepspeed")
    peak, peak_source = peak_flops(device)
    w = Worker(
        c=c, out=TrainFolder(c.out), rank=rank, world=world, device=device, engine=engine, tokenizer=tokenizer,
        loss=loss_sum_of, logs=MetricsLog(TrainFolder(c.out), c.queue) if rank == 0 else None,
        val=feed.head_batches(c.prepared, "val", p.eval_batches * p.micro_batch_size * world,
                              p.micro_batch_size, rank, world),
        # a trial's task metrics (tune.task.metrics), from greedy answers or label likelihoods
        task=evaluate.task_of(spec, c.prepared) if c.finetuning is not None else None,
        flops=flops_per_token(model, spec.data.seq_len), peak=peak, peak_source=peak_source,
        zero3=zero3, phases=phases,
    )  # fmt: skip
    phases.lap("eval_data")
    if c.nan_at:  # a test of bad steps: the loss is NaN where it asks
        w.loss = faults.with_nans(loss_sum_of, c.nan_at, rank, lambda: w.state.step + 1)
    return w


def resume(w: Worker) -> dict | None:
    """Rank 0 picks the newest whole checkpoint and every rank loads it into `w.state`; without
    one, the run starts at step 0 with an evaluation. Returns the latest validation figures
    (None after a resume: the checkpoint's are not kept)."""
    import torch.distributed as dist

    from llm_dist.train import checkpoint
    from llm_dist.train.deepspeed_config import apply_schedule

    found = [checkpoint.latest_whole(w.out.checkpoints) if w.rank == 0 else (None, [])]
    dist.broadcast_object_list(found, src=0)
    found, skipped = found[0]
    for folder, why in skipped:  # said on the console: the run goes back further than asked
        w.note({"event": "checkpoint_skipped", "checkpoint": folder, "reason": why})
    if found is not None:
        folder, meta = found
        w.state = checkpoint.load(w.engine, folder, meta)
        apply_schedule(w.engine.lr_scheduler, w.p)  # a PBT trial's perturbed settings
        exploit = w.c.exploit
        if exploit is not None and exploit.checkpoint == folder:  # PBT: the donor's state
            w.note({"event": "exploited", "step": w.state.step, "checkpoint": folder,
                    "exploit": exploit})  # fmt: skip
        else:
            w.note({"event": "resumed", "step": w.state.step, "checkpoint": folder})
        return None
    scores = w.validate()
    w.state.val_loss_at_start = scores["val_loss"]
    w.write(0, "eval", {**scores, "val_ppl": math.exp(scores["val_loss"])})
    return scores


def train_step(w: Worker, b: dict, meter: "Meter") -> bool:
    """One micro batch `b` (`feed.synced_batches`): forward, backward, and at the end of an
    accumulation the optimizer step. True when an optimizer step was taken; a step whose loss
    or gradients are not finite is skipped on every rank and counted (too many in a row raise)."""
    import torch
    import torch.distributed as dist

    state = w.state
    step, ids, T = state.step + 1, b["ids"], w.c.spec.data.seq_len
    boundary = w.engine.is_gradient_accumulation_boundary()
    loss_sum = w.loss(w.engine, b["tokens"], b["mask"], position=b["position"]) * (len(ids) > 0)
    state.took(step, ids)
    bad = torch.tensor([0.0 if torch.isfinite(loss_sum) else 1.0], device=w.device)
    dist.all_reduce(bad)  # every rank skips together
    if not bad.item():
        w.engine.backward(loss_sum * w.world / b["targets_all"])  # the step's mean, see above
        w.engine.step()
        meter.add(loss_sum.item(), b["targets"], len(ids) * T, b["wait"])
    if bad.item() or (boundary and not w.engine.was_step_applied()):  # NaN loss or gradients
        state.bad_steps, state.in_a_row = state.bad_steps + 1, state.in_a_row + 1
        w.note({"event": "bad_step", "step": step, "in_a_row": state.in_a_row})
        if state.in_a_row > w.p.max_bad_steps:
            raise RuntimeError(
                f"{state.in_a_row} steps in a row had a NaN or inf loss or gradient (at step "
                f"{step}; pretrain.max_bad_steps is {w.p.max_bad_steps}): lower pretrain.lr or "
                "check the data; the last whole checkpoint is kept"
            )
        return False
    if not boundary:
        return False
    state.in_a_row, state.step, state.tokens = 0, step, state.tokens + b["rows_all"] * T
    return True


class Meter:
    """Training speed since the last metrics row: loss sum, target tokens, tokens processed and
    data wait, over training time only (`paused` blocks do not count)."""

    def __init__(self, w: Worker):
        self.w, self.started, self.window = w, time.perf_counter(), np.zeros(4)

    def add(self, loss_sum: float, targets: int, tokens: int, wait: float) -> None:
        self.window += [loss_sum, targets, tokens, wait]

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - start

    def row(self) -> None:
        """The train row of the worker's step, summed over every rank, then a new window."""
        import torch
        import torch.distributed as dist

        from llm_dist.train.metrics import peak_memory

        w, state = self.w, self.w.state
        elapsed = time.perf_counter() - self.started
        sums = torch.tensor([*self.window, elapsed, w.peak], dtype=torch.float64, device=w.device)
        dist.all_reduce(sums)
        most = torch.tensor([peak_memory(w.device)], dtype=torch.float64, device=w.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        loss, targets, tokens_seen, waited, elapsed_sum, peak_sum = sums.tolist()
        tok_s = tokens_seen / (elapsed_sum / w.world)
        grad_norm = w.engine.get_global_grad_norm()
        w.write(state.step, "train", {
            "loss": loss / max(targets, 1), "lr": w.engine.get_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tok_s, "tokens_per_s_per_worker": tok_s / w.world,
            "mfu": w.flops * tok_s / peak_sum, "data_wait": waited / elapsed_sum,
            "peak_memory_gb": most.item() / 2**30, "epoch": state.epoch,
            "bad_steps": state.bad_steps, "max_steps": w.p.max_steps,
        })  # fmt: skip
        self.started, self.window = time.perf_counter(), np.zeros(4)


def finish(w: Worker, scores: dict) -> None:
    """The final checkpoint, with the end inside it: its state is written first, since the
    export's LoRA merge changes the model; then the test split once (not in a trial), a few
    samples, the HF export and result.json; its report comes last (see the module docstring).
    The local disk holds the checkpoint's shard and the export at once meanwhile."""
    import torch.distributed as dist

    from llm_dist.data import feed
    from llm_dist.records import Sample, TrainResult
    from llm_dist.storage import save_into
    from llm_dist.train import checkpoint, zero
    from llm_dist.train.metrics import Phases

    p, out, c, state = w.p, w.out, w.c, w.state

    def end() -> None:
        phases, test_loss = Phases(), None
        if c.finetuning is None:  # a trial never sees the test split
            test = feed.worker_shard(c.prepared, "test", w.rank, w.world, p.seed,
                                     4 * p.micro_batch_size)  # fmt: skip
            test_loss = evaluation.mean_loss(w.engine, test.iter_torch_batches(batch_size=p.micro_batch_size), c.spec.data.seq_len, w.device)  # fmt: skip
            phases.lap("test")
        # Under ZeRO-3 on several workers every rank takes part in each generation step (its
        # hooks gather each layer's weights as it runs), and rank 0 keeps its samples: one rank
        # generating inside gathered weights breaks the hooks' bookkeeping of params in flight.
        synced = zero.synced_generation(p.zero_stage, w.world)
        samples = []
        if synced or w.rank == 0:
            samples = evaluation.samples(w.engine.module, w.tokenizer, w.val, w.device, synced)
        phases.lap("samples")
        with zero.whole_weights(w.engine) as model:
            if w.rank == 0:
                # LoRA adapters are merged into the base weights: the export is a plain model
                merged = getattr(model, "merge_and_unload", lambda: model)()

                def save(folder: str) -> None:
                    merged.save_pretrained(folder, safe_serialization=True)
                    w.tokenizer.save_pretrained(folder)

                save_into(save, out.export)
        dist.barrier()
        phases.lap("export")
        w.note({"event": "finished", "step": state.step, "phases": phases.seconds})
        if w.rank == 0:
            test_ppl = None if test_loss is None else math.exp(test_loss)
            result = TrainResult(
                **state.progress(), val=evaluation.validation(scores), test_loss=test_loss,
                test_ppl=test_ppl, export=out.export, samples=[Sample(**s) for s in samples],
                world_size=w.world, flops_per_token=w.flops, peak_flops_per_worker=w.peak,
                peak_flops_source=w.peak_source, origin=c.origin,
            )  # fmt: skip
            if test_loss is not None:
                w.write(state.step, "test", {"test_loss": test_loss, "test_ppl": test_ppl})
            w.logs.publish()  # metrics.jsonl, when on object storage, before result.json
            out.write_result(result)

    folder = checkpoint.save(w.engine, state, out.checkpoints, evaluation.reported(state, scores),
                             _origin(w), before_report=end)  # fmt: skip
    w.note({"event": "checkpoint", "step": state.step, "checkpoint": folder})
    if w.logs is not None:
        w.logs.close()


def _kill_in_window(w: Worker, step: int, fresh: bool):
    """The injected kill of a test (`train.faults`) where it asks for this step, else None."""
    if w.c.kill_at_commit != step or not fresh:
        return None
    from llm_dist.train.checkpoint import on_disk
    from llm_dist.train.faults import kill_in_commit_window

    return lambda: kill_in_commit_window(w.out.checkpoints, on_disk(w.p))


def _origin(w: Worker) -> dict | None:
    return None if w.c.origin is None else w.c.origin.model_dump(mode="json")
