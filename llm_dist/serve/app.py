"""The Ray Serve deployment: OpenAI-compatible routes over the transformers engine.

Every request of a replica goes to its one engine, which batches continuously: a request
joins the running batch at the next decode step and leaves when it ends, each with its own
sampling; streamed or not, every answer comes out of that one path. Ray Serve's proxy does
the queueing and refuses overload (`max_queued_requests`).
"""

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve  # this module is imported only when serving

from llm_dist.finetune.formats import prompt_ids
from llm_dist.serve import protocol
from llm_dist.serve.engine import Engine, Job

api = FastAPI(title="llm-dist", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, kind: str = "invalid_request_error", param=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


@serve.deployment(name="llm", max_constructor_retry_count=3)
@serve.ingress(api)
class LLMServer:
    """One replica: the model, its tokenizer, and the routes."""

    def __init__(self, folder: str, name: str, key_hashes: list[str], limits: dict):
        import torch
        from transformers import AutoModelForCausalLM

        from llm_dist.data.tokenizer import load
        from llm_dist.storage import local_folder

        local = local_folder(folder)  # on this replica's node: object storage is copied here
        gpu = torch.cuda.is_available()
        self.tokenizer = load(local)
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                local, local_files_only=True, dtype=torch.bfloat16 if gpu else torch.float32
            )
            .to("cuda" if gpu else "cpu")
            .eval()
        )
        # the trained context: a tokenizer's model_max_length is the sequence length it was
        # trained at (a huge sentinel when unset), below the positions the model could take
        self.context = min(self.model.config.max_position_embeddings,
                           self.tokenizer.model_max_length)  # fmt: skip
        self.name, self.key_hashes, self.limits = name, key_hashes, limits
        self.engine = Engine(self.model, self.tokenizer, limits["max_batch_size"],
                             limits["max_batch_total_tokens"])  # fmt: skip
        # prompts are tokenized off the event loop, one at a time: a fast tokenizer's settings
        # (split_special_tokens) are set per call, and two calls at once could race on them
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def _decode(self, job: Job):
        """The Events of `job` as the engine's thread produces them, the last with its end."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request = self.engine.submit(job, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            while not (event := await events.get()).finish_reason:
                yield event
            yield event
        finally:  # a client that went away (or a finished request) frees its row
            request.cancelled = True

    @api.get("/health")
    def health(self):
        """Open to probes: the model, and how many decode steps ran at each batch size."""
        steps = self.engine.steps
        return {"status": "ok", "model": self.name,
                "steps": {str(k): v for k, v in sorted(steps.items())}}  # fmt: skip

    @api.get("/v1/models")
    def models(self, request: Request):
        if not self._authorized(request):
            return _error(401, "a valid API key is required", "authentication_error")
        model = {"id": self.name, "object": "model", "created": 0, "owned_by": "llm-dist"}
        return {"object": "list", "data": [model]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, chat=True)

    def _authorized(self, request: Request) -> bool:
        return protocol.authorized(request.headers.get("authorization", ""), self.key_hashes)

    async def _body(self, request: Request) -> bytes | None:
        """The request body, or None once it is over serve.max_request_bytes: counted as it
        arrives (a Content-Length over it is refused before a byte is read)."""
        most = self.limits["max_request_bytes"]
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > most:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > most:
                return None
        return bytes(body)

    def _prompt_ids(self, req, chat: bool) -> list[int]:
        """The prompt's token ids; run on `tokenizing`, off the event loop that streams others.
        Raises ValueError when the chat template refuses the conversation."""
        if not chat:  # a quoted special token is text: only the template adds control tokens
            return self.tokenizer.encode(req.prompt, split_special_tokens=True)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:  # rendered as fine-tuning renders it
            return prompt_ids(self.tokenizer, messages)
        except Exception as e:  # the template refused the conversation (raise_exception)
            raise ValueError(f"the model's chat template refused the messages: {e}") from None

    async def _answer(self, request: Request, chat: bool):
        if not self._authorized(request):  # before the body is read: no key, no parsing
            return _error(401, "a valid API key is required", "authentication_error")
        body = await self._body(request)
        if body is None:
            return _error(413, f"the request body is over {self.limits['max_request_bytes']:,} "
                          "bytes, the most this server takes (serve.max_request_bytes)")  # fmt: skip
        try:
            kind = protocol.ChatRequest if chat else protocol.CompletionRequest
            req = protocol.parse(kind, body)
        except ValueError as e:
            return _error(422, str(e))
        if (over := protocol.over_limit(req, self.limits)) is not None:
            return _error(over[0], over[2], param=over[1])
        if req.model != self.name:
            return _error(404, f"model {req.model!r} is not served here; this server serves "
                          f"{self.name!r} (GET /v1/models)", param="model")  # fmt: skip
        if chat and not self.tokenizer.chat_template:
            return _error(400, "this model has no chat template; use /v1/completions")
        try:
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(self.tokenizing, self._prompt_ids, req, chat)
        except ValueError as e:
            return _error(400, str(e), param="messages")
        room = min(self.limits["max_prompt_tokens"], self.context - 1)
        if len(ids) > room:
            return _error(413, f"the prompt is {len(ids)} tokens; this server takes at most {room}",
                          param="messages" if chat else "prompt")  # fmt: skip
        asked = (req.max_completion_tokens if chat else None) or req.max_tokens
        cap = min(self.limits["max_tokens"], self.context - len(ids))
        job = Job(ids, min(asked or cap, cap), req.temperature, req.top_p, req.stop or [], req.seed,
                  req.stream)  # fmt: skip
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        events = self._decode(job)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = self._stream(events, chat, rid, created, usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        text = ""
        async for event in events:
            text += event.text
        if event.error:  # not the request's fault: every field was checked before it joined
            return _error(500, f"decoding this request failed: {event.error}", "server_error")
        used = protocol.usage(event.prompt_tokens, event.completion_tokens)
        return protocol.body(chat, self.name, rid, created, text, event.finish_reason, used)

    async def _stream(self, events, chat: bool, rid: str, created: int, usage: bool):
        """Server-sent events: a chunk per step that has new text or an end, then [DONE]."""

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async for event in events:
            if event.error:  # the status line has gone: the stream ends with OpenAI's error body
                yield sse({"error": {"message": f"decoding this request failed: {event.error}",
                                     "type": "server_error", "param": None, "code": None}})  # fmt: skip
                yield "data: [DONE]\n\n"
                return
            if event.text or event.finish_reason:
                yield sse(protocol.body(chat, self.name, rid, created, event.text,
                                        event.finish_reason, None, chunk=True))  # fmt: skip
        if usage:
            used = protocol.usage(event.prompt_tokens, event.completion_tokens)
            yield sse(protocol.body(chat, self.name, rid, created, None, None, used, chunk=True))
        yield "data: [DONE]\n\n"
