"""Task records as chat conversations, rendered by the base model's own chat template.

Every format becomes OpenAI-style `messages` first (`conversation`): `messages` as it is
(`developer` turns are system turns, as OpenAI treats them; content a string or a list of text
parts), alpaca's instruction (+ input) as the user turn and output as the assistant's,
sharegpt's `conversations` of from/value (human, gpt, system), `sft`'s prompt/response, and
`classify`'s text as the user turn with its label as the assistant's answer.

`encode` renders a conversation exactly as serving renders a prompt: the model's template
(`DEFAULT_CHAT_TEMPLATE` only when it has none), BOS and every control token the template
writes, and message text encoded as text, so a quoted `<|endoftext|>` never becomes the
control token (transformers' `sanitize_control_tokens`). The loss mask needs no knowledge of
the template: an assistant turn's text is what the template adds between rendering the chat
before it with the generation prompt and rendering it through that turn, and the chat up to
each such cut is tokenized as the server tokenizes a prompt (see `encode`). A template that
renders earlier turns differently from the last one (Qwen3 drops earlier reasoning) gives no
such prefixes: its multi-turn records are quarantined as template_mismatch.
"""

import itertools

from llm_dist.compat import LibraryChanged, mark_chat_inputs

# A user turn is its text and a newline; an assistant turn its text and EOS. Exported with the
# tokenizer, so the served model formats a chat the way it was fine-tuned.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant"}  # fmt: skip


class Unusable(Exception):
    """A record that cannot be a training example; its `reason` is the quarantine's."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def fields(task) -> list[str]:
    """The record fields `task.format` reads (the reader keeps these and types none)."""
    return {
        "sft": [task.prompt_field, task.response_field, task.system_field],
        "messages": [task.messages_field],
        "alpaca": [task.instruction_field, task.input_field, task.output_field,
                   task.system_field],
        "sharegpt": [task.conversations_field, task.system_field],
        "classify": [task.text_field, task.label_field, task.system_field],
    }[task.format] + ([task.group_field] if task.group_field else [])  # fmt: skip


def conversation(record: dict, task) -> list[dict]:
    """The record as `[{"role", "content"}, ...]`; raises Unusable (missing_field, not_a_string,
    not_a_list, empty, bad_role, no_assistant_turn, unknown_label)."""
    system = "" if task.format == "messages" else _text(record, task.system_field, optional=True)
    head = [{"role": "system", "content": system}] if system else []
    if task.format == "classify":
        return [*head, {"role": "user", "content": _text(record, task.text_field)},
                {"role": "assistant", "content": label_of(record, task)}]  # fmt: skip
    if task.format == "sft":
        return [*head, {"role": "user", "content": _text(record, task.prompt_field)},
                {"role": "assistant", "content": _text(record, task.response_field)}]  # fmt: skip
    if task.format == "alpaca":
        extra = _text(record, task.input_field, optional=True)
        prompt = _text(record, task.instruction_field) + (f"\n{extra}" if extra else "")
        return [*head, {"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(record, task.output_field)}]  # fmt: skip
    name = task.messages_field if task.format == "messages" else task.conversations_field
    turns = record.get(name)
    if turns is None:
        raise Unusable("missing_field", name)
    if not isinstance(turns, list) or not all(isinstance(m, dict) for m in turns):
        raise Unusable("not_a_list", f"{name} is not a list of turns")
    role, content = ("role", "content") if task.format == "messages" else ("from", "value")
    messages = head
    for i, turn in enumerate(turns):
        if not isinstance(turn.get(role), str) or turn[role] not in ROLES:
            raise Unusable("bad_role", f"{name}[{i}].{role}: {turn.get(role)!r}")
        messages.append(
            {"role": ROLES[turn[role]], "content": _content(turn, content, f"{name}[{i}]")}
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise Unusable("no_assistant_turn", name)
    return messages


def label_of(record: dict, task) -> str:
    """A classify record's label: its string, or a whole number's digits; raises Unusable
    (unknown_label) when `task.labels` is set and does not hold it."""
    value = record.get(task.label_field)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    label = _checked(value, task.label_field)
    if task.labels is not None and label not in task.labels:
        raise Unusable("unknown_label", f"{task.label_field}: {label!r} is not in tune.task.labels")
    return label


def answer_ids(tokenizer, label: str) -> list[int]:
    """The tokens of an assistant turn that answers `label`: its text and the template's
    closing (what a classify window ends with, and what each label is scored by)."""
    ids, mask = encode(tokenizer, [{"role": "user", "content": "x"},
                                   {"role": "assistant", "content": label}])  # fmt: skip
    return [i for i, m in zip(ids, mask, strict=True) if m]


def _text(record: dict, name: str | None, optional: bool = False) -> str:
    value = record.get(name) if name else None
    if optional and (value is None or (isinstance(value, str) and not value.strip())):
        return ""  # an optional field left out or blank
    return _checked(value, name)


def _content(turn: dict, key: str, where: str) -> str:
    """A turn's text: a string, or OpenAI content parts that are all text (joined)."""
    value = turn.get(key)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):  # fmt: skip
        value = "".join(p["text"] for p in value)
    return _checked(value, f"{where}.{key}")


