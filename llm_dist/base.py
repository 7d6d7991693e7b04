"""The base every spec section shares, and the error type for mistakes a user can fix."""

import os
import re
from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict


def _home(v: str | None) -> str | None:
    # a shell expands `~` before a program sees it; a YAML value reaches us as typed, and
    # os.path treats `~` as a folder name (`storage_path: ~/runs` made a folder named `~`)
    return os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v


_CREDENTIAL = re.compile(r"token|key|secret|passw|signature|credential|auth|^sig$", re.I)


def credentials_in(uri: str) -> str | None:
    """Where `uri` holds a credential ("a user or password before its host", "its query
    parameter access_token"), or None. pyarrow takes `s3://KEY:SECRET@bucket` and some
    tracking servers `?access_token=`; either would be copied into every record of the run."""
    if "://" not in uri:
        return None
    parts = urlsplit(uri)
    if parts.username or parts.password:
        return "a user or password before its host"
    names = [n for n, _ in parse_qsl(parts.query, keep_blank_values=True) if _CREDENTIAL.search(n)]
    return f"its query parameter {names[0]}" if names else None


def _no_credentials(v: str | None) -> str | None:
    where = credentials_in(v) if isinstance(v, str) else None
    if where:
        raise ValueError(
            f"holds a credential ({where}), which would be written into the run's records, "
            "MLflow and the Ray dashboard; leave it out and pass it through the environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance role for storage; "
            "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
        )
    return v


Place = Annotated[str, AfterValidator(_home), AfterValidator(_no_credentials)]
"""A local path or an s3:// gs:// URI; a leading `~` is the user's home (expanded on the node
that reads the spec: the driver, or a submitted job's entrypoint); credentials in it are
refused (`credentials_in`)."""

Address = Annotated[str, AfterValidator(_no_credentials)]
"""A server's URI, with no credential in it (`credentials_in`)."""


class UserError(Exception):
    """A mistake the user can fix (bad spec, missing file, wrong address): shown without a traceback."""


class Section(BaseModel):
    """A spec section: unknown keys are rejected, and each field's docstring is its documentation."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_default=True, frozen=False
    )


def flat(d: dict, prefix: str = "") -> dict:
    """A nested mapping as one level of dotted keys: `{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
