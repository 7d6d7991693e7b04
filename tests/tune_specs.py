"""Specs and result rows shared by the tune stage's tests."""

import csv
from pathlib import Path

from llm_dist.spec import JobSpec


def spec_for(root: Path, task: str, base: str, **tune) -> JobSpec:
    tune = {"base_model": base, "task": {"sources": [task], "format": "sft", "group_field": "source",
            "val_fraction": 0.15, "test_fraction": 0.15},
            "max_steps": 20, "eval_every": 5,
            "micro_batch_size": 8, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"],
            "max_concurrent_trials": 2, "num_samples": 1, **tune}  # fmt: skip
    return JobSpec(
        name="t", storage_path=str(root), stages=["tune"], data={"seq_len": 64},
        model={"preset": "tiny", "overrides": {"num_hidden_layers": 2}},
        pretrain={"precision": "fp32", "zero_stage": 2, "log_every": 5}, tune=tune,
    )  # fmt: skip


def results(run: Path, base: bool = False) -> list[dict]:
    """The trials' rows of results.csv, or with `base` the un-tuned base's (its test figures)."""
    with open(run / "tune" / "results.csv") as f:
        return [r for r in csv.DictReader(f) if (r["trial_id"] == "base") == base]
