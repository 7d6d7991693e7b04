"""The OpenAI wire format: request bodies (validated, so bad fields answer 422) and response bodies.

Every field is range-checked here, before a request joins a batch. Fields the OpenAI API has
but this server does not implement (penalties, logprobs, logit_bias, n > 1, tools, ...) are
accepted at their neutral value, which asks for nothing (clients such as LangChain send
`frequency_penalty: 0` unprompted), and refused by name at any other value.
"""

import hashlib
import hmac
import json
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Unimplemented OpenAI fields and the values at which they change nothing (null: the default).
NEUTRAL = {
    "frequency_penalty": (0, None), "presence_penalty": (0, None), "n": (1, None),
    "logprobs": (False, None), "top_logprobs": (0, None), "logit_bias": ({}, None),
    "echo": (False, None), "best_of": (1, None), "suffix": ("", None),
    "response_format": ({"type": "text"}, None), "tools": ([], None), "tool_choice": ("none", "auto", None),
    "parallel_tool_calls": (True, False, None), "modalities": (["text"], None),
    "store": (False, None), "metadata": ({}, None), "service_tier": ("auto", "default", None),
}  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    max_tokens: pydantic.StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: pydantic.StrictInt | None = Field(
        None, ge=-(2**63), lt=2**64
    )  # what torch's generators take
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data):
        """Drop fields sent as null (their default) and unimplemented ones at their neutral
        value; other unimplemented ones stay, to be refused."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None  # OpenAI: null is the default
                and (k not in NEUTRAL or not any(_same(v, n) for n in NEUTRAL[k]))}  # fmt: skip

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if not all(stops):
            raise ValueError("an empty stop string would stop at once; leave it out")
        return stops


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        return "system" if v == "developer" else v  # OpenAI's newer name for system turns

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        """OpenAI content parts: text parts joined in order; any other kind refused by name."""
        if not isinstance(v, list):
            return v
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} is of type {kind!r}; this text-only model takes "
                                 "text parts only ({'type': 'text', 'text': ...})")  # fmt: skip
        return "".join(part["text"] for part in v)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: pydantic.StrictInt | None = Field(
        None, ge=1
    )  # the newer name of max_tokens


def parse(kind: type[_Request], body: bytes) -> _Request:
    """The request body as `kind`, or ValueError naming every bad field."""
    try:
        return kind.model_validate_json(body)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "body"
            message = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
            if err["type"] == "extra_forbidden":
                neutral = NEUTRAL.get(where, (None,))[0]
                message = "not supported by this server" + (
                    f" (accepted only at its neutral value {json.dumps(neutral)})"
                    if neutral is not None else "")  # fmt: skip
            problems.append(f"{where}: {message}")
        raise ValueError("; ".join(problems)) from None


# serve's limits on what a request holds, checked before it costs anything (`over_limit`)
LIMITS = ("max_request_bytes", "max_prompt_chars", "max_messages", "max_stop_strings",
          "max_field_chars")  # fmt: skip


def over_limit(req: _Request, limits: dict) -> tuple[int, str, str] | None:
    """The first field of `req` over one of serve's `LIMITS`: (HTTP status, the field, a
    message naming the limit); None when all are within them. Character counts only, so this
    costs nothing next to tokenizing: it is what keeps a huge prompt from being tokenized."""
    chat = isinstance(req, ChatRequest)
    if chat and len(req.messages) > limits["max_messages"]:
        return 400, "messages", (f"{len(req.messages)} messages; this server takes at most "
                                 f"{limits['max_messages']} (serve.max_messages)")  # fmt: skip
    chars = sum(len(m.content) for m in req.messages) if chat else len(req.prompt)
    if chars > limits["max_prompt_chars"]:
        field = "messages" if chat else "prompt"
        return 413, field, (f"the {field} holds {chars:,} characters; this server takes at most "
                            f"{limits['max_prompt_chars']:,} (serve.max_prompt_chars)")  # fmt: skip
    stops = req.stop or []
    if len(stops) > limits["max_stop_strings"]:
        return 400, "stop", (f"{len(stops)} stop strings; this server takes at most "
                             f"{limits['max_stop_strings']} (serve.max_stop_strings)")  # fmt: skip
    most = limits["max_field_chars"]
    texts = {"model": [req.model], "user": [req.user or ""], "stop": stops,
             "messages": [m.name or "" for m in req.messages] if chat else []}  # fmt: skip
    for field, values in texts.items():
        if any(len(v) > most for v in values):
            what = "a message's name" if field == "messages" else f"{field} (each)"
            return 400, field, (f"{what} is longer than {most} characters, the most this "
                                "server takes (serve.max_field_chars)")  # fmt: skip
    return None


def _same(value, neutral) -> bool:
    """Equal as JSON values: 0.0 is 0, but false is not 0."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return value == neutral


def authorized(authorization: str, key_hashes: list[str]) -> bool:
    """Whether an `Authorization: Bearer KEY` header carries one of the keys (SHA-256 hashes:
    keys never reach the replicas); every request is authorized when there are none."""
    if not key_hashes:
        return True
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 7235)
        return False
    digest = hashlib.sha256(key.strip().encode()).hexdigest()
    return any(hmac.compare_digest(digest, h) for h in key_hashes)


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def body(chat: bool, model: str, rid: str, created: int, text: str | None, finish: str | None,
         used: dict | None, chunk: bool = False) -> dict:  # fmt: skip
    """A completion, a chat completion, or one streamed chunk of either.

    A chunk with `text` None is the usage-only chunk that ends a stream when asked for.
    """
    if chat:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, ("delta" if chunk else "message"): message, "finish_reason": finish}
    else:
        obj = "text_completion"
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    out = {"id": rid, "object": obj, "created": created, "model": model,
           "choices": [choice] if text is not None else []}  # fmt: skip
    if used is not None or not chunk:
        out["usage"] = used
    return out
