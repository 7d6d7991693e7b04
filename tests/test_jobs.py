"""submit / status / logs / stop against a real Ray head (`ray start --head`, token auth on)."""

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import STDLIB_MODULES
from ray_head import cli, ray_head, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("head"), num_cpus=4) as running:
        yield running


SECRET = "s3cr3t-7f1c9e"


def write_spec(root: Path, max_steps: int, env: str = "LLM_DIST_NOTE") -> Path:
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus.jsonl"
    blocks = [b for m in STDLIB_MODULES for b in (lib / m).read_text().split("\n\n") if b.strip()]
    corpus.write_text("".join(json.dumps({"text": b}) + "\n" for b in blocks))
    spec = root / "spec.yaml"
    spec.write_text(f"""
name: job
storage_path: {root}/runs
stages: [data, pretrain]
data: {{sources: [{corpus}], seq_len: 64, tokenizer: {{vocab_size: 512}}}}
model: {{preset: tiny, overrides: {{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128}}}}
pretrain: {{num_workers: 2, zero_stage: 2, precision: fp32, micro_batch_size: 4,
           max_steps: {max_steps}, warmup_steps: 2, log_every: 1, eval_every: 1000,
           checkpoint_every: 1000}}
cluster: {{env: {{{env}: {SECRET}}}}}
""")
    return spec


