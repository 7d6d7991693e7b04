"""submit / status / logs / stop: a spec run as a Ray job through the Ray Jobs API.

The job gets the effective spec (every default and `--set` applied, `cluster.address: auto`)
in its runtime_env as LLM_DIST_SPEC, not on its command line, with each `cluster.env` value
redacted (`redact.public`): the values travel as the runtime_env's own env_vars, which Ray sets
for the job's driver and workers. Ray shows a job's entrypoint and runtime_env to everyone
who can list the cluster's jobs, so a `cluster.env` name that says "secret" (KEY, TOKEN,
PASSWORD...) is refused: such values belong in the nodes' environment. This llm_dist package
travels with it (`py_modules`), so the cluster runs the code that submitted it; its nodes need
llm-dist's dependencies installed. There is no working_dir: Ray re-extracts a job's
working_dir whenever another node on the same disk fetches it, pulling it from under the
running driver. The Ray auth token comes from RAY_AUTH_TOKEN, the file named by
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, and only ever goes into a request header.
"""

import os
from pathlib import Path

from llm_dist.base import UserError, credentials_in


def submit(spec, address: str) -> str:
    """Submit `spec` to the cluster at `address`; returns the job id."""
    import json

    import llm_dist
    from llm_dist.redact import check_shared_env, public

    storage = spec.storage_path
    if "://" not in storage and not os.path.isabs(storage):
        raise UserError(
            f"storage_path: {storage!r} is relative, so the job would write into its own "
            "temporary folder on the cluster; use s3://…, gs://… or an absolute path every "
            "node shares"
        )
    check_shared_env(spec.cluster.env)
    effective = public(spec)
    effective["cluster"]["address"] = "auto"  # the job's driver joins the cluster it runs on
    effective["tracking"]["tracking_uri"] = _tracking_uri(spec, address)
    client = _client(address)
    job_id = _call(address, None, lambda: client.submit_job(
        entrypoint='printf %s "$LLM_DIST_SPEC" | python -m llm_dist.cli run -',
        # Ray's job supervisor kills the job 3 s after `stop`'s SIGTERM by default; a clean
        # stop (Tune saving its sweep, Serve draining requests) may need longer
        runtime_env={"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60", **spec.cluster.env,
                                  "LLM_DIST_SPEC": json.dumps(effective)},
                     "py_modules": [str(Path(llm_dist.__file__).parent)]},
        metadata={"llm_dist_run": spec.name},
    ))  # fmt: skip
    return job_id


def _tracking_uri(spec, address: str) -> str | None:
    """The tracking store the job reports to: the spec's, else this shell's MLFLOW_TRACKING_URI.

    It travels in the spec, shown on the dashboard: credentials stay in the cluster's
    environment. A server on this machine's loopback is not passed on to a cluster elsewhere.
    """
    from urllib.parse import urlsplit

    from llm_dist.console import console

    uri = spec.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    parts = urlsplit(uri)
    if where := credentials_in(uri):  # the spec's field refuses them; the environment's too
        raise UserError(
            f"MLFLOW_TRACKING_URI: it holds a credential ({where}), which the job would show on "
            "the Ray dashboard; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) in the cluster's environment instead"
        )
    loopback = ("localhost", "127.0.0.1", "::1")
    if parts.hostname in loopback and urlsplit(address).hostname not in loopback:
        console.print(f"[yellow]tracking: {uri} is on this machine, which the job's driver on the "
                      "cluster cannot reach; the job runs untracked (name a tracking server the "
                      "head node reaches in tracking.tracking_uri)[/]")  # fmt: skip
        return None
    return uri


def status(job_id: str, address: str) -> dict:
    client = _client(address)
    info = _call(address, job_id, lambda: client.get_job_info(job_id))
    return {"status": str(info.status.value), "message": info.message or ""}


def logs(job_id: str, address: str, follow: bool) -> None:
    """Print the job's logs; with `follow`, keep printing until the job ends."""
    client = _client(address)
    if not follow:
        print(_call(address, job_id, lambda: client.get_job_logs(job_id)), end="")
        return
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    _call(address, job_id, lambda: client.get_job_status(job_id))  # a clear error first
    asyncio.run(tail())


def stop(job_id: str, address: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    client = _client(address)
    return _call(address, job_id, lambda: client.stop_job(job_id))


def _token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = _token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return _call(address, None, lambda: JobSubmissionClient(address, headers=headers))


def _call(address: str, job_id: str | None, fn):
    """Run one Jobs API call; its failures become one message naming the fix."""
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as e:
        text = str(e)
        if "401" in text or "Authentication required" in text:
            raise UserError(
                f"--address: {address} requires a Ray auth token and none was sent; set "
                "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token"
            ) from None
        if "403" in text or "Authentication failed" in text:
            raise UserError(f"--address: {address} refused the Ray auth token; use the "
                            "cluster's own token") from None  # fmt: skip
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise UserError(
                f"no job {job_id!r} on {address}; `ray job list` shows its jobs"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise UserError(f"--address: cannot use the Ray Jobs API at {address} ({first}); "
                        "give the dashboard address, e.g. http://HEAD:8265") from None  # fmt: skip
