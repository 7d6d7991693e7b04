"""The serve stage as a pipeline step: what it serves, overload, and refusals before deploying."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from run_records import train_result, winner

from llm_dist.base import UserError
from llm_dist.run_folder import RunFolder
from llm_dist.spec import JobSpec


def spec_for(root, port: int, **serve) -> JobSpec:
    return JobSpec(name="stage", storage_path=str(root), stages=["serve"],
                   serve={"port": port, "max_tokens": 8, **serve})  # fmt: skip


@pytest.mark.slow
def test_serves_the_winner_else_the_pretrain_export_then_stops(
    ray_session, serve_port, tiny_base, tmp_path
):
    from ray import serve

    from llm_dist import pipeline

    spec = spec_for(tmp_path, serve_port)
    run = tmp_path / "stage"
    pretrained = train_result(spec, tiny_base)
    RunFolder(str(run)).pretrain.write_result(pretrained)
    folder = pipeline.run(spec)
    manifest = json.loads((run / "manifest.json").read_text())
    outputs = manifest["stages"]["serve"]["outputs"]
    assert manifest["stages"]["serve"]["status"] == "succeeded"
    assert outputs["source"] == "the pretrain export" and outputs["folder"] == tiny_base
    assert outputs["test_prompt"] == "def read_config(path):"
    assert 0 < outputs["usage"]["completion_tokens"] <= 8 or outputs["answer"] == ""
    assert "stage" not in serve.status().applications  # taken down after the test prompt

    RunFolder(str(run)).write_winner(
        winner(spec, tiny_base, tiny_base, pretrained, trial_id="abc_00001")
    )
    assert pipeline.run(spec) == folder
    outputs = json.loads((run / "manifest.json").read_text())["stages"]["serve"]["outputs"]
    assert outputs["source"] == "tune winner abc_00001"
    assert outputs["url"] == f"http://127.0.0.1:{serve_port}/stage"  # its own route


@pytest.mark.slow
def test_two_runs_serve_side_by_side_and_neither_clobbers_the_other(
    ray_session, serve_port, tiny_base, tmp_path
):
    """Every app was deployed at / under the run's name: a teammate's run replaced, then
    deleted, another's endpoint. Each app now has its own route, a run replaces or deletes
    only the app it deployed, and an app of its name that it did not deploy is refused."""
    from ray import serve

    from llm_dist.serve.run import delete_own, deploy

    def answer(url: str, model: str) -> int:
        body = json.dumps({"model": model, "prompt": "def f(x):", "max_tokens": 2}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.load(r)["model"] == model
            return r.status

    specs = {name: spec_for(tmp_path / name, serve_port, model=tiny_base).model_copy(
        update={"name": name}) for name in ("alice", "bob")}  # fmt: skip
    runs = {name: str(tmp_path / name / name) for name in specs}
    try:
        urls = {name: deploy(spec, runs[name]).url for name, spec in specs.items()}
        assert urls == {n: f"http://127.0.0.1:{serve_port}/{n}" for n in specs}
        assert [answer(urls[n], n) for n in specs] == [200, 200]
        alice = serve.status().applications["alice"].last_deployed_time_s
        with pytest.raises(UserError) as e:  # another run folder, the same name
            deploy(specs["alice"], str(tmp_path / "other" / "alice"))
        assert str(e.value).startswith(
            "serve: the cluster already serves an app named 'alice' that this run did not deploy"
        )
        assert serve.status().applications["alice"].last_deployed_time_s == alice
        assert delete_own(runs["bob"]) and sorted(serve.status().applications) == ["alice"]
        assert answer(urls["alice"], "alice") == 200
        shorter = specs["alice"].serve.model_copy(update={"max_tokens": 4})
        deploy(specs["alice"].model_copy(update={"serve": shorter}), runs["alice"])  # its own
        assert answer(urls["alice"], "alice") == 200
        assert delete_own(runs["alice"]) and "alice" not in serve.status().applications
    finally:
        for name in specs:
            if name in serve.status().applications:
                serve.delete(name)


@pytest.mark.slow
def test_overload_is_refused_quickly_and_nothing_hangs(
    ray_session, serve_port, tiny_base, tmp_path
):
    """24 requests at once on 1 ongoing + 2 queued: only 200s and the intended 429s, in bounded
    time; and training workers beside the replica leave it its CPU."""
    from ray import serve

    from llm_dist.cluster import ensure_room
    from llm_dist.serve.run import deploy

    spec = spec_for(tmp_path, serve_port, model=tiny_base, max_batch_size=1,
                    max_ongoing_requests=1, max_queued_requests=2, overload_status=429,
                    max_tokens=48, max_prompt_tokens=16)  # fmt: skip
    url = deploy(spec, str(tmp_path / "stage")).url
    statuses: list[int] = []
    body = json.dumps({"model": "stage", "prompt": "def f(x):", "max_tokens": 48,
                       "temperature": 0}).encode()  # fmt: skip

    def ask():
        request = urllib.request.Request(f"{url}/v1/completions", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                statuses.append(r.status)
        except urllib.error.HTTPError as e:
            statuses.append(e.code)

    try:
        start = time.monotonic()
        threads = [threading.Thread(target=ask) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        seconds = time.monotonic() - start
        # Training beside the served model cannot count on its replica's CPU (4 in all): 2
        # workers and Ray Data's CPU fit in the 3 left, 3 workers fail at once.
        ensure_room(spec, "pretrain.num_workers", {"CPU": 1}, 2, spare=1)
        with pytest.raises(UserError, match=(
            r"pretrain.num_workers: 3 × \{CPU: 1\} \(PACK\) can never fit this cluster, which "
            r"has no autoscaler: its nodes \(1 × CPU 4 GPU 0, of which detached actors such as "
            r"Serve replicas hold CPU 1 GPU 0\) hold 2 with 1 CPU left free for Ray Data")):  # fmt: skip
            ensure_room(spec, "pretrain.num_workers", {"CPU": 1}, 3, spare=1)
    finally:
        serve.delete("stage")
    assert len(statuses) == 24 and seconds < 90
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) >= 3


@pytest.mark.slow
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(
    ray_session, serve_port, tiny_base, tmp_path
):
    from ray import serve

    from llm_dist.serve.run import deploy

    spec = spec_for(tmp_path, serve_port, model=tiny_base, max_tokens=48, autoscaling={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "upscale_delay_s": 1, "downscale_delay_s": 2, "look_back_period_s": 2})  # fmt: skip
    url = deploy(spec, str(tmp_path / "stage")).url

    def running() -> int:
        states = serve.status().applications["stage"].deployments["llm"].replica_states
        return states.get("RUNNING", 0)

    body = json.dumps({"model": "stage", "prompt": "def f(x):", "max_tokens": 48}).encode()
    busy, counts = threading.Event(), []

    def load():
        while not busy.is_set():
            request = urllib.request.Request(f"{url}/v1/completions", body,
                                             {"Content-Type": "application/json"})  # fmt: skip
            urllib.request.urlopen(request, timeout=60).close()

    try:
        assert running() == 1
        clients = [threading.Thread(target=load) for _ in range(6)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and max(counts, default=0) < 2:
            counts.append(running())
            time.sleep(0.5)
        busy.set()
        for t in clients:
            t.join(timeout=60)
        assert max(counts) == 2, f"never scaled up: {counts}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and running() > 1:
            time.sleep(0.5)
        assert running() == 1
    finally:
        busy.set()
        serve.delete("stage")


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_leaves_no_ray_process(tiny_base, tmp_path):
    """`llm-dist serve` stopped as a container is (SIGTERM) while a response streams: that
    response ends whole, new connections are refused, exit 0, no process of its Ray left."""
    import signal

    from ray_head import cli_in_background, free_port, kill_marked, no_marked_process_within

    port = free_port()
    proc, mark, log = cli_in_background("serve", spec_for(tmp_path, port, model=tiny_base,
                                                          max_tokens=48), tmp_path)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "serving until Ctrl-C" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        body = {"model": "stage", "prompt": "def read_config(path):", "max_tokens": 48,
                "temperature": 0, "stream": True}  # fmt: skip
        request = urllib.request.Request(f"http://127.0.0.1:{port}/stage/v1/completions",
                                         json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as stream:
            first = stream.readline()
            assert first.startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)  # a response is streaming
            rest = stream.read().decode()
        events = [json.loads(line[6:]) for line in (first.decode() + rest).splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        assert rest.rstrip().endswith("data: [DONE]")
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        code = proc.wait(timeout=90)
        out = log.read_text()
        assert code == 0, out[-3000:]
        assert "serve: stopped" in out
        full = (tmp_path / "stage" / "logs" / "llm-dist.log").read_text()  # the rest of the output
        assert "SIGTERM received" not in out + full  # Ray's own handler: a stack dump, then exit 15
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert no_marked_process_within(mark, 30) == []
    finally:  # a failure above must not leave a server holding ports
        proc.kill()
        kill_marked(mark)


def test_nothing_to_serve_is_refused(tmp_path):
    from llm_dist.serve.run import deploy

    with pytest.raises(UserError, match=r"serve.model: empty, and the run .* has neither a tune "):
        deploy(spec_for(tmp_path, 8000), str(tmp_path / "stage"))
    with pytest.raises(UserError, match=r"serve.model: .*missing.* is not a Hugging Face model"):
        deploy(spec_for(tmp_path, 8000, model=str(tmp_path / "missing")), str(tmp_path / "x"))


def test_api_keys_must_be_there_when_configured(tmp_path, tiny_base, monkeypatch):
    from llm_dist.serve.run import deploy

    monkeypatch.delenv("LLM_DIST_NO_SUCH_KEYS", raising=False)
    spec = spec_for(tmp_path, 8000, model=tiny_base, api_keys_env="LLM_DIST_NO_SUCH_KEYS")
    with pytest.raises(UserError, match="LLM_DIST_NO_SUCH_KEYS is unset or empty"):
        deploy(spec, str(tmp_path / "stage"))
    spec = spec_for(tmp_path, 8000, model=tiny_base, api_keys_file=str(tmp_path / "keys.txt"))
    with pytest.raises(UserError, match=r"serve.api_keys_file: cannot read .*keys.txt"):
        deploy(spec, str(tmp_path / "stage"))
    (tmp_path / "keys.txt").write_text("# nothing but a comment\n\n")
    with pytest.raises(UserError, match=r"keys.txt holds no key"):
        deploy(spec, str(tmp_path / "stage"))


def test_vllm_without_its_extra_is_refused(tmp_path, tiny_base):
    from llm_dist.serve.run import deploy

    spec = spec_for(tmp_path, 8000, model=tiny_base, engine="vllm", max_prompt_tokens=100)
    with pytest.raises(UserError, match=r"serve.engine: vllm needs Ray Serve LLM and vLLM .*"
                                        r"pip install 'llm-dist\[vllm\]'"):  # fmt: skip
        deploy(spec, str(tmp_path / "stage"))


def test_vllm_past_the_models_positions_is_refused_before_it_starts(tmp_path, tiny_base):
    """vLLM refuses max_model_len past config.json's positions: validation says so first, and
    deploy does for a run's own winner, which validation cannot read."""
    from llm_dist.serve.run import deploy

    with pytest.raises(ValueError) as err:  # the tiny base has 128 positions
        spec_for(tmp_path, 8000, model=tiny_base, engine="vllm", max_prompt_tokens=121)
    assert (f"serve.max_prompt_tokens + serve.max_tokens: 121 + 8 = 129 exceeds the 128 "
            f"positions of serve.model {tiny_base}, and vLLM refuses to start a model past "
            "them; lower serve.max_prompt_tokens to at most 120 or serve.max_tokens") in str(err.value)  # fmt: skip
    assert spec_for(tmp_path, 8000, model=tiny_base, engine="vllm", max_prompt_tokens=120)
    run = tmp_path / "stage"
    spec = spec_for(tmp_path, 8000, engine="vllm", max_prompt_tokens=1024)
    RunFolder(str(run)).write_winner(winner(spec, tiny_base, tiny_base, trial_id="t1"))
    with pytest.raises(UserError, match=r"1024 \+ 8 = 1032 exceeds the 128 positions of "):
        deploy(spec, str(run))


def test_a_port_a_stopped_server_left_in_time_wait_is_free():
    """Restarting `llm-dist serve` right after stopping it: the old connections' TIME_WAIT
    does not hold the port (the proxy binds with SO_REUSEADDR, and so does the check)."""
    from llm_dist.serve.run import _check_port

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end stays in TIME_WAIT
        client.close()
    _check_port("127.0.0.1", port)  # no UserError


@pytest.mark.slow  # 8 s: a CLI process's imports, to see what its user sees
def test_a_taken_port_is_refused_before_ray_starts(tmp_path, tiny_base):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = tmp_path / "spec.yaml"
        spec.write_text(f"name: p\nstorage_path: {tmp_path}\nstages: [serve]\n"
                        f"serve: {{model: {tiny_base}, port: {port}}}\n")  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "llm_dist.cli", "serve", str(spec)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"serve.port: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "--set serve.port=N" in done.stderr and "Traceback" not in done.stderr
