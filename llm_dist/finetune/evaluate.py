"""A model's answers to task windows: greedy generations, or each label's likelihood.

A window (`tokens`, `mask` of width seq_len + 1) holds a rendered chat whose last assistant
turn is its last run of mask 1s: the tokens before it are the prompt, exactly as the server
would encode the chat, and the run itself is the reference answer. The worker loop calls
`outcome` on its share of the validation split at every evaluation of a trial; the sweep's
winner and the un-tuned base get the same on the test split (`llm_dist.tune.winner`). Metrics
come from the outcomes in `llm_dist.finetune.scores`.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskEval:
    """What a tune task's evaluation asks of a model: greedy answers (chat formats) or each
    label's likelihood (classify), and the metrics computed from them."""

    format: str  # tune.task.format
    metrics: tuple[str, ...]  # tune.task.metrics
    max_new_tokens: int = 64  # greedy answers: tune.task.max_new_tokens
    stop: tuple[str, ...] = ()  # greedy answers: tune.task.stop
    label_ids: tuple[tuple[int, ...], ...] = ()  # classify: each label's answer tokens


def task_of(spec, prepared: str) -> TaskEval | None:
    """The evaluation of the task prepared in `prepared` (its label tokens from prepared.json),
    or None when `tune.task.metrics` is empty."""
    from llm_dist.records import TaskData
    from llm_dist.run_folder import PreparedFolder

    t = spec.tune.task
    if not t.metrics:
        return None
    label_ids = []
    if t.format == "classify":  # the tokens each label is scored by
        label_ids = PreparedFolder(prepared).read(TaskData).label_ids or []
    return TaskEval(t.format, tuple(t.metrics), t.max_new_tokens, tuple(t.stop),
                    tuple(tuple(ids) for ids in label_ids))  # fmt: skip


def answer_span(mask) -> tuple[int, int]:
    """(start, end) of the last run of 1s in a window's mask: the last assistant turn."""
    ones = np.flatnonzero(np.asarray(mask))
    if not len(ones):
        return 0, 0
    end = int(ones[-1]) + 1
    gaps = np.flatnonzero(np.diff(ones) > 1)
    start = int(ones[gaps[-1] + 1]) if len(gaps) else int(ones[0])
    return start, end


def outcome(model, tokenizer, batches, task: TaskEval, device, synced_gpus: bool = False,
            batch_size: int = 16) -> dict:  # fmt: skip
    """The model's answers to every window in `batches` (dicts of `tokens`, `mask`), in order:
    `{"predicted", "labels"}` (label indices) for format classify, else `{"predictions",
    "references"}` (texts). `synced_gpus`: every rank of a ZeRO-3 group calls this with as
    many windows, and generation keeps them in step (transformers' `synced_gpus`)."""
    import torch

    rows = [(r.numpy(), m.numpy()) for b in batches for r, m in zip(b["tokens"], b["mask"], strict=True)]  # fmt: skip
    spans = [answer_span(m) for _, m in rows]
    prompts = [r[:s].tolist() for (r, _), (s, _) in zip(rows, spans, strict=True)]
    answers = [r[s:e].tolist() for (r, _), (s, e) in zip(rows, spans, strict=True)]
    model.eval()
    with torch.no_grad():
        if task.format == "classify":
            known = {tuple(ids): k for k, ids in enumerate(task.label_ids)}
            scores = label_scores(
                model, prompts, [list(i) for i in task.label_ids], device, batch_size
            )
            return {"predicted": scores.argmax(1).tolist(),
                    "labels": [known.get(tuple(a), -1) for a in answers]}  # fmt: skip
        predictions = generate(model, tokenizer, prompts, task.max_new_tokens, list(task.stop),
                               device, synced_gpus, batch_size)  # fmt: skip
    references = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    return {"predictions": predictions, "references": references}