def test_a_submitted_spec_runs_and_its_logs_show_the_final_loss(head, tmp_path):
    spec = write_spec(tmp_path, 10)
    start = time.time()
    out = cli("submit", str(spec), "--address", head["address"],
              token=head["token"])  # fmt: skip
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"submitted (\S+);", out.stdout).group(1)
    assert head["token"] not in out.stdout + out.stderr
    state = wait_for(head, job_id, {"SUCCEEDED", "FAILED"}, 600)
    logs = cli("logs", job_id, "--address", head["address"], token=head["token"]).stdout
    assert state == "SUCCEEDED", logs[-3000:]
    result = json.loads((tmp_path / "runs" / "job" / "pretrain" / "result.json").read_text())
    assert f"val loss {result['val_loss_at_start']:.3f} -> {result['val']['val_loss']:.3f}" in logs
    assert "step 10/10" in logs
    # the console is llm-dist's own; Ray's, torch's and the workers' output is in the run's log
    full = (tmp_path / "runs" / "job" / "logs" / "llm-dist.log").read_text()
    for chatter in ("Started training worker group", "Setting up process group", "WARNING"):
        assert chatter in full and chatter not in logs, chatter
    assert len(logs.splitlines()) <= 45, logs
    # a cluster.env value reaches the job through Ray's runtime_env only: it is on no command
    # line and in no file of the run (manifest, spec, logs, checkpoints, Ray Train's state)
    request = urllib.request.Request(f"{head['address']}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {head['token']}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        info = json.loads(response.read())
    assert SECRET not in info["entrypoint"] and "LLM_DIST_SPEC" in info["entrypoint"]
    assert SECRET not in json.dumps(info["metadata"]) + logs
    leaked = [
        f
        for f in (tmp_path / "runs").rglob("*")
        if f.is_file() and SECRET.encode() in f.read_bytes()
    ]
    assert leaked == []
    manifest = json.loads((tmp_path / "runs" / "job" / "manifest.json").read_text())
    assert manifest["spec"]["cluster"]["env"] == {"LLM_DIST_NOTE": "<redacted>"}
    rows = (tmp_path / "runs" / "job" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    first = next(r for r in map(json.loads, rows) if r["kind"] == "train")
    print(
        f"\nsubmit -> first training step logged: {first['time'] - start:.1f} s "
        f"(step {first['step']}); submit -> done: {time.time() - start:.1f} s"
    )


def test_a_secret_named_in_cluster_env_is_not_submitted(head, tmp_path):
    """Ray shows a job's runtime_env to everyone who lists the cluster's jobs: a cluster.env
    name that says it is a secret is refused before anything is sent."""
    spec = write_spec(tmp_path, 10, env="LLM_DIST_API_KEYS")
    out = cli("submit", str(spec), "--address", head["address"], token=head["token"])
    assert out.returncode != 0 and SECRET not in out.stdout + out.stderr
    assert (
        "cluster.env.LLM_DIST_API_KEYS: on a shared cluster Ray shows a job's environment to "
        "everyone who can list its jobs" in out.stderr
    )
    assert not (tmp_path / "runs").exists()


def test_stop_ends_a_running_job(head, tmp_path):
    out = cli("submit", str(write_spec(tmp_path, 100_000)), "--address", head["address"],
              token=head["token"])  # fmt: skip
    job_id = re.search(r"submitted (\S+);", out.stdout).group(1)
    wait_for(head, job_id, {"RUNNING"}, 120)
    deadline = time.monotonic() + 300  # stopped while it trains
    while "step 1/" not in cli("logs", job_id, "--address", head["address"],
                               token=head["token"]).stdout:  # fmt: skip
        assert time.monotonic() < deadline
        time.sleep(2)
    out = cli("stop", job_id, "--address", head["address"], token=head["token"])
    assert out.returncode == 0 and "stop requested" in out.stdout
    assert wait_for(head, job_id, {"STOPPED", "FAILED", "SUCCEEDED"}, 120) == "STOPPED"
    logs = cli("logs", job_id, "--address", head["address"], token=head["token"]).stdout
    assert "pretrain: interrupted; run the same spec again to resume" in logs  # a clean stop,
    assert "llm-dist: stopped by SIGTERM" in logs  # not Ray's stack dump and a kill
    full = (tmp_path / "runs" / "job" / "logs" / "llm-dist.log").read_text()
    assert "SIGTERM received" not in logs + full
    out = cli("stop", job_id, "--address", head["address"], token=head["token"])
    assert out.returncode == 0 and "already ended" in out.stdout


def test_requests_without_the_token_are_refused(head, tmp_path):
    body = json.dumps({"entrypoint": "echo pwned"}).encode()
    for method, path, data in (("POST", "/api/jobs/", body), ("DELETE", "/api/jobs/x", None)):
        request = urllib.request.Request(f"{head['address']}{path}", data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 401
    spec = str(write_spec(tmp_path, 10))
    out = cli("submit", spec, "--address", head["address"], token=None, home=tmp_path)
    assert out.returncode == 2 and "requires a Ray auth token and none was sent" in out.stderr
    out = cli("submit", spec, "--address", head["address"], token="wrong", home=tmp_path)
    assert out.returncode == 2 and "refused the Ray auth token" in out.stderr
    assert "wrong" not in out.stderr
    out = cli("status", "raysubmit_nope", "--address", head["address"], token=head["token"])
    assert out.returncode == 2 and "no job 'raysubmit_nope' on" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_workers_that_take_every_cpu_fail_at_once_instead_of_waiting(tmp_path):
    """A 2-CPU head and 2 workers × 1 CPU: Ray Data would have no CPU left to stream their
    data and the job would stay RUNNING forever; it fails at once, naming what to change."""
    with ray_head(tmp_path, num_cpus=2) as small:
        start = time.monotonic()
        out = cli("submit", str(write_spec(tmp_path, 10)), "--address", small["address"],
                  token=small["token"])  # fmt: skip
        job_id = re.search(r"submitted (\S+);", out.stdout).group(1)
        state = wait_for(small, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}, 240)
        logs = cli("logs", job_id, "--address", small["address"], token=small["token"]).stdout
    assert state == "FAILED", logs[-3000:]
    assert (
        "pretrain.num_workers: 2 × {CPU: 1} (PACK) can never fit this cluster, which has no "
        "autoscaler: its nodes (1 × CPU 2 GPU 0) hold 1 with 1 CPU left free for Ray Data to "
        "stream their training data; lower cluster.cpus_per_worker"
    ) in logs
    assert "Traceback" not in logs
    # before the data stage: on a cluster no autoscaler grows, `run` checks the room first
    manifest = json.loads((tmp_path / "runs" / "job" / "manifest.json").read_text())
    assert manifest["stages"] == {}, manifest["stages"]
    print(
        f"\n2 workers × 1 CPU on a 2-CPU head: FAILED {time.monotonic() - start:.0f} s after submit"
    )
