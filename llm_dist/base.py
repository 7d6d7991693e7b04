"""The base every spec section shares, and the error type for mistakes a user can fix."""

from pydantic import BaseModel, ConfigDict


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