def label_scores(model, prompts: list[list[int]], label_ids: list[list[int]], device,
                 batch_size: int = 16) -> np.ndarray:  # fmt: skip
    """(prompts, labels) log-likelihood, in nats, of each label's answer tokens (its text and the
    template's closing, e.g. EOS) after each prompt: the model's choice is the row's argmax.

    Each batch of prompts (left-padded, positions counted from each row's first token) runs
    once and keeps its KV cache; each label's tokens then run on a copy of that cache, so a
    label costs its own few tokens, not the prompt again.
    """
    import copy

    import torch

    out = np.zeros((len(prompts), len(label_ids)))
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            n, width = len(chunk), max(map(len, chunk))
            tokens = torch.zeros((n, width), dtype=torch.long)
            attention = torch.zeros((n, width), dtype=torch.long)
            for row, prompt in enumerate(chunk):
                tokens[row, width - len(prompt) :], attention[row, width - len(prompt) :] = torch.tensor(prompt), 1  # fmt: skip
            tokens, attention = tokens.to(device), attention.to(device)
            lengths = attention.sum(1, keepdim=True)
            first = model(input_ids=tokens, attention_mask=attention, use_cache=True, logits_to_keep=1,
                          position_ids=(attention.cumsum(1) - 1).clamp(min=0))  # fmt: skip
            next_token = first.logits[:, -1].float().log_softmax(-1)  # (n, V)
            for k, ids in enumerate(label_ids):
                score = next_token[:, ids[0]]
                if len(ids) > 1:  # the rest of the answer, each token after the ones before it
                    rest = torch.tensor(ids, device=device).expand(n, -1)
                    cache = copy.deepcopy(first.cache)  # the label's tokens extend it
                    logits = model(input_ids=rest[:, :-1], cache=cache, use_cache=True,
                                   attention_mask=torch.cat([attention, torch.ones_like(rest[:, 1:])], 1),
                                   position_ids=lengths + torch.arange(len(ids) - 1, device=device)).logits  # fmt: skip
                    logp = logits.float().log_softmax(-1)
                    score = score + logp.gather(2, rest[:, 1:, None]).sum((1, 2))
                out[start : start + n, k] = score.detach().cpu().numpy()
    return out


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop: list[str],
             device, synced_gpus: bool = False, batch_size: int = 16) -> list[str]:  # fmt: skip
    """Greedy answers to each prompt, batched with left padding: each ends at an end-of-turn id
    (the tokenizer's EOS and every id in the model's generation config, as `generate()` stops),
    at the first stop string, or after `max_new_tokens` (fewer when the model's positions run
    out); decoded without special tokens and stripped."""
    import torch

    from llm_dist.finetune.formats import end_ids

    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)  # fmt: skip
    eos = end_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            tokens[row, width - len(prompt) :], attention[row, width - len(prompt) :] = torch.tensor(prompt), 1  # fmt: skip
        budget = max_new_tokens if positions is None else min(max_new_tokens, positions - width)
        # Under ZeRO-3 every rank must call generate() alike; a window's answer (text and a
        # closing token) leaves its prompt <= seq_len - 1 tokens, and the spec keeps seq_len
        # within the model's positions, so task windows never skip.
        if budget <= 0:
            texts += [""] * len(chunk)
            continue
        out = model.generate(input_ids=tokens.to(device), attention_mask=attention.to(device),
                             max_new_tokens=budget, do_sample=False, pad_token_id=pad,
                             eos_token_id=sorted(eos), synced_gpus=synced_gpus,
                             stop_strings=stop or None, tokenizer=tokenizer if stop else None)  # fmt: skip
        for ids in out[:, width:].tolist():
            ends = [i for i, token in enumerate(ids) if token in eos]
            text = tokenizer.decode(ids[: ends[0] if ends else len(ids)], skip_special_tokens=True)
            cuts = [k for k in (text.find(s) for s in stop) if k >= 0]
            texts.append((text[: min(cuts)] if cuts else text).strip())
    return texts
