"""What of a spec is secret, and the spec as it may be written down or shown.

Secret are the values of `cluster.env`: environment variables are where keys and credentials
live, and a variable's name says nothing of its value. Every record of a spec (the manifest,
MLflow's parameters and spec.yaml, the report, `validate --print`, a submitted job's spec)
holds `public(spec)`, where each such value is REDACTED; the values reach Ray workers only
through Ray's runtime_env. Credentials in URIs are refused where a spec names a place or a
server (`base.credentials_in`), so no record holds one either.
"""

import re

REDACTED = "<redacted>"
# names that say "a secret": what a submitted job must not carry in its runtime_env
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|PRIVATE", re.I)


def public(spec) -> dict:
    """The spec as JSON (`model_dump(mode="json")`) with every `cluster.env` value REDACTED."""
    effective = spec.model_dump(mode="json")
    effective["cluster"]["env"] = dict.fromkeys(effective["cluster"]["env"], REDACTED)
    return effective


def check_shared_env(env: dict[str, str]) -> None:
    """Refuse a `cluster.env` whose name says secret where Ray would show its value: a
    submitted job's runtime_env, or a driver's joining a cluster (`cluster.address`). Raises
    UserError naming the field and where to put it instead."""
    from llm_dist.base import UserError

    secret = [name for name in real_env(env) if SECRET_NAME.search(name)]
    if secret:
        raise UserError(
            f"cluster.env.{secret[0]}: on a shared cluster Ray shows a job's environment to "
            "everyone who can list its jobs (`ray job list`, the dashboard); set it in the "
            "nodes' own environment instead (a KubeRay secretKeyRef, the cluster launcher's "
            "docker run_options; see docs/cluster.md), and serve's keys with "
            "serve.api_keys_env or serve.api_keys_file"
        )


def real_env(env: dict[str, str]) -> dict[str, str]:
    """`cluster.env` without the REDACTED values: a submitted job's spec holds those, and Ray
    has already set them in the job's runtime_env, for its driver and every worker."""
    return {name: value for name, value in env.items() if value != REDACTED}


def command(argv: list[str]) -> str:
    """The command line `llm-dist <argv[1:]>` as it may be written down: the value of every
    `--set cluster.env.NAME=VALUE` (where a user may put a key for one run) REDACTED."""
    words, masked = ["llm-dist"], False
    for word in argv[1:]:
        if masked or word.startswith("--set="):
            key, eq, _ = word.removeprefix("--set=").partition("=")
            if key.startswith("cluster.env.") and eq:
                word = ("--set=" if word.startswith("--set=") else "") + f"{key}={REDACTED}"
        masked = word == "--set"
        words.append(word)
    return " ".join(words)
