"""The transformers engine: decode a batch of requests together, one token per step.

Each request keeps its own sampling (temperature, top_p, seed, stop strings, max_tokens): the
batch shares the model's forward passes and a KV cache, nothing else. Prompts are left-padded;
a request that finishes leaves the batch, so the others stop paying for it. A request whose
own step fails (its sampling) ends alone with finish_reason "error"; the others go on.
"""

from collections.abc import Iterator
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


@dataclass
class Event:
    """What one step produced for one request: new text, and why it ended (once it has)."""

    text: str
    finish_reason: str | None  # None while decoding; "stop" (an end id or a stop string),
    # "length", or "error" (this request's step failed: `error` says how)
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


def decode(model, tokenizer, jobs: list[Job]) -> Iterator[list[Event | None]]:
    """Decode `jobs` together; yields one list per step, an Event per job (None once it ended).

    A job ends at any id `generate()` ends at (`formats.end_ids`). Its text is held back while
    its tail could still be the start of a stop string, and while it ends in a partial UTF-8
    character, so streamed text never needs taking back.
    """
    import os

    import torch
    from transformers import DynamicCache

    from llm_dist.finetune.formats import end_ids

    n, ends = len(jobs), end_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ends)
    width = max(len(j.ids) for j in jobs)
    device = model.device
    ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in jobs], device=device)
    mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs],
                        device=device)  # fmt: skip
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift RoPE positions
    generators = [torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little")
                                                if j.seed is None else j.seed) for j in jobs]  # fmt: skip
    out: list[list[int]] = [[] for _ in jobs]
    sent = [0] * n
    alive = list(range(n))  # rows of the current batch, as indices into jobs
    cache = DynamicCache(config=model.config)
    while alive:
        with torch.inference_mode():
            step = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache,
                         use_cache=True)  # fmt: skip
        logits = step.logits[:, -1].float().cpu()  # (B, V): sampling runs on CPU generators
        events: list[Event | None] = [None] * n
        keep = []
        for row, i in enumerate(alive):
            job = jobs[i]
            try:
                token = _sample(logits[row], job, generators[i])
            except Exception as e:  # e.g. non-finite scores: this request alone cannot go on
                events[i] = Event(
                    "", "error", len(job.ids), len(out[i]), f"{type(e).__name__}: {e}"
                )
                continue
            finish = None
            if token in ends:
                finish = "stop"
            else:
                out[i].append(token)
            text = tokenizer.decode(out[i], skip_special_tokens=True)
            cut = min((k for k in (text.find(s) for s in job.stop) if k >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif finish is None and len(out[i]) >= job.max_tokens:
                finish = "length"
            end = len(text)
            if finish is None:  # hold back what may turn out to be a stop string's start
                end -= max((len(s) - 1 for s in job.stop), default=0)
                end -= len(text) - len(text.rstrip("\ufffd"))  # a partial UTF-8 character
            events[i] = Event(text[sent[i] : max(end, sent[i])], finish, len(job.ids), len(out[i]))
            sent[i] = max(end, sent[i])
            if finish is None:
                keep.append(row)
        yield events
        if len(keep) < len(alive):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask, position = mask[index], position[index]
            alive = [alive[row] for row in keep]
        if alive:
            ids = torch.tensor([[out[i][-1]] for i in alive], device=device)  # (B, 1)
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            position = position[:, -1:] + 1


def _sample(logits, job: Job, generator) -> int:
    """One token from a row of logits: greedy at temperature 0, else top-p sampling.

    Below 1e-5 (vLLM's threshold) a temperature is taken as 0: dividing by it would overflow.
    """
    import torch

    if job.temperature < 1e-5:
        return int(logits.argmax())
    probs = torch.softmax(logits / job.temperature, dim=-1)
    if job.top_p < 1:
        top, index = probs.sort(descending=True)
        # keep the smallest set of most likely tokens whose mass reaches top_p
        top[(top.cumsum(0) - top) >= job.top_p] = 0
        probs = torch.zeros_like(probs).scatter(0, index, top)
    return int(torch.multinomial(probs, 1, generator=generator))
