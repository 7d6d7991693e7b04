"""Task records as chat conversations, rendered by the base model's own chat template.

Every format becomes OpenAI-style `messages` first (`conversation`): `messages` as it is
(`developer` turns are system turns, as OpenAI treats them; content a string or a list of text
parts), alpaca's instruction (+ input) as the user turn and output as the assistant's,
sharegpt's `conversations` of from/value (human, gpt, system), and `sft`'s prompt/response.

`encode` renders a conversation exactly as serving renders a prompt: the model's template
(`DEFAULT_CHAT_TEMPLATE` only when it has none), BOS and every control token the template
writes, and message text encoded as text, so a quoted `<|endoftext|>` never becomes the
control token (transformers' `sanitize_control_tokens`). The loss mask is exact for any
template: the text of each assistant turn is what the template adds between rendering the
conversation before it with the generation prompt and rendering it through that turn, and each
such piece is tokenized on its own, so every prompt is tokenized as the server tokenizes it.
"""

import itertools

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
    }[task.format] + ([task.group_field] if task.group_field else [])  # fmt: skip


def conversation(record: dict, task) -> list[dict]:
    """The record as `[{"role", "content"}, ...]`; raises Unusable (missing_field, not_a_string,
    empty, bad_role, no_assistant_turn)."""
    system = _text(record, task.system_field, optional=True)
    head = [{"role": "system", "content": system}] if system else []
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
        raise Unusable("not_a_string", f"{name} is not a list of turns")
    role, content = ("role", "content") if task.format == "messages" else ("from", "value")
    messages = head
    for i, turn in enumerate(turns):
        if turn.get(role) not in ROLES:
            raise Unusable("bad_role", f"{name}[{i}].{role}: {turn.get(role)!r}")
        messages.append(
            {"role": ROLES[turn[role]], "content": _content(turn, content, f"{name}[{i}]")}
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise Unusable("no_assistant_turn", name)
    return messages


def _text(record: dict, name: str | None, optional: bool = False) -> str:
    value = record.get(name) if name else None
    if value is None or (optional and value == ""):
        if optional:
            return ""
        raise Unusable("missing_field", name)
    if not isinstance(value, str):
        raise Unusable("not_a_string", f"{name}: {type(value).__name__}")
    if not value.strip():
        raise Unusable("empty", name)
    return value


def _content(turn: dict, key: str, where: str) -> str:
    """A turn's text: a string, or OpenAI content parts that are all text (joined)."""
    value = turn.get(key)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):  # fmt: skip
        value = "".join(p["text"] for p in value)
    if value is None:
        raise Unusable("missing_field", f"{where}.{key}")
    if not isinstance(value, str):
        raise Unusable("not_a_string", f"{where}.{key}: {type(value).__name__}")
    if not value.strip():
        raise Unusable("empty", f"{where}.{key}")
    return value


def encode(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation: 1 on every assistant turn's tokens (its text
    and what the template closes it with), 0 elsewhere. Turns after the last assistant turn are
    left out. Raises Unusable: template_refused (the template raised), template_mismatch
    (rendering the conversation turn by turn does not give prefixes of the whole)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = _marked(tokenizer, messages[: last + 1])
    try:  # per assistant turn: the chat before it with the generation prompt, and through it
        turns = [(_render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False))
                 for i, m in enumerate(messages) if m["role"] == "assistant"]  # fmt: skip
    except Exception as e:  # jinja's raise_exception(), or any error the template hits
        raise Unusable("template_refused", str(e)) from None
    text, cuts = turns[-1][1], [0]
    for before, through in turns:
        if not (
            text.startswith(through) and through.startswith(before) and len(before) >= cuts[-1]
        ):
            raise Unusable("template_mismatch")
        cuts += [len(before), len(through)]
    ids, mask = [], []
    for k, (start, end) in enumerate(itertools.pairwise(cuts)):
        piece = _encode_piece(tokenizer, text[start:end], first=start == 0) if end > start else []
        ids += piece
        mask += [k % 2] * len(piece)  # odd pieces are assistant turns
    return ids, mask


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A served chat's prompt: the conversation and the generation prompt, as `encode` renders it."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         sanitize_control_tokens=True, return_dict=False)  # fmt: skip


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)  # fmt: skip


def _marked(tokenizer, messages: list[dict]) -> list[dict]:
    """The messages with each control token in their text wrapped in transformers' markers
    (what `apply_chat_template(sanitize_control_tokens=True)` does before rendering), so the
    tokenizer call with `sanitize_control_tokens=True` encodes those as text."""
    marked, *_ = tokenizer._mark_chat_inputs(tokenizer.get_chat_template(), [messages], None,
                                             None, {}, True, False)  # fmt: skip
    return marked[0]


def _encode_piece(tokenizer, text: str, first: bool) -> list[int]:
    """A piece of a rendered chat: at its start as it is, later behind a newline that is then
    dropped, so a SentencePiece tokenizer adds no word-start space (transformers' own trick)."""

    def ids(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]

    if first:
        return ids(text)
    newline, out = ids("\n"), ids("\n" + text)
    return out[len(newline) :] if out[: len(newline)] == newline else ids(text)
