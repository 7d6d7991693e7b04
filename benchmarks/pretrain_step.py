"""Pretraining step time: llm-dist's Ray Train + DeepSpeed loop vs a plain torch loop, one run.

Both sides train the quickstart's `tiny` Llama on the same prepared windows (micro batch 8,
seq_len 128, fp32, AdamW, clipping, warmup + cosine) with the same number of CPU threads. The
plain loop runs in this process; llm-dist runs as `llm-dist pretrain` in a subprocess with
1 worker at ZeRO-0 and at ZeRO-2, then 2 workers at ZeRO-2 (half the threads each). Printed:
median step time over the timed windows and its ratio to plain torch, seconds from the
command to the first step, the data-wait fraction and MFU as the run logged them.

    python benchmarks/pretrain_step.py [STEPS]   (default 60; needs data/stdlib.jsonl, made if missing)
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
THREADS = os.cpu_count() or 1
SETTINGS = ["pretrain.max_steps={steps}", "pretrain.log_every=10", "pretrain.eval_every=100000",
            "pretrain.checkpoint_every=100000", "pretrain.warmup_steps=5", "cluster.cpus_per_worker={cpus}",
            "pretrain.num_workers={workers}", "pretrain.zero_stage={zero}", "stages=[data,pretrain]",
            "storage_path={storage}"]  # fmt: skip


def plain_torch(spec, prepared: str, steps: int) -> list[float]:
    """Seconds per step of a plain single-process loop on the same model, data and optimizer."""
    import pyarrow.parquet as pq
    import torch

    from llm_dist.data.tokenizer import load
    from llm_dist.model import build
    from llm_dist.run_folder import PreparedFolder
    from llm_dist.train.deepspeed_config import lr_lambda, param_groups

    torch.set_num_threads(THREADS)
    p = spec.pretrain
    folder = PreparedFolder(prepared)
    tokens = pq.read_table(folder.split("train"))["tokens"].combine_chunks()
    tokens = torch.from_numpy(tokens.flatten().to_numpy().reshape(len(tokens), -1).astype("int64"))
    torch.manual_seed(p.seed)
    model = build(spec.model, load(folder.tokenizer))
    opt = torch.optim.AdamW(param_groups(model, p.weight_decay), lr=p.lr, betas=p.betas, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p))
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = tokens[step * 8 : (step + 1) * 8]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step(), sched.step(), opt.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def llm_dist(storage: str, workers: int, zero: int, *extra: str) -> dict:
    """Run `llm-dist pretrain` and read its metrics: step time, start-up, data wait, MFU, and
    the rows of train metrics as they were logged."""
    from llm_dist.run_folder import RunFolder

    sets = [s.format(steps=STEPS, cpus=THREADS // workers, workers=workers, zero=zero,
                     storage=storage) for s in SETTINGS]  # fmt: skip
    command = ["llm-dist", "pretrain", "jobs/quickstart.yaml"] + [
        a for s in [*sets, *extra] for a in ("--set", s)
    ]
    start = time.time()
    subprocess.run(
        command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    rows = RunFolder(f"{storage}/quickstart").pretrain.read_metrics()
    train = [r for r in rows if r.kind == "train"][1:]  # the first window holds the warm-up
    tokens_per_step = 8 * workers * 128
    return {
        "step_s": statistics.median(tokens_per_step / r.tokens_per_s for r in train),
        "to_first_step_s": next(r.time for r in rows if r.kind == "eval") - start,
        "data_wait": statistics.mean(r.data_wait for r in train),
        "mfu": statistics.mean(r.mfu for r in train),
        "train": train,
    }


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from llm_dist.data.prepare import prepare
    from llm_dist.spec import load_spec

    if not (ROOT / "data/stdlib.jsonl").exists():
        subprocess.run(["llm-dist", "data", "stdlib", "data"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as storage:
        os.chdir(ROOT)
        spec = load_spec("jobs/quickstart.yaml", [f"storage_path={storage}"])
        subprocess.run(["llm-dist", "run", "jobs/quickstart.yaml", "--set", f"storage_path={storage}",
                        "--set", "stages=[data]"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        prepared = prepare(spec).prepared
        import ray

        ray.shutdown()  # prepare() may have started Ray; the plain loop runs without it
        # this machine's speed drifts by tens of percent between minutes: the plain loop runs
        # before and after each llm-dist run, and each ratio uses the mean of the two
        before = statistics.median(plain_torch(spec, prepared, STEPS)[10:])
        print(f"plain torch: {before * 1000:.1f} ms/step ({THREADS} threads, {STEPS} steps)")
        for workers, zero in ((1, 0), (1, 2), (2, 2)):
            subprocess.run(["rm", "-rf", f"{storage}/quickstart/pretrain"], check=True)
            ours = llm_dist(storage, workers, zero)
            after = statistics.median(plain_torch(spec, prepared, STEPS)[10:])
            plain = (before + after) / 2
            ratio = ours["step_s"] / plain * (1 if workers == 1 else 0.5)
            print(f"llm-dist {workers} worker(s) ZeRO-{zero}: {ours['step_s'] * 1000:.1f} ms/step, "
                  f"ratio {ratio:.3f} (per sequence vs plain {plain * 1000:.1f} ms); command to "
                  f"first step {ours['to_first_step_s']:.1f} s; data wait {ours['data_wait']:.2%}; "
                  f"MFU {ours['mfu']:.1%}")  # fmt: skip
            print(f"plain torch: {after * 1000:.1f} ms/step")
            before = after
        # Evaluating and checkpointing are not training speed: with both every 10 steps and a
        # row every 5, the rows just after one (steps 15, 25, ...) match the others (10, 20, ...)
        subprocess.run(["rm", "-rf", f"{storage}/quickstart/pretrain"], check=True)
        train = llm_dist(storage, 2, 2, "pretrain.log_every=5", "pretrain.eval_every=10",
                         "pretrain.checkpoint_every=10")["train"]  # fmt: skip
        after = [r.tokens_per_s for r in train if r.step % 10 == 5]
        plain = [r.tokens_per_s for r in train if r.step % 10 == 0]
        print(f"tokens/s of the rows after an evaluation and checkpoint / the rows before one: "
              f"{statistics.median(after) / statistics.median(plain):.3f} ({len(after)} and "
              f"{len(plain)} rows, 2 workers ZeRO-2)")  # fmt: skip


if __name__ == "__main__":
    main()
