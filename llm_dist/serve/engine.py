"""The transformers engine: continuous batching, one token per step for every running request.

One thread per replica runs the decode loop. A request joins the running batch at the next
step: its prompt is prefilled (with the other newcomers, left-padded) and its KV cache joins
the batch's, left-padded to the same length; a request that ends leaves at once, so nobody
waits for a batch to finish. Each request keeps its own sampling (temperature, top_p, seed,
stop strings, max_tokens): the batch shares forward passes and a KV cache, nothing else.

Memory is bounded by `max_batch_total_tokens`: a request joins only while the padded cache
the batch could reach (its rows times the longest prompt + max_tokens among them) stays within
it; otherwise it waits, and Ray Serve's queue limits refuse what waits beyond them. A request
whose own step fails (its scores are not finite) ends alone with finish_reason "error"; a
failing forward pass (the batch's step, or the newcomers' prefill) ends the requests in it,
and the loop goes on with the others.
"""

import contextlib
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Job:
    """One request's prompt tokens and sampling settings."""

    ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = True  # an Event per step; else one, at the end, with the whole text


@dataclass
class Event:
    """What one step produced for one request: new text, and why it ended (once it has)."""

    text: str
    finish_reason: str | None  # None while decoding; "stop" (an end id or a stop string),
    # "length", or "error" (this request's step failed: `error` says how)
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class Request:
    """A job in the engine: where its events go, its sampling state, what it produced."""

    job: Job
    deliver: Callable[[Event], None]  # called from the decode thread
    cancelled: bool = False  # set by the caller (a client that went away): it leaves
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text delivered so far
    generator: object = None

    @property
    def size(self) -> int:  # the most cache this request can hold
        return len(self.job.ids) + self.job.max_tokens


