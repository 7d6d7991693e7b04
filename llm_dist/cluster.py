"""The `cluster:` section and connecting to Ray: an embedded local instance or the named cluster."""

import math
import os
from typing import Literal

from pydantic import Field

from llm_dist.base import Section


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


def use_gpu(spec) -> bool:
    """Whether training workers get GPUs: `cluster.use_gpu`, with auto meaning the cluster has some."""
    import ray

    if spec.cluster.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return spec.cluster.use_gpu
