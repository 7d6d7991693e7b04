"""The serve stage on the driver: find the model, deploy it with Ray Serve, ask it the test prompt.

What is served: `serve.model`, else the run's tune winner (`winner.json`), else its pretrain
export; the served model's id is the run's name. `llm-dist serve` then keeps it up until
Ctrl-C (on a cluster it stays up after the command returns); `llm-dist run` takes it down
after the test prompt unless `serve.keep_serving` is set.
"""

import hashlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from llm_dist.base import UserError
from llm_dist.console import console
from llm_dist.records import ServedApp, ServeResult
from llm_dist.run_folder import RunFolder


def run_stage(spec, run: str, keep_serving: bool = False, tracker=None) -> ServeResult:
    """Deploy, ask the test prompt, then keep serving or stop; returns the stage's outputs.

    `tracker` (`llm_dist.tracking.Tracker`) gets the endpoint as soon as it answers.
    """
    from ray import serve

    outputs = deploy(spec, run)
    if tracker:
        tracker.served(outputs.url)
    if not (keep_serving or spec.serve.keep_serving):
        delete_own(run)
        console.print(
            "serve: stopped (set serve.keep_serving, or use `llm-dist serve`, to keep it up)"
        )
    elif spec.cluster.address is None:  # the embedded Ray ends with this process
        console.print("serve: serving until Ctrl-C (or SIGTERM)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM
            # Deleting the app first lets its replicas finish the requests in flight while the
            # proxy still carries their responses (new ones get 404); then the proxy goes.
            delete_own(run)
            serve.shutdown()
            console.print("serve: stopped")
    else:
        console.print(
            f"serve: {spec.name!r} keeps running on the cluster; `serve shutdown` stops it"
        )
    return outputs


def deploy(spec, run: str) -> ServeResult:
    """Deploy the spec's model as the Serve application named after the run, on its own route
    (`serve.route_prefix`, else /<name>); ask it once. An app of that name that this run did not
    deploy is refused, not replaced."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from llm_dist.cluster import connect, ensure_room
    from llm_dist.model import check_folder

    s = spec.serve
    folder, source = _model(spec, run)
    tokenizer = check_folder(folder, source)
    keys = _keys(s)  # the test prompt carries one; replicas get only their hashes
    hashes = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    if s.engine == "vllm":
        app = _vllm_app(spec, folder, hashes)  # before Ray starts: fails fast without vLLM
    if spec.cluster.address is None and not ray.is_initialized():
        _check_port(s.host, s.port)  # a fresh embedded Ray: nothing of ours holds it yet
    connect(spec)
    gpus = s.gpus_per_replica
    if gpus is None:  # vLLM needs a GPU; transformers uses one when the cluster has any
        gpus = 1 if s.engine == "vllm" or ray.cluster_resources().get("GPU", 0) > 0 else 0
    replicas = s.autoscaling.min_replicas if s.autoscaling else s.num_replicas
    ensure_room(spec, "serve replicas", {"CPU": s.cpus_per_replica, "GPU": gpus}, replicas)
    if s.engine == "transformers":
        app = _transformers_app(spec, folder, hashes, gpus)
    started = time.monotonic()
    serve.start(http_options={"host": s.host, "port": s.port})
    prefix = s.route_prefix or f"/{spec.name}"
    _refuse_anothers(spec.name, prefix, run)
    try:
        serve.run(app, name=spec.name, route_prefix=prefix)
    except RayServeException as e:
        if "is being used by application" not in str(e):
            raise
        raise UserError(f"serve.route_prefix: {e} Serve this run on another route "
                        "(--set serve.route_prefix=/...)") from None  # fmt: skip
    # what tells this deployment from a later one of the same name by someone else
    deployed_at = serve.status().applications[spec.name].last_deployed_time_s
    RunFolder(run).write_served_app(ServedApp(name=spec.name, route_prefix=prefix,
                                              deployed_at=deployed_at))  # fmt: skip
    ready = time.monotonic() - started
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    url = f"http://{host}:{s.port}{prefix.rstrip('/')}"
    console.print(f"serve: {spec.name!r} ({source}: {folder}) is up at {url}/v1 in {ready:.1f} s")

    chat = bool(tokenizer.chat_template)
    route, body = (("chat/completions", {"messages": [{"role": "user", "content": s.test_prompt}]})
                   if chat else ("completions", {"prompt": s.test_prompt}))  # fmt: skip
    body |= {"model": spec.name, "max_tokens": s.max_tokens, "temperature": 0.8, "seed": 0}
    request = urllib.request.Request(
        f"{url}/v1/{route}", json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {keys[0]}"} if keys else {}),
    )  # fmt: skip
    asked = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as e:
        raise UserError(f"serve: the test prompt got HTTP {e.code}: {e.read().decode()}") from None
    seconds = time.monotonic() - asked
    choice = answer["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    console.print(f"serve: asked {s.test_prompt!r}; in {seconds:.2f} s, "
          f"{answer['usage']['completion_tokens']} tokens ({choice['finish_reason']}):")  # fmt: skip
    console.print(text if text.strip() else "(an empty answer: the model ended it at once)")
    return ServeResult(url=url, model=spec.name, folder=folder, source=source,
                       seconds_to_ready=round(ready, 2), test_prompt=s.test_prompt, answer=text,
                       usage=answer["usage"])  # fmt: skip


def _refuse_anothers(name: str, prefix: str, run: str) -> None:
    """A UserError when the cluster serves an app called `name` that this run did not deploy
    (its `ServedApp` record is another's, or none): a teammate's endpoint is never replaced."""
    from ray import serve

    live = serve.status().applications.get(name)
    if live is None:
        return
    own = RunFolder(run).read_served_app()
    if own is None or own.deployed_at != live.last_deployed_time_s:
        raise UserError(
            f"serve: the cluster already serves an app named {name!r} that this run did not "
            "deploy; serve this run under another name (--set name=...), or, if that app is "
            f"yours to remove, `serve delete {name}` first"
        )


def delete_own(run: str) -> bool:
    """Delete the Serve app this run deployed, if it is still the one this run deployed (a
    later deployment of the same name by another is left up); True when deleted."""
    from ray import serve

    own = RunFolder(run).read_served_app()
    live = serve.status().applications.get(own.name) if own else None
    if live is None or live.last_deployed_time_s != own.deployed_at:
        if own is not None:
            console.print(f"serve: {own.name!r} was deployed again by someone else; left up")
        return False
    serve.delete(own.name)
    return True


def _model(spec, run: str) -> tuple[str, str]:
    """The folder to serve and where it came from: serve.model, else the run's tune winner, else
    its pretrain export, each only when it was made from this spec (`llm_dist.reuse`)."""
    from llm_dist.reuse import check_pretrain, check_winner

    if spec.serve.model:
        model = spec.serve.model
        return (model if "://" in model else str(Path(model).resolve())), "serve.model"
    folder = RunFolder(run)
    pretrained = folder.pretrain.read_result()
    winner = folder.read_winner()
    if winner is not None:
        if not spec.tune.base_model and pretrained is not None:
            check_pretrain(spec, pretrained, folder.pretrain.result)
        base_result = None if spec.tune.base_model else pretrained
        check_winner(spec, winner, winner.lineage.base_model, base_result, folder.winner)
        return winner.export, f"tune winner {winner.trial_id}"
    if pretrained is not None:
        check_pretrain(spec, pretrained, folder.pretrain.result)
        return pretrained.export, "the pretrain export"
    raise UserError(
        f"serve.model: empty, and the run {run} has neither a tune winner ({folder.winner}) "
        "nor a pretrain export; run those stages first or set serve.model to a model folder"
    )


def _keys(s) -> list[str]:
    """The API keys requests must carry (none: the API is open)."""
    if s.api_keys_env:
        keys = [k.strip() for k in os.environ.get(s.api_keys_env, "").split(",") if k.strip()]
        if not keys:
            raise UserError(
                f"serve.api_keys_env: the environment variable {s.api_keys_env} is unset or "
                "empty; export the keys (comma-separated) or remove the field"
            )
        return keys
    if s.api_keys_file:
        try:
            lines = Path(s.api_keys_file).read_text().splitlines()
        except OSError as e:
            raise UserError(f"serve.api_keys_file: cannot read {s.api_keys_file}: "
                            f"{e.strerror}") from None  # fmt: skip
        keys = [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]
        if not keys:
            raise UserError(f"serve.api_keys_file: {s.api_keys_file} holds no key")
        return keys
    return []


def _check_port(host: str, port: int) -> None:
    """Refuse a taken port up front: Serve's proxy would otherwise fail to start in the background."""
    with socket.socket() as sock:
        # as the proxy's server binds: a port a stopped server left in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise UserError(f"serve.port: cannot listen on {host}:{port} ({e.strerror}); "
                            "pick another port with --set serve.port=N") from None  # fmt: skip


def _transformers_app(spec, folder: str, hashes: list[str], gpus: float):
    from llm_dist.serve import protocol
    from llm_dist.serve.app import LLMServer

    s = spec.serve
    limits = s.model_dump(include={"max_tokens", "max_prompt_tokens", "max_batch_size",
                                   "max_batch_total_tokens", *protocol.LIMITS})  # fmt: skip
    return LLMServer.options(
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        backpressure_config={"status_code": s.overload_status}, **s.scaling(),
    ).bind(folder, spec.name, hashes, limits)  # fmt: skip


def _vllm_app(spec, folder: str, hashes: list[str]):
    """Ray Serve LLM's OpenAI app on vLLM (`llm_dist.serve.vllm`), checked before Ray starts."""
    from llm_dist.serve.config import positions_of, vllm_context_problem

    problem = vllm_context_problem(spec.serve, positions_of(folder), folder)
    if problem:  # validation may not have known the folder: the run's own winner
        raise UserError(problem)
    try:
        from llm_dist.serve import vllm
    except ImportError as e:
        raise UserError(
            f"serve.engine: vllm needs Ray Serve LLM and vLLM ({e}); install them with "
            "`pip install 'llm-dist[vllm]'` on every GPU node, or use engine: transformers"
        ) from None
    return vllm.app(spec, folder, hashes)