class Engine:
    """The decode loop of one replica; `submit` is safe from any thread."""

    def __init__(self, model, tokenizer, max_batch_size: int, max_batch_total_tokens: int):
        from llm_dist.finetune.formats import end_ids

        self.model, self.tokenizer = model, tokenizer
        self.ends = end_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.ends)
        self.max_batch_size, self.max_batch_total_tokens = max_batch_size, max_batch_total_tokens
        self._steps: Counter[int] = Counter()  # batch size -> decode steps run at it
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="llm-dist-decode", daemon=True).start()

    def submit(self, job: Job, deliver: Callable[[Event], None]) -> Request:
        """Queue `job`; its Events go to `deliver`, the last one with a finish_reason."""
        import os

        import torch

        seed = int.from_bytes(os.urandom(8), "little") if job.seed is None else job.seed
        request = Request(job, deliver, generator=torch.Generator().manual_seed(seed))
        self._inbox.put(request)
        return request

    @property
    def steps(self) -> dict[int, int]:
        """How many decode steps ran at each batch size (for /health)."""
        with self._lock:
            return dict(self._steps)

    def _loop(self) -> None:
        from collections import deque

        import torch

        from llm_dist.serve.batch import Batch

        waiting: deque[Request] = deque()
        running: list[Request] = []
        batch = None
        while True:
            while not running and not waiting:  # idle: sleep until a request comes
                waiting.append(self._inbox.get())
            while not self._inbox.empty():
                waiting.append(self._inbox.get())
            joining = self._admit(running, waiting, batch)
            if not running and not joining:
                continue  # the waiting ones were cancelled
            logits = []
            with torch.inference_mode():
                try:  # a failed pass ends the requests in it; the others go on
                    logits = [batch.step(self.model)] if running else []
                except Exception as e:
                    running, batch = _failed(running, e), None
                try:
                    new = Batch.prefill(self.model, [r.job.ids for r in joining], self.pad)
                except Exception as e:
                    joining, new = _failed(joining, e), None
            everyone = running + joining
            if not everyone:
                continue
            try:
                logits = torch.cat(logits + ([new.logits] if new else []))
                with self._lock:
                    self._steps[len(everyone)] += 1
                tokens = _sample(logits, [r.job for r in everyone], [r.generator for r in everyone])
                keep = [k for k, r in enumerate(everyone) if self._advance(r, tokens[k])]
                tokens = [everyone[k].out[-1] for k in keep]
                batch = Batch.merged(batch if running else None, new, keep, len(running), tokens)
                running = [everyone[k] for k in keep]
            except Exception as e:  # not expected: end what is in flight, keep the loop alive
                running, batch = _failed(everyone, e), None

    def _admit(self, running: list[Request], waiting, batch) -> list[Request]:
        """The waiting requests that join now, first come first served, within the limits."""
        joining: list[Request] = []
        while waiting and len(running) + len(joining) < self.max_batch_size:
            if running and batch is not None and not batch.mergeable:
                break  # a cache that cannot take new rows: newcomers wait for this batch
            head = waiting[0]
            if head.cancelled:
                waiting.popleft()
                continue
            rows = running + joining + [head]
            if (
                len(rows) > 1
                and len(rows) * max(r.size for r in rows) > self.max_batch_total_tokens
            ):
                break
            joining.append(waiting.popleft())
        return joining

    def _advance(self, r: Request, token: int | None) -> bool:
        """Take `r`'s next token, deliver its new text; False once it has ended."""
        job = r.job
        if r.cancelled:
            return False
        if token is None:  # its scores were not a distribution (non-finite): it alone ends
            _failed([r], ValueError("the model's scores for this request are not finite"))
            return False
        finish = "stop" if token in self.ends else None
        if finish is None:
            r.out.append(token)
            finish = "length" if len(r.out) >= job.max_tokens else None
        if finish is None and not job.stream and not job.stop:
            return True  # nothing to look at or hand over before the end
        text = self.tokenizer.decode(r.out, skip_special_tokens=True)
        cut = min((k for k in (text.find(s) for s in job.stop) if k >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        end = len(text)
        if finish is None:  # hold back what may turn out to be a stop string's start
            end -= max((len(s) - 1 for s in job.stop), default=0)
            end -= len(text) - len(text.rstrip("\ufffd"))  # a partial UTF-8 character
        if job.stream or finish is not None:  # a whole answer is handed over once, at its end
            try:
                r.deliver(Event(text[r.sent : max(end, r.sent)], finish, len(job.ids), len(r.out)))
            except Exception:  # its receiver is gone: as if cancelled
                return False
            r.sent = max(end, r.sent)
        return finish is None


def _failed(requests: list[Request], error: Exception) -> list[Request]:
    """End each of `requests` with finish_reason "error"; returns [] (none of them runs on).
    A delivery that fails (its event loop is gone) must not end the decode thread."""
    for r in requests:
        with contextlib.suppress(Exception):
            r.deliver(Event("", "error", len(r.job.ids), len(r.out),
                            f"{type(error).__name__}: {error}"))  # fmt: skip
    return []


def _sample(logits, jobs: list[Job], generators: list) -> list[int | None]:
    """Each row's next token from (B, V) float32 scores: greedy at temperature 0, else top-p
    sampling by inverse CDF with a uniform draw from the row's own seeded generator, so a
    row's token does not depend on the other rows. None where a row's scores (or its
    temperature) give no distribution.

    Below 1e-5 (vLLM's threshold) a temperature is taken as 0: dividing by it would overflow.
    """
    import torch

    tokens: list[int | None] = logits.argmax(-1).tolist()
    for i in logits.isnan().any(-1).nonzero().flatten().tolist():
        tokens[i] = None
    rows = [i for i, j in enumerate(jobs) if not j.temperature < 1e-5]  # NaN samples, and fails
    if not rows:
        return tokens
    temperature = torch.tensor([[jobs[i].temperature] for i in rows])
    probs = torch.softmax(logits[rows] / temperature, dim=-1)
    top_p = torch.tensor([[jobs[i].top_p] for i in rows])
    if (top_p < 1).any():  # keep the smallest set of most likely tokens whose mass reaches top_p
        top, index = probs.sort(dim=-1, descending=True)
        top[(top.cumsum(-1) - top) >= top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, index, top)
    cdf = probs.cumsum(-1)
    draws = torch.cat([torch.rand(1, generator=generators[i]) for i in rows])
    picked = torch.searchsorted(cdf, (draws * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    good = torch.isfinite(cdf[:, -1]) & (cdf[:, -1] > 0)
    for row, i in enumerate(rows):
        tokens[i] = min(int(picked[row]), probs.shape[-1] - 1) if good[row] else None
    return tokens
