"""Where a sweep's trials spend their start, and the sweep's fixed cost per trial.

Two sweeps of the same 6 trials (lr 3e-4 / 1e-3 / 3e-3 x method full / LoRA r=4, FIFO, no task
metrics, one evaluation at the end besides step 0, 2 trials at a time, 1 worker each, ZeRO-2,
fp32) differ only in their steps, S and 2S, on `benchmarks/tune_sweep.py`'s base model and task.
Printed:

- the fixed wall time per trial: (2 T(S) - T(2S)) / trials, T a sweep's wall time (`Tuner.fit`);
- each start phase (the `started` event each trial's rank 0 writes to its metrics.jsonl,
  `llm_dist.train.metrics.Phases`), for the sweep's first trial and the median of the others,
  and the end's phases (`finished`);
- the median time from a trial's launch to its first optimizer step, trials after the first;
- the sweep's wall time over (sum of the trials' training time / 2), a trial's training time
  being its first optimizer step to its last row.

    python benchmarks/trial_start.py [S]   (default 20)
"""

import statistics
import sys
import tempfile
from pathlib import Path

from tune_sweep import prepared, task_config

S = int(sys.argv[1]) if len(sys.argv) > 1 else 20
CONCURRENCY = 2


def sweep(root: Path, base: str, task: str, steps: int) -> dict:
    from llm_dist.run_folder import RunFolder
    from llm_dist.spec import JobSpec
    from llm_dist.tune.run import run_stage

    name = f"s{steps}"
    spec = JobSpec(
        name=name, storage_path=str(root), stages=["tune"], data={"seq_len": 64},
        pretrain={"precision": "fp32", "zero_stage": 2},
        tune={"base_model": base, "task": task_config(task), "num_samples": 1,
              "max_steps": steps, "eval_every": steps, "micro_batch_size": 8, "lora_r": 4,
              "max_concurrent_trials": CONCURRENCY, "scheduler": "fifo",
              "search_space": {"lr": {"grid": [3e-4, 1e-3, 3e-3]},
                               "method": {"grid": ["full", "lora"]}}},
    )  # fmt: skip
    winner = run_stage(spec, str(root / name))
    folder = RunFolder(str(root / name))
    trials = []
    for trial_id in folder.trial_ids():
        rows = folder.trial(trial_id).read_metrics()
        started = next(r for r in rows if r.event == "started")
        finished = next(r for r in rows if r.event == "finished")
        last = max(r.time for r in rows if r.kind in ("train", "eval"))
        trials.append({"start": started.phases, "end": finished.phases,
                       "launched": started.time - sum(started.phases.values()),
                       "training": last - started.time})  # fmt: skip
    trials.sort(key=lambda t: t["launched"])
    return {"wall": winner.sweep_seconds, "trials": trials}


def main() -> None:
    import ray
    from deepspeed.comm.torch import build_shm_op

    # DeepSpeed JIT-builds a CPU comm op the first time a process group starts on a machine
    # (31 s here, then cached): a machine's cost, not a trial's, so it is paid before the clock
    build_shm_op()
    ray.init(address="local", num_cpus=4, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, task = prepared(root)
        short, long = sweep(root, base, task, S), sweep(root, base, task, 2 * S)
    n = len(short["trials"])
    print(f"{n} trials, {CONCURRENCY} at a time; sweep wall time: {short['wall']:.1f} s at {S} "
          f"steps, {long['wall']:.1f} s at {2 * S}")  # fmt: skip
    print(f"fixed wall time per trial: {(2 * short['wall'] - long['wall']) / n:.2f} s")
    for name, r in ((f"S={S}", short), (f"2S={2 * S}", long)):
        first, rest = r["trials"][0], r["trials"][1:]
        print(f"{name}: start phases, s (first trial | median of the other {len(rest)}):")
        for phase in first["start"]:
            others = statistics.median(t["start"].get(phase, 0.0) for t in rest)
            print(f"  {phase:<14} {first['start'][phase]:7.2f} | {others:7.2f}")
        for phase in first["end"]:
            others = statistics.median(t["end"].get(phase, 0.0) for t in rest)
            print(f"  end: {phase:<9} {first['end'][phase]:7.2f} | {others:7.2f}")
        to_step = statistics.median(sum(t["start"].values()) for t in rest)
        training = sum(t["training"] for t in r["trials"])
        print(
            f"  launch to first optimizer step, median of trials after the first: {to_step:.2f} s"
        )
        print(f"  sweep wall / (sum of training time / {CONCURRENCY}): "
              f"{r['wall'] / (training / CONCURRENCY):.2f} ({training:.1f} s of training)")  # fmt: skip


if __name__ == "__main__":
    main()
