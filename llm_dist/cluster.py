"""The `cluster:` section and connecting to Ray: an embedded local instance or the named cluster."""

import json
import math
import os
import signal
import threading
import time
from typing import Literal

from pydantic import Field

from llm_dist.base import Section, UserError


class ClusterConfig(Section):
    """Where the job runs and what each Ray Train worker asks Ray for."""

    address: str | None = None
    """Ray address: empty starts an embedded local Ray; `auto` joins the cluster this runs on."""
    use_gpu: Literal["auto", True, False] = "auto"
    """Train on GPUs: auto uses them when the cluster has any."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs reserved per training worker."""
    gpus_per_worker: float = Field(1.0, gt=0.0)
    """GPUs per training worker when GPUs are used."""
    accelerator_type: str | None = None
    """Ray accelerator type each worker needs (e.g. H100, A100), when GPUs are used."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places a run's workers on nodes."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables for every Ray worker (the job's runtime_env)."""
    scale_up_timeout_s: float = Field(600.0, gt=0)
    """How long a stage waits for the autoscaler to add the nodes its workers need before failing."""


def connect(spec) -> None:
    """Join the Ray the spec names (`cluster.address`), or start an embedded local one.

    A Ray already initialised in this process (a test session, a Ray job's driver) is reused.
    """
    import ray

    if ray.is_initialized():
        return
    num_cpus = None
    if spec.cluster.address is None:
        # Logical CPUs, not cores: Ray Data needs free slots to read the training workers'
        # shards, or it waits forever behind workers that hold every CPU.
        trials = spec.tune.max_concurrent_trials or 1
        held = max(spec.pretrain.num_workers, trials * spec.tune.num_workers)
        held *= spec.cluster.cpus_per_worker
        s = spec.serve
        replicas = s.autoscaling.max_replicas if s.autoscaling else s.num_replicas
        held = max(held, replicas * s.cpus_per_replica)
        num_cpus = max(os.cpu_count() or 1, math.ceil(held) + 2)
    ray.init(
        # "local" starts a new instance even when `ray start` left a cluster on this machine
        address=spec.cluster.address or "local",
        num_cpus=num_cpus,
        runtime_env={"env_vars": spec.cluster.env} if spec.cluster.env else None,
        log_to_driver=True,
    )
    # Ray's driver takes SIGTERM for itself (a stack dump, then exit 15). A container's or a
    # process manager's stop must do what Ctrl-C does: Tune saves its sweep, a stage tears down.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


SIGTERM_RECEIVED = threading.Event()
"""Set once this process got SIGTERM, which it handles as Ctrl-C (the CLI then exits 143)."""


def _sigterm(signum, frame) -> None:
    SIGTERM_RECEIVED.set()
    ctrl_c = signal.getsignal(signal.SIGINT)  # Python's KeyboardInterrupt, or Tune's own
    if not callable(ctrl_c):
        raise KeyboardInterrupt
    ctrl_c(signal.SIGINT, frame)


def use_gpu(spec) -> bool:
    """Whether training workers get GPUs: `cluster.use_gpu`, with auto meaning the cluster has some."""
    import ray

    if spec.cluster.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return spec.cluster.use_gpu


def worker_resources(spec) -> dict[str, float]:
    """What one training worker asks Ray for: `cluster.cpus_per_worker`, and GPUs when used."""
    resources = {"CPU": spec.cluster.cpus_per_worker}
    if use_gpu(spec):
        resources["GPU"] = spec.cluster.gpus_per_worker
    return resources


def ensure_room(spec, what: str, bundle: dict, count: int, strategy: str = "PACK") -> None:
    """Fail now, naming `what` asked for, when the cluster can never hold `count` × `bundle`.

    "Never" means: the nodes alive now cannot hold them, placed by `strategy`, and no
    autoscaler can add nodes. With an autoscaler, the nodes are asked for up front and the
    stage waits up to `cluster.scale_up_timeout_s` for them, so it fails instead of pending
    forever when no node type fits.
    """
    need = {k: v for k, v in bundle.items() if v}
    if need.get("GPU") and spec.cluster.accelerator_type:  # as Ray Train asks for it
        need[f"accelerator_type:{spec.cluster.accelerator_type}"] = 0.001
    room = _room(need, strategy)
    if room >= count:
        return
    ask = f"{what}: {count} × {{{', '.join(f'{k}: {v:g}' for k, v in need.items())}}} ({strategy})"
    if not _autoscaling(spec):
        raise UserError(
            f"{ask} can never fit this cluster, which has no autoscaler: its nodes hold {room} "
            f"({_nodes()}); ask for fewer or smaller workers, or add nodes"
        )
    import ray.autoscaler.sdk

    timeout = spec.cluster.scale_up_timeout_s
    print(f"{ask}: the nodes hold {room}; waiting up to {timeout:g} s for the autoscaler")
    ray.autoscaler.sdk.request_resources(bundles=[need] * count)
    start = time.monotonic()
    try:
        while (room := _room(need, strategy)) < count:
            if time.monotonic() - start > timeout:
                raise UserError(
                    f"{ask}: the autoscaler added no room for them in {timeout:g} s "
                    f"(cluster.scale_up_timeout_s); the nodes hold {room} ({_nodes()}). "
                    "Check `ray status` for node types that fit, and their max_workers"
                )
            time.sleep(2)
    finally:
        ray.autoscaler.sdk.request_resources()  # a request stays until replaced: clear it
    print(f"{what}: the autoscaler added the nodes in {time.monotonic() - start:.0f} s")


def _room(need: dict, strategy: str) -> int:
    """How many `need` bundles the alive nodes' total resources hold, placed by `strategy`."""
    import ray

    per_node = [min(int(n["Resources"].get(k, 0) // v) for k, v in need.items())
                for n in ray.nodes() if n["Alive"]]  # fmt: skip
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n)
    return sum(per_node)


def _nodes() -> str:
    """The alive nodes, counted by shape: `2 × CPU 8 GPU 1, 1 × CPU 0 GPU 0`."""
    from collections import Counter

    import ray

    shapes = Counter(f"CPU {n['Resources'].get('CPU', 0):g} GPU {n['Resources'].get('GPU', 0):g}"
                     for n in ray.nodes() if n["Alive"])  # fmt: skip
    return ", ".join(f"{k} × {shape}" for shape, k in shapes.items())


def _autoscaling(spec) -> bool:
    """Whether an autoscaler can add nodes to this cluster (never to the embedded Ray).

    Ray publishes no such flag. Autoscaler v2 says so in GCS; v1 reports its node types in its
    status, and a cluster started without an autoscaling config (a plain `ray start`) reports
    read-only mirrors of its own nodes there, named `node_<id>`.
    """
    from ray._private import ray_constants
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if spec.cluster.address is None:
        return False
    if is_autoscaler_v2(fetch_from_server=True):
        return True
    for _ in range(10):  # a cluster that has just started may not have reported yet
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = json.loads(status).get("autoscaler_report") if status else None
        if report:
            types = report.get("node_type_mapping") or {}
            return any(t != f"node_{i}" for i, t in types.items())
        time.sleep(1)
    return False
