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
        f"its nodes hold {held} ({NODES}); ask for fewer or smaller workers, or add nodes"
    )
    assert time.monotonic() - start < 5


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
