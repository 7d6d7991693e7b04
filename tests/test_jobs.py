"""submit / status / logs / stop against a real Ray head (`ray start --head`, token auth on).

The head is this module's own: its ports are free ones on 127.0.0.1, its token a fresh one,
and it is stopped by killing its process group, so the session's other Ray is left alone.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import STDLIB_MODULES

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    token = secrets.token_hex(32)
    dashboard = free_port()
    # its own temp folder: `ray start` records itself there (ray_current_cluster), and a
    # plain ray.init() elsewhere on this machine would otherwise try to join it
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": tmp,
           "PATH": f"{BIN}:{os.environ['PATH']}"}  # fmt: skip
    log_path = tmp_path_factory.mktemp("head") / "head.log"
    with open(log_path, "w") as log:
        ports = ["--port", "--dashboard-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
                 "--ray-client-server-port", "--node-manager-port", "--object-manager-port"]  # fmt: skip
        args = [f"{p}={dashboard if p == '--dashboard-port' else free_port()}" for p in ports]
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={tmp}/ray", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(f"{address}/api/jobs/",
                                                 headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                urllib.request.urlopen(request, timeout=2).close()
                break
            except OSError:
                time.sleep(1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"the Ray head did not come up; see {log_path}")
        yield {"address": address, "token": token}
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


def cli(*args, token: str | None, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    if home:  # no ~/.ray/auth_token to fall back on
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "llm_dist.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def write_spec(root: Path, max_steps: int) -> Path:
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
""")
    return spec


def wait_for(head, job_id: str, states: set[str], seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = cli("status", job_id, "--address", head["address"], token=head["token"])
        assert out.returncode == 0, out.stderr
        state = out.stdout.split(":")[1].split()[0]
        if state in states:
            return state
        time.sleep(2)
    raise AssertionError(f"{job_id} not in {states} after {seconds} s: {out.stdout}")


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
    assert f"val loss {result['val_loss_at_start']:.3f} -> {result['val_loss']:.3f}" in logs
    assert "step 10/10" in logs
    rows = (tmp_path / "runs" / "job" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    first = next(r for r in map(json.loads, rows) if r["kind"] == "train")
    print(
        f"\nsubmit -> first training step logged: {first['time'] - start:.1f} s "
        f"(step {first['step']}); submit -> done: {time.time() - start:.1f} s"
    )


def test_stop_ends_a_running_job(head, tmp_path):
    out = cli("submit", str(write_spec(tmp_path, 100_000)), "--address", head["address"],
              token=head["token"])  # fmt: skip
    job_id = re.search(r"submitted (\S+);", out.stdout).group(1)
    wait_for(head, job_id, {"RUNNING"}, 120)
    out = cli("stop", job_id, "--address", head["address"], token=head["token"])
    assert out.returncode == 0 and "stop requested" in out.stdout
    assert wait_for(head, job_id, {"STOPPED", "FAILED", "SUCCEEDED"}, 120) == "STOPPED"
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