def _checked(value, where: str) -> str:
    """`value` if it is a non-blank string; else Unusable naming `where`."""
    if value is None:
        raise Unusable("missing_field", where)
    if not isinstance(value, str):
        raise Unusable("not_a_string", f"{where}: {type(value).__name__}")
    if not value.strip():
        raise Unusable("empty", where)
    return value


def encode(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation: 1 on every assistant turn's tokens (its text
    and what the template closes it with), 0 elsewhere. Turns after the last assistant turn are
    left out.

    The text is cut where each assistant turn starts and ends. Each cut is tokenized whole, as
    the server tokenizes a prompt, and the pieces are the differences; a piece whose whole
    tokenization does not extend the tokens so far (a tokenizer that merges across the cut,
    e.g. "\n\n" then text) is tokenized on its own instead. Raises Unusable: template_refused
    (the template raised), template_mismatch (the turn-by-turn renderings are not prefixes of
    the whole, as with templates that render earlier turns differently), unencodable.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    try:  # per assistant turn: the chat before it with the generation prompt, and through it
        messages = _marked(tokenizer, messages[: last + 1])
        turns = [(_render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False))
                 for i, m in enumerate(messages) if m["role"] == "assistant"]  # fmt: skip
    except LibraryChanged:
        raise  # transformers', not the template's
    except Exception as e:  # jinja's raise_exception(), or any error the template hits
        raise Unusable("template_refused", str(e)) from None
    text, cuts = turns[-1][1], [0]
    for n, (before, through) in enumerate(turns, 1):
        if not through.startswith(before):
            raise Unusable("template_mismatch", f"assistant turn {n}: the chat before it with "
                           "the generation prompt is not where the chat through it begins")  # fmt: skip
        if not text.startswith(through) or len(before) < cuts[-1]:
            raise Unusable("template_mismatch", f"assistant turn {n}: the template renders it "
                           "differently once later turns follow")  # fmt: skip
        cuts += [len(before), len(through)]
    ids, mask = [], []
    try:
        for k, (start, end) in enumerate(itertools.pairwise(cuts)):
            whole = _ids(tokenizer, text[:end])
            if whole[: len(ids)] == ids:
                piece = whole[len(ids) :]
            else:
                piece = _encode_piece(tokenizer, text[start:end]) if end > start else []
            ids += piece
            mask += [k % 2] * len(piece)  # odd pieces are assistant turns
    except ValueError as e:  # transformers: a quoted token that plain text also produces
        raise Unusable("unencodable", str(e)) from None
    return ids, mask


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A served chat's prompt: the conversation and the generation prompt, as `encode` renders it."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         sanitize_control_tokens=True, return_dict=False)  # fmt: skip


def end_ids(model, tokenizer) -> set[int]:
    """The ids an answer ends at, as `generate()` stops: the tokenizer's EOS and every
    `eos_token_id` of the model's generation config (Llama 3 lists `<|eot_id|>` only there)."""
    listed = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *(listed if isinstance(listed, list) else [listed])} - {None}


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)  # fmt: skip


def _marked(tokenizer, messages: list[dict]) -> list[dict]:
    """The messages with each control token in their text wrapped in transformers' markers
    (what `apply_chat_template(sanitize_control_tokens=True)` does before rendering), so the
    tokenizer call with `sanitize_control_tokens=True` encodes those as text."""
    return mark_chat_inputs(tokenizer, messages)


def _ids(tokenizer, text: str) -> list[int]:
    """Text as the server encodes a rendered chat: control tokens the template wrote, and the
    marked ones from message text as text."""
    # verbose=False: a chat longer than model_max_length is the caller's to judge (too_long)
    return tokenizer(text, add_special_tokens=False, sanitize_control_tokens=True,
                     verbose=False)["input_ids"]  # fmt: skip


def _encode_piece(tokenizer, text: str) -> list[int]:
    """A piece from the middle of a rendered chat, tokenized behind a newline that is then
    dropped, so a SentencePiece tokenizer adds no word-start space (transformers' own trick)."""
    newline, out = _ids(tokenizer, "\n"), _ids(tokenizer, "\n" + text)
    return out[len(newline) :] if out[: len(newline)] == newline else _ids(tokenizer, text)
