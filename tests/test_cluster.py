"""Room for a stage's workers: a spec asking more than a cluster without an autoscaler holds fails
at once, naming what it asked for, instead of pending forever.

The session's Ray is one 4-CPU node with no GPU and no autoscaler. The autoscaler's side
(waiting for nodes it adds) is in test_autoscaling.py.
"""

import subprocess
import sys
import time

import pytest

from llm_dist.base import UserError
from llm_dist.cluster import ensure_room
from llm_dist.spec import JobSpec

pytestmark = pytest.mark.slow
NODES = "1 × CPU 4 GPU 0"


def spec(**cluster) -> JobSpec:
    return JobSpec(name="room", storage_path="/tmp/unused", stages=["serve"], cluster=cluster)


def test_workers_that_fit_pass_at_once(ray_session):
    start = time.monotonic()
    ensure_room(spec(), "pretrain.num_workers", {"CPU": 1}, 4)
    ensure_room(spec(), "pretrain.num_workers", {"CPU": 2}, 2, "STRICT_PACK")
    ensure_room(spec(), "serve replicas", {"CPU": 1, "GPU": 0}, 3)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("bundle", "count", "strategy", "asked", "held"),
    [
        ({"CPU": 2}, 3, "PACK", "3 × {CPU: 2} (PACK)", 2),
        ({"CPU": 1}, 2, "STRICT_SPREAD", "2 × {CPU: 1} (STRICT_SPREAD)", 1),
        ({"CPU": 3}, 2, "SPREAD", "2 × {CPU: 3} (SPREAD)", 1),
        ({"CPU": 1, "GPU": 1}, 2, "PACK", "2 × {CPU: 1, GPU: 1} (PACK)", 0),
    ],
)
def test_more_than_the_nodes_hold_fails_at_once_naming_it(
    ray_session, bundle, count, strategy, asked, held
):
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        ensure_room(spec(), "pretrain.num_workers", bundle, count, strategy)
    assert str(e.value) == (
        f"pretrain.num_workers: {asked} can never fit this cluster, which has no autoscaler: "
        f"its nodes ({NODES}) hold {held}; ask for fewer or smaller workers, or add nodes"
    )
    assert time.monotonic() - start < 5


def test_training_workers_leave_a_cpu_for_ray_data(ray_session):
    """Workers that would take every CPU leave Ray Data none to stream their data: refused at
    once, naming the fix, instead of a job that stays RUNNING with no progress."""
    ensure_room(spec(), "pretrain.num_workers", {"CPU": 1}, 3, spare=1)  # 3 + 1 for data
    ensure_room(spec(), "pretrain.num_workers", {"CPU": 0.1}, 30, spare=1)  # 30 × 0.1 is 3
    with pytest.raises(UserError) as e:
        ensure_room(spec(), "pretrain.num_workers", {"CPU": 2}, 2, spare=1)
    assert str(e.value) == (
        "pretrain.num_workers: 2 × {CPU: 2} (PACK) can never fit this cluster, which has no "
        f"autoscaler: its nodes ({NODES}) hold 1 with 1 CPU left free for Ray Data to "
        "stream their training data; lower cluster.cpus_per_worker (a reservation, not a core: 0.5 "
        "lets two workers share one), ask for fewer workers, or add a node"
    )


def test_concurrent_trials_leave_a_cpu_for_ray_data(ray_session):
    from llm_dist.tune.run import ensure_trials_fit

    def tune_spec(**tune) -> JobSpec:
        return JobSpec(name="room", storage_path="/tmp/unused", stages=["tune"],
                       tune={"base_model": "/tmp/unused", "task": {"sources": ["x.jsonl"]},
                             "search_space": {"lr": {"choice": [1e-3]}},
                             **tune})  # fmt: skip

    # 4 CPUs: 1 stays free for Ray Data, 0.01 for each trial's own actor
    assert ensure_trials_fit(tune_spec(num_workers=2)) == 1
    assert ensure_trials_fit(tune_spec(num_workers=1)) == 2
    assert ensure_trials_fit(tune_spec(num_workers=1, max_concurrent_trials=2)) == 2
    with pytest.raises(UserError, match=(
        r"^tune.max_concurrent_trials × tune.num_workers: 3 × \{CPU: 1\} \(PACK\) can never "
        r"fit this cluster, which has no autoscaler: its nodes \(1 × CPU 4 GPU 0\) hold 2 "
        r"with 1.03 CPU left free for Ray Data")):  # fmt: skip
        ensure_trials_fit(tune_spec(num_workers=1, max_concurrent_trials=3))


def test_an_accelerator_type_the_nodes_lack_is_asked_for_too(ray_session):
    ray_session.available_resources()  # the session is up
    with pytest.raises(UserError, match=r"1 × \{CPU: 1, GPU: 1, accelerator_type:H100: 0.001\}"):
        ensure_room(spec(accelerator_type="H100"), "tune.num_workers", {"CPU": 1, "GPU": 1}, 1)


def test_the_cli_refuses_a_gpu_replica_on_a_machine_without_gpus(tmp_path, tiny_base):
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: g\nstorage_path: {tmp_path}\nstages: [serve]\n"
                    f"serve: {{model: {tiny_base}, gpus_per_replica: 1}}\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "llm_dist.cli", "serve", str(path)],
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "serve replicas: 1 × {CPU: 1, GPU: 1} (PACK) can never fit this cluster" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "g" / "serve").exists()  # nothing was deployed
