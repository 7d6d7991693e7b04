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


def real_env(env: dict[str, str]) -> dict[str, str]:
    """`cluster.env` without the REDACTED values: a submitted job's spec holds those, and Ray
    has already set them in the job's runtime_env, for its driver and every worker."""
    return {name: value for name, value in env.items() if value != REDACTED}
