"""The base every spec section shares, and the error type for mistakes a user can fix."""

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


def _home(v: str | None) -> str | None:
    # a shell expands `~` before a program sees it; a YAML value reaches us as typed, and
    # os.path treats `~` as a folder name (`storage_path: ~/runs` made a folder named `~`)
    return os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v


Place = Annotated[str, AfterValidator(_home)]
"""A local path or an s3:// gs:// URI; a leading `~` is the user's home (expanded on the node
that reads the spec: the driver, or a submitted job's entrypoint)."""


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
