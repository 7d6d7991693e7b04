"""The generated DeepSpeed config: its fields, and a DeepSpeed engine that matches plain torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_dist.train.config import PretrainConfig
from llm_dist.train.deepspeed_config import deepspeed_config, lr_lambda

SCRIPT = Path(__file__).parent / "scripts" / "deepspeed_vs_torch.py"


def test_config_follows_the_spec():
    p = PretrainConfig(num_workers=4, micro_batch_size=2, global_batch_size=32, zero_stage=3,
                       offload_optimizer=True, offload_params=True, precision="bf16",
                       deepspeed={"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True})  # fmt: skip
    c = deepspeed_config(p, use_gpu=True)
    assert (
        c["train_batch_size"],
        c["train_micro_batch_size_per_gpu"],
        c["gradient_accumulation_steps"],
    ) == (32, 2, 4)
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert c["zero_optimization"]["overlap_comm"] is True  # extras merge into generated sections
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["wall_clock_breakdown"] is True
    assert c["optimizer"]["params"]["torch_adam"] is False  # CPU Adam with offload


def test_lr_schedule():
    p = PretrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    at = lr_lambda(p)
    assert at(0) == pytest.approx(1 / 11) and at(9) == pytest.approx(10 / 11)
    assert at(10) == pytest.approx(1.0)
    assert at(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert at(100) == pytest.approx(0.1) and at(500) == pytest.approx(0.1)
    flat = lr_lambda(PretrainConfig(max_steps=100, warmup_steps=10, schedule="constant"))
    assert flat(50) == flat(99) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_engine_matches_plain_torch(zero_stage):
    out = subprocess.run([sys.executable, str(SCRIPT), str(zero_stage), str(29600 + zero_stage)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    curves = json.loads(out.stdout.strip().splitlines()[-1])
    assert curves["plain"][-1] < curves["plain"][0] - 0.5  # it learns
    assert curves["deepspeed"] == pytest.approx(curves["plain"], rel=1e-4, abs=1e-4)
