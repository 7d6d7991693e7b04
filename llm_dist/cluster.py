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
from llm_dist.console import console
from llm_dist.redact import check_shared_env, real_env


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
    if spec.cluster.address is not None:  # a shared cluster: its dashboard shows runtime_env
        check_shared_env(spec.cluster.env)
    else:
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
        runtime_env={"env_vars": env} if (env := real_env(spec.cluster.env)) else None,
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


DATA_CPUS = 1.0
"""CPUs a training stage keeps free beside its workers: Ray Data's read tasks (1 CPU each, by
default) stream the training data to the workers, and with no CPU free they wait forever."""


def ensure_room(spec, what: str, bundle: dict, count: int, strategy: str = "PACK",
                spare: float = 0.0) -> None:  # fmt: skip
    """Fail now, naming `what` asked for, when the cluster can never hold `count` × `bundle`.

    "Never" means: the nodes alive now cannot hold them, placed by `strategy`, and no
    autoscaler can add nodes. With an autoscaler, the nodes are asked for up front and the
    stage waits up to `cluster.scale_up_timeout_s` for them, so it fails instead of pending
    forever when no node type fits. Training workers keep `spare` CPUs free on one node beside
    them (`DATA_CPUS` at least, for Ray Data), and cannot count on what detached actors hold
    (Serve replicas kept serving on the cluster, say).
    """
    need = {k: v for k, v in bundle.items() if v}
    if need.get("GPU") and spec.cluster.accelerator_type:  # as Ray Train asks for it
        need[f"accelerator_type:{spec.cluster.accelerator_type}"] = 0.001
    training = spare > 0

    def nodes() -> list[dict]:
        return free_nodes() if training else [n["Resources"] for n in _alive()]

    fits = room(need, strategy, nodes(), spare)
    if fits >= count:
        return
    ask = f"{what}: {count} × {{{', '.join(f'{k}: {v:g}' for k, v in need.items())}}} ({strategy})"
    beside = ""
    if training:
        beside = f" with {spare:g} CPU left free for Ray Data to stream their training data"
    if not autoscaling(spec):
        fix = "ask for fewer or smaller workers, or add nodes"
        if training and room(need, strategy, nodes()) >= count:  # they fit, but leave no CPU
            fix = ("lower cluster.cpus_per_worker (a reservation, not a core: 0.5 lets two workers "
                   "share one), ask for fewer workers, or add a node")  # fmt: skip
        raise UserError(
            f"{ask} can never fit this cluster, which has no autoscaler: its nodes "
            f"({_nodes(training)}) hold {fits}{beside}; {fix}"
        )
    import ray.autoscaler.sdk

    timeout = spec.cluster.scale_up_timeout_s
    console.print(
        f"{ask}: the nodes hold {fits}{beside}; waiting up to {timeout:g} s for the autoscaler"
    )
    ray.autoscaler.sdk.request_resources(
        bundles=[need] * count + ([{"CPU": spare}] if spare else [])
    )
    start = time.monotonic()
    try:
        while (fits := room(need, strategy, nodes(), spare)) < count:
            if time.monotonic() - start > timeout:
                raise UserError(
                    f"{ask}: the autoscaler added no room for them in {timeout:g} s "
                    f"(cluster.scale_up_timeout_s); the nodes ({_nodes(training)}) hold "
                    f"{fits}{beside}. Check `ray status` for node types that fit, and their "
                    "max_workers"
                )
            time.sleep(2)
    finally:
        ray.autoscaler.sdk.request_resources()  # a request stays until replaced: clear it
    console.print(f"{what}: the autoscaler added the nodes in {time.monotonic() - start:.0f} s")


def room(need: dict, strategy: str, nodes: list[dict], spare: float = 0.0) -> int:
    """How many `need` bundles `nodes` (resource dicts) hold, placed by `strategy`, when one
    node also keeps `spare` CPUs free."""

    def count(nodes: list[dict]) -> int:
        # a small tolerance: 1.0 // 0.1 is 9 in floating point
        per_node = [min(math.floor(n.get(k, 0) / v + 1e-9) for k, v in need.items()) for n in nodes]
        if strategy == "STRICT_PACK":
            return max(per_node, default=0)
        if strategy == "STRICT_SPREAD":
            return sum(1 for n in per_node if n)
        return sum(per_node)

    if not spare:
        return count(nodes)
    return max((count([*nodes[:i], {**n, "CPU": n["CPU"] - spare}, *nodes[i + 1:]])
                for i, n in enumerate(nodes) if n.get("CPU", 0) >= spare), default=0)  # fmt: skip


def _alive() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def free_nodes() -> list[dict]:
    """Each alive node's resources less what detached actors on it hold: Serve replicas and
    other long-lived actors outlive the jobs around them. Needs Ray's state API (the
    dashboard); without it, nothing is counted as held."""
    from collections import Counter

    from ray.util.state import list_actors

    held: dict[str, Counter] = {}
    try:
        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000,
                             raise_on_missing_output=False)  # fmt: skip
    except Exception:  # no dashboard: the state API is an extra of Ray, not a must
        actors = []
    for a in actors:
        if a.is_detached and a.node_id:
            held.setdefault(a.node_id, Counter()).update(a.required_resources or {})
    return [{k: v - held.get(n["NodeID"], {}).get(k, 0) for k, v in n["Resources"].items()}
            for n in _alive()]  # fmt: skip


def _nodes(training: bool = False) -> str:
    """The alive nodes, counted by shape: `2 × CPU 8 GPU 1, 1 × CPU 0 GPU 0`; for `training`,
    with what detached actors hold of them."""
    from collections import Counter

    nodes = [n["Resources"] for n in _alive()]
    shapes = Counter(f"CPU {n.get('CPU', 0):g} GPU {n.get('GPU', 0):g}" for n in nodes)
    text = ", ".join(f"{k} × {shape}" for shape, k in shapes.items())
    if training:
        free = free_nodes()
        held = {k: sum(n.get(k, 0) for n in nodes) - sum(n.get(k, 0) for n in free)
                for k in ("CPU", "GPU")}  # fmt: skip
        if any(held.values()):
            text += (", of which detached actors such as Serve replicas hold "
                     + " ".join(f"{k} {v:g}" for k, v in held.items()))  # fmt: skip
    return text


def autoscaling(spec) -> bool:
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
