"""A real Ray head for the cluster tests (`ray start --head --block`, token auth on), and the CLI.

Each head is its own: free ports on 127.0.0.1, a fresh token, its own temp folder, and it is
stopped by killing its process group, so the session's other Ray is left alone.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
PORTS = ["--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
         "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port",
         "--node-manager-port", "--object-manager-port"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(
    log_dir: Path, num_cpus: int, autoscaling: dict | None = None, env: dict | None = None
):
    """Yields {"address": the Jobs API URL, "token": ...} while the head runs.

    `autoscaling`: a cluster config on Ray's fake multi-node provider, whose "nodes" are raylets
    on this machine that the head's autoscaler starts and stops.
    """
    token = secrets.token_hex(32)
    port = {p: free_port() for p in PORTS}
    # its own temp folder: `ray start` records itself there (ray_current_cluster), and a
    # plain ray.init() elsewhere on this machine would otherwise try to join it
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_TMPDIR": tmp, "PATH": f"{BIN}:{os.environ['PATH']}"}  # fmt: skip
    args = [f"{p}={n}" for p, n in port.items()]
    if autoscaling:
        autoscaling["provider"]["gcs_address"] = f"127.0.0.1:{port['--port']}"
        (log_dir / "autoscaling.json").write_text(json.dumps(autoscaling))
        args.append(f"--autoscaling-config={log_dir / 'autoscaling.json'}")
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    with open(log_dir / "head.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={tmp}/ray",
             *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    address = f"http://127.0.0.1:{port['--dashboard-port']}"
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError):
                get(address, "/api/jobs/", token)
                if get(address, "/api/v0/nodes", token)["data"]["result"]["result"]:
                    break  # the head's raylet has registered too
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up; see {log_dir}/head.log")
            time.sleep(1)
        yield {"address": address, "token": token}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # `ray start --block` can take
            proc.wait(timeout=5)  # 30 s and more to go; nothing of it is kept
        with contextlib.suppress(ProcessLookupError):  # what outlived `ray start`'s own exit
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def get(address: str, path: str, token: str):
    """GET a dashboard route with the token; the decoded JSON body."""
    request = urllib.request.Request(f"{address}{path}",
                                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def cli(*args, token: str | None, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    if home:  # no ~/.ray/auth_token to fall back on
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "llm_dist.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def wait_for(head, job_id: str, states: set[str], seconds: float) -> str:
    """Polls `llm-dist status` until the job is in one of `states`; returns that state."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = cli("status", job_id, "--address", head["address"], token=head["token"])
        assert out.returncode == 0, out.stderr
        state = out.stdout.split(":")[1].split()[0]
        if state in states:
            return state
        time.sleep(2)
    raise AssertionError(f"{job_id} not in {states} after {seconds} s: {out.stdout}")


def cli_in_background(verb: str, spec, folder: Path) -> tuple[subprocess.Popen, str, Path]:
    """`llm-dist VERB` on `spec` (a JobSpec, written to `folder`) in the background, on its own
    embedded Ray; returns the process, the LLM_DIST_TEST_MARK every process of it carries (see
    `marked`), and its log file."""
    import yaml

    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    mark, log = secrets.token_hex(8), folder / f"{verb}.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"LLM_DIST_TEST_MARK": mark}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llm_dist.cli", verb, str(path)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    return proc, mark, log


def marked(mark: str) -> list[str]:
    """Live processes whose environment holds LLM_DIST_TEST_MARK=`mark`, as `pid: command`.

    Ray daemonizes what it starts, so what a CLI process left behind is found by what it
    inherited: Ray's daemons and workers get the environment of the driver that started them.
    """
    needle = f"LLM_DIST_TEST_MARK={mark}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:120]!r}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def kill_marked(mark: str) -> None:
    """SIGKILL every live process that `marked` finds: what a failed test left running would
    hold the next tests' ports (Ray's dashboard, Serve's proxy)."""
    for line in marked(mark):
        with contextlib.suppress(OSError):
            os.kill(int(line.split(":", 1)[0]), 9)


def no_marked_process_within(mark: str, seconds: float) -> list[str]:
    """Waits up to `seconds` for every marked process to end; returns those still alive."""
    deadline = time.monotonic() + seconds
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left
