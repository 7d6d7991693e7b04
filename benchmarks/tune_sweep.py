"""Tune sweep overhead and ASHA vs FIFO, side by side in one run.

One search space (a 2 x 2 grid of learning rate x method, 4 samples each: 16 trials, 2 at a
time) is swept twice from the same small base model on the standard library's signature ->
docstring pairs: first with FIFO (every trial to the end), then with ASHA. Printed:

- Tune's overhead: the FIFO sweep's wall time over (sum of the trials' own times / concurrency),
  the wall time a perfect scheduler would need for the same trials. A trial's own time is
  Tune's `time_total_s` (its start to its last report).
- Training's share: the FIFO sweep's wall time over (sum of the trials' training time /
  concurrency), a trial's training time being its first optimizer step (the `started` event
  in its metrics.jsonl) to its last row: what the trials' starts and ends cost on top.
- Time to best: each sweep's wall time until its winner is known, their ratio, and the
  winners' validation loss (ASHA should end sooner with the same or a near winner).

The wall times cover the sweep alone (`sweep_seconds` in winner.json: `Tuner.fit`; the task
data is prepared beforehand and the winner's test scoring is timed apart).

    python benchmarks/tune_sweep.py [MAX_STEPS]   (default 30)
"""

import json
import sys
import sysconfig
import tempfile
from pathlib import Path

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "shlex.py",
           "argparse.py", "calendar.py", "fractions.py", "statistics.py", "difflib.py",
           "ftplib.py", "gettext.py", "imaplib.py", "mailbox.py", "pprint.py", "random.py",
           "smtplib.py", "tarfile.py", "zipfile.py", "configparser.py"]  # fmt: skip


def task_config(task: str) -> dict:
    return {"sources": [task], "format": "sft", "group_field": "source", "val_fraction": 0.15,
            "test_fraction": 0.15}  # fmt: skip


def setup(root: Path) -> tuple[str, str]:
    """A base model folder (BPE tokenizer, random Llama weights) and the task JSONL."""
    import ast

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_dist.data.stdlib import _signature_docstrings
    from llm_dist.data.tokenizer import train_bpe

    lib = Path(sysconfig.get_paths()["stdlib"])
    task = root / "pairs.jsonl"
    with open(task, "w") as f:
        for m in MODULES:
            for prompt, response in _signature_docstrings(ast.parse((lib / m).read_text())):
                f.write(json.dumps({"prompt": prompt, "response": response, "source": m}) + "\n")
    tokenizer = train_bpe([(lib / m).read_text() for m in MODULES], 1024, 64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=256, vocab_size=len(tokenizer), max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return str(root / "base"), str(task)


def prepared(root: Path) -> tuple[str, str]:
    """`setup`, then the task prepared once for that base: every sweep after reuses it."""
    from llm_dist.spec import JobSpec
    from llm_dist.tune.task import prepare_task

    base, task = setup(root)
    spec = JobSpec(name="prep", storage_path=str(root), stages=["tune"], data={"seq_len": 64},
                   tune={"base_model": base, "search_space": {"lr": {"choice": [1e-3]}},
                         "task": task_config(task)})  # fmt: skip
    prepare_task(spec, base)
    return base, task


def sweep(root: Path, base: str, task: str, scheduler: str) -> dict:
    from llm_dist.spec import JobSpec
    from llm_dist.tune.run import run_stage

    spec = JobSpec(
        name=scheduler, storage_path=str(root), stages=["tune"], data={"seq_len": 64},
        pretrain={"precision": "fp32", "zero_stage": 2},
        tune={"base_model": base, "task": task_config(task),
              "max_steps": STEPS, "eval_every": 5, "micro_batch_size": 8, "lora_r": 4,
              "max_concurrent_trials": 2, "scheduler": scheduler, "reduction_factor": 3,
              "search_space": {"lr": {"grid": [3e-4, 3e-3]}, "method": {"grid": ["full", "lora"]}}},
    )  # fmt: skip
    from llm_dist.run_folder import RunFolder

    winner = run_stage(spec, str(root / scheduler))
    folder = RunFolder(str(root / scheduler))
    rows = [r for r in folder.read_results() if r.trial_id != "base"]
    training = 0.0
    for trial_id in folder.trial_ids():
        metrics = folder.trial(trial_id).read_metrics()
        started = next(r for r in metrics if r.event == "started")
        training += max(r.time for r in metrics if r.kind in ("train", "eval")) - started.time
    return {
        "sweep_s": winner.sweep_seconds,
        "scoring_s": winner.scoring_seconds,
        "trial_s": sum(r.seconds for r in rows if r.seconds),
        "training_s": training,
        "winner": winner.value,
        "rows": rows,
    }


def main() -> None:
    import ray

    ray.init(
        address="local", num_cpus=4, log_to_driver=False
    )  # with the dashboard: see tests/conftest.py
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, task = prepared(root)
        fifo = sweep(root, base, task, "fifo")
        asha = sweep(root, base, task, "asha")
    ideal = fifo["trial_s"] / 2
    print(
        f"{len(fifo['rows'])} trials x {STEPS} steps, 2 at a time, on {ray.cluster_resources()['CPU']:.0f} logical CPUs"
    )
    for name, r in (("fifo", fifo), ("asha", asha)):
        statuses = ", ".join(f"{x.trial_id} {x.status} at step {x.step}" for x in r["rows"])
        print(
            f"{name}: sweep {r['sweep_s']:.1f} s, trials' own time {r['trial_s']:.1f} s, "
            f"winner val loss {r['winner']:.4f}, scoring {r['scoring_s']:.1f} s ({statuses})"
        )
    print(f"Tune overhead (fifo sweep / (trial time / 2)): {fifo['sweep_s'] / ideal:.2f}")
    for name, r in (("fifo", fifo), ("asha", asha)):
        print(f"{name} sweep / (training time / 2): {r['sweep_s'] / (r['training_s'] / 2):.2f} "
              f"({r['training_s']:.1f} s of training)")  # fmt: skip
    print(
        f"time to best, asha / fifo: {asha['sweep_s'] / fifo['sweep_s']:.2f}; "
        f"winner val loss asha {asha['winner']:.4f} vs fifo {fifo['winner']:.4f}"
    )


if __name__ == "__main__":
    main()
