"""Task formats: every format becomes the same conversation, and the assistant mask is exact
for real-style chat templates, with quoted special tokens kept as text. Function level."""

import pytest
from architectures import tokenizer

from llm_dist.finetune.formats import (
    DEFAULT_CHAT_TEMPLATE,
    Unusable,
    conversation,
    encode,
    prompt_ids,
)
from llm_dist.tune.config import TaskConfig

# Re-creations of three families of real templates: Llama 3 (BOS, header tokens, trimmed
# content), ChatML (Qwen2: a default system turn), Gemma (BOS, no system role: it raises).
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TEMPLATES = {  # template, its control tokens, what each assistant turn ends with
    "default": (DEFAULT_CHAT_TEMPLATE, [], "<|endoftext|>"),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>\n"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>\n"),
}
ANSWERS = ["Text ends with <|endoftext|> in GPT-2 data.\n\nSo strip it.", "Yes: wrap(text)"]
CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What ends a document? <|endoftext|>"},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": "Is <|im_end|> a turn end?"},
    {"role": "assistant", "content": ANSWERS[1]},
    {"role": "user", "content": "a trailing turn with nothing to learn"},
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_mask_covers_exactly_the_assistant_turns(name):
    template, control, close = TEMPLATES[name]
    tok = tokenizer(template=template)
    tok.add_tokens(control, special_tokens=True)
    chat = CHAT[1:] if name == "gemma" else CHAT
    ids, mask = encode(tok, chat)

    assert len(ids) == len(mask)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "".join(
        answer + close for answer in ANSWERS
    )
    # each prompt is tokenized exactly as the server tokenizes it, BOS included
    for end in (i for i, m in enumerate(chat) if m["role"] == "assistant"):
        prompt = prompt_ids(tok, chat[:end])
        assert ids[: len(prompt)] == prompt
        assert (mask[len(prompt) - 1], mask[len(prompt)]) == (0, 1)  # the answer starts there
    if "bos_token" in template:
        assert ids[0] == tok.bos_token_id
    # the quoted markers are text: the only control ids are those the template writes
    eos_count = 2 if name == "default" else 0  # one per assistant turn, from the template
    assert ids.count(tok.eos_token_id) == eos_count
    if name == "chatml":
        assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1 + 4  # system + 4 turns
    if name == "gemma":
        with pytest.raises(Unusable) as e:
            encode(tok, CHAT)
        assert (e.value.reason, str(e.value)) == ("template_refused", "System role not supported")


TASK = TaskConfig(sources=["x.jsonl"], format="messages")
SAME = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "def wrap(text):\nWrap it."},
    {"role": "assistant", "content": "Wraps text."},
]


@pytest.mark.parametrize(
    ("fmt", "record"),
    [
        ("messages", {"messages": SAME}),
        ("messages", {"messages": [  # the developer role and content parts, as OpenAI sends them
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "def wrap(text):\n"},
                                         {"type": "text", "text": "Wrap it."}]},
            {"role": "assistant", "content": "Wraps text."}]}),
        ("sft", {"prompt": "def wrap(text):\nWrap it.", "response": "Wraps text.",
                 "system": "Be brief.", "id": 7}),
        ("alpaca", {"instruction": "def wrap(text):", "input": "Wrap it.", "output": "Wraps text.",
                    "system": "Be brief."}),
        ("sft", {"prompt": "def wrap(text):\nWrap it.", "response": "Wraps text.", "system": " ",
                 "ignored": {"nested": [1]}}),
        ("sharegpt", {"conversations": [{"from": "system", "value": "Be brief."},
                                        {"from": "human", "value": "def wrap(text):\nWrap it."},
                                        {"from": "gpt", "value": "Wraps text."}]}),
    ],
)  # fmt: skip
def test_every_format_is_the_same_conversation(fmt, record):
    expected = SAME if record.get("system", "given").strip() else SAME[1:]  # blank: no system
    assert conversation(record, TASK.model_copy(update={"format": fmt})) == expected


@pytest.mark.parametrize(
    ("fmt", "record", "reason", "detail"),
    [
        ("sft", {"prompt": "p", "response": 42}, "not_a_string", "response: int"),
        ("sft", {"prompt": "p", "response": None}, "missing_field", "response"),
        ("sft", {"prompt": "p"}, "missing_field", "response"),
        ("alpaca", {"instruction": " ", "output": "o"}, "empty", "instruction"),
        ("messages", {"messages": "hi"}, "not_a_list", "messages is not a list of turns"),
        ("messages", {"messages": [{"role": ["user"], "content": "x"}]}, "bad_role",
         "messages[0].role: ['user']"),
        ("messages", {"messages": [{"role": "tool", "content": "x"}]}, "bad_role",
         "messages[0].role: 'tool'"),
        ("messages", {"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn",
         "messages"),
        ("messages", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "not_a_string", "messages[0].content: list"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "x"},
                                        {"from": "gpt", "value": ""}]}, "empty",
         "conversations[1].value"),
    ],
)  # fmt: skip
def test_an_unusable_record_names_its_reason(fmt, record, reason, detail):
    with pytest.raises(Unusable) as e:
        conversation(record, TASK.model_copy(update={"format": fmt}))
    assert (e.value.reason, str(e.value)) == (reason, detail)


def test_a_template_whose_turns_are_not_prefixes_is_refused_saying_how():
    """What the quarantine and the error say is where the renderings part, not the code again."""
    tok = tokenizer(template=(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant says: {% endif %}"))  # fmt: skip
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(Unusable) as e:
        encode(tok, chat)
    assert (e.value.reason, str(e.value)) == ("template_mismatch", "assistant turn 1: the chat "
            "before it with the generation prompt is not where the chat through it begins")  # fmt: skip
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last and m['role'] == 'assistant' %} (the end){% endif %}\n"
                         "{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")  # fmt: skip
    with pytest.raises(Unusable) as e:
        encode(
            tok,
            [*chat, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}],
        )
    assert (
        str(e.value)
        == "assistant turn 1: the template renders it differently once later turns follow"
    )
