"""The shipped cluster configs: launcher YAMLs against Ray's own schema, KubeRay manifests' fields."""

import json
import os
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).parent.parent / "cluster"
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))


def ray_schema() -> dict:
    import ray

    return json.loads(
        Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text()
    )


@pytest.mark.parametrize("path", LAUNCHER, ids=[p.name for p in LAUNCHER])
def test_launcher_config_follows_rays_schema(path):
    import jsonschema

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing heavy lands on the head
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(0 == t["min_workers"] <= t["max_workers"] for t in workers)
    assert config["idle_timeout_minutes"] > 0
    cheap = [t for t in workers if "InstanceMarketOptions" in t["node_config"]
             or {"preemptible": True} in t["node_config"].get("scheduling", [])]  # fmt: skip
    assert cheap, "a spot / preemptible worker type"
    assert config["file_mounts"]["~/llm-dist"] == "."
    assert "pip install -e ~/llm-dist" in config["setup_commands"]
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])


def test_launcher_schema_check_catches_a_bad_field():
    import jsonschema

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["gpu_a10g"]["min_workers"] = "none"
    with pytest.raises(jsonschema.ValidationError, match="'none' is not of type 'integer'"):
        jsonschema.validate(config, ray_schema())


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] and spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        assert container["name"] and container["image"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "llm-dist-ray-token"
    for worker in spec["workerGroupSpecs"]:
        assert worker["groupName"]
        assert 0 <= worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
        limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


def test_kuberay_raycluster_has_the_required_fields():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    check_cluster_spec(cluster["spec"])


def test_kuberay_rayjob_runs_a_valid_spec():
    from llm_dist.spec import JobSpec

    config_map, job = yaml.safe_load_all((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    mount = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    path = mount["containers"][0]["volumeMounts"][0]["mountPath"]
    assert job["spec"]["entrypoint"] == f"python -m llm_dist.cli run {path}/spec.yaml"
    assert mount["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    check_cluster_spec(job["spec"]["rayClusterSpec"])
    spec = JobSpec(**yaml.safe_load(config_map["data"]["spec.yaml"]))
    assert spec.storage_path.startswith("s3://") and spec.cluster.address == "auto"
