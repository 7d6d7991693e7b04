"""The OpenAI wire format: request bodies (validated, so bad fields answer 422) and response bodies.

Fields the OpenAI API has but this server does not implement (logprobs, penalties, n > 1, ...)
are refused by name rather than silently ignored.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("at most 4 stop strings, none empty")
        return stops


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


def parse(kind: type[_Request], body: bytes) -> _Request:
    """The request body as `kind`, or ValueError naming every bad field."""
    try:
        return kind.model_validate_json(body)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "body"
            extra = err["type"] == "extra_forbidden"
            problems.append(f"{where}: {'not supported by this server' if extra else err['msg']}")
        raise ValueError("; ".join(problems)) from None


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
