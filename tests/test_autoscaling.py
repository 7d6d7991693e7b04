"""Autoscaling: a sweep submitted to a head with no CPUs makes Ray's autoscaler add worker nodes,
its trials run there, its results land on s3://, and the idle nodes are removed afterwards.

The head runs Ray's fake multi-node provider: its "nodes" are raylets on this machine that
the autoscaler starts and stops, driven by the same demand a cloud cluster's would be.
"""

import time
from pathlib import Path

import pytest
from conftest import S3_ENV
from ray_head import cli, get, ray_head, wait_for

pytestmark = pytest.mark.slow
WORKER_CPUS, MAX_WORKERS = 2, 3
IDLE_S = 15


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    config = {
        "cluster_name": "fake", "max_workers": MAX_WORKERS, "upscaling_speed": 2.0,
        "idle_timeout_minutes": IDLE_S / 60,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"}, "head_node_type": "ray.head.default",
        # nothing to copy or run on a fake node, but the autoscaler reads each of these
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": WORKER_CPUS}, "node_config": {},
                               "min_workers": 0, "max_workers": MAX_WORKERS},
        },
    }  # fmt: skip
    # the nodes' own S3 credentials and endpoint, as an instance role would give them
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}
    with ray_head(tmp_path_factory.mktemp("fake"), num_cpus=0, autoscaling=config, env=env) as h:
        yield h


def nodes(head) -> list[dict]:
    return get(head["address"], "/api/v0/nodes?detail=1&limit=100", head["token"])["data"][
        "result"
    ]["result"]


def spec(root: Path, storage: str, task: str, base: str, **cluster) -> Path:
    path = root / "spec.yaml"
    path.write_text(f"""
name: auto
storage_path: {storage}
stages: [tune]
data: {{seq_len: 64}}
model: {{preset: tiny, overrides: {{num_hidden_layers: 2}}}}
pretrain: {{precision: fp32, zero_stage: 2, log_every: 5}}
cluster: {cluster or {}}
tune:
  base_model: {base}
  task: {{sources: [{task}], format: sft, group_field: source, val_fraction: 0.15,
         test_fraction: 0.15}}
  max_steps: 4
  eval_every: 2
  micro_batch_size: 8
  lora_r: 4
  lora_target_modules: [q_proj, v_proj]
  scheduler: fifo
  max_concurrent_trials: 2
  num_samples: 1
  search_space: {{lr: {{grid: [1.0e-4, 1.0e-3]}}}}
""")
    return path


def test_a_sweep_on_a_cpu_less_head_adds_nodes_runs_there_and_they_go_when_idle(
    cluster, tmp_path, task, tiny_base, s3_server, monkeypatch
):
    import boto3
    from transformers import AutoModelForCausalLM

    from llm_dist.storage import filesystem, local_folder, read_json

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="sweeps")
    (head,) = nodes(cluster)
    assert head["resources_total"].get("CPU", 0) == 0

    start = time.monotonic()
    out = cli("submit", str(spec(tmp_path, "s3://sweeps/runs", task, tiny_base)),
              "--address", cluster["address"], token=cluster["token"])  # fmt: skip
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split("submitted ")[1].split(";")[0]
    state = wait_for(cluster, job_id, {"SUCCEEDED", "FAILED"}, 900)
    logs = cli("logs", job_id, "--address", cluster["address"], token=cluster["token"]).stdout
    (tmp_path / "job.log").write_text(logs)
    assert state == "SUCCEEDED", logs[-4000:]
    ran = time.monotonic() - start

    added = [n for n in nodes(cluster) if n["node_id"] != head["node_id"]]
    assert 1 <= len(added) <= MAX_WORKERS
    assert all(n["resources_total"]["CPU"] == WORKER_CPUS for n in added)
    assert "waiting up to 600 s for the autoscaler" in logs
    workers = get(cluster["address"], "/api/v0/actors?detail=1&limit=1000&filter_keys=class_name"
                  "&filter_predicates=%3D&filter_values=RayTrainWorker",
                  cluster["token"])["data"]["result"]["result"]  # fmt: skip
    assert len(workers) >= 2  # one per trial, each on an added node
    assert {w["node_id"] for w in workers} <= {n["node_id"] for n in added}

    winner = read_json("s3://sweeps/runs/auto/winner.json")
    assert winner["export"].startswith("s3://sweeps/runs/auto/tune/")
    s3, path = filesystem("s3://sweeps/runs/auto/tune/results.csv")
    with s3.open_input_stream(path) as f:
        # a header, the two trials and the un-tuned base's test figures
        assert len(f.read().decode().splitlines()) == 4
    model = AutoModelForCausalLM.from_pretrained(local_folder(winner["export"]))
    assert model.config.num_hidden_layers == 2

    ended = time.monotonic()
    while any(n["state"] == "ALIVE" for n in nodes(cluster) if n["node_id"] != head["node_id"]):
        assert time.monotonic() - ended < IDLE_S + 120, nodes(cluster)
        time.sleep(2)
    print(f"\nsweep of 2 trials: submit -> SUCCEEDED {ran:.0f} s on {len(added)} added "
          f"node(s); all removed {time.monotonic() - ended:.0f} s after")  # fmt: skip


def test_workers_no_node_type_fits_fail_after_the_scale_up_timeout(
    cluster, tmp_path, task, tiny_base
):
    path = spec(tmp_path, str(tmp_path / "runs"), task, tiny_base,
                cpus_per_worker=WORKER_CPUS + 1, scale_up_timeout_s=5)  # fmt: skip
    out = cli("submit", str(path), "--address", cluster["address"], token=cluster["token"])
    job_id = out.stdout.split("submitted ")[1].split(";")[0]
    assert wait_for(cluster, job_id, {"SUCCEEDED", "FAILED"}, 300) == "FAILED"
    logs = cli("logs", job_id, "--address", cluster["address"], token=cluster["token"]).stdout
    assert (
        "tune.num_workers: 1 × {CPU: 3} (PACK): the autoscaler added no room for them in 5 s "
        "(cluster.scale_up_timeout_s)"
    ) in logs
    assert "Traceback" not in logs
