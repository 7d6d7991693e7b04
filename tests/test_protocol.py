"""Request bodies as current OpenAI clients send them: accepted, or refused naming the field."""

import json

import pytest

from llm_dist.serve import protocol


def chat(**fields) -> protocol.ChatRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return protocol.parse(protocol.ChatRequest, json.dumps(body).encode())


def refusal(kind=protocol.ChatRequest, **fields) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    if kind is protocol.CompletionRequest:
        body = {"model": "m", "prompt": "x", **fields}
    with pytest.raises(ValueError) as err:
        protocol.parse(kind, json.dumps(body).encode())
    return str(err.value)


def turns(request) -> list[dict]:
    return [m.model_dump(exclude_none=True) for m in request.messages]


def test_text_parts_are_joined_and_other_parts_refused_by_name():
    plain = chat(messages=[{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Say something happy"}])  # fmt: skip
    parts = chat(messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Say "},
                                     {"type": "text", "text": "something happy"}]},
    ])  # fmt: skip
    assert turns(parts) == turns(plain)
    image = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]  # fmt: skip
    assert refusal(messages=[{"role": "user", "content": image}]) == (
        "messages.0.content: part 1 is of type 'image_url'; this text-only model takes text "
        "parts only ({'type': 'text', 'text': ...})"
    )
    assert "part 0 is of type 'str'" in refusal(messages=[{"role": "user", "content": ["hi"]}])


def test_a_developer_turn_is_a_system_turn():
    system = chat(messages=[{"role": "system", "content": "One line."},
                            {"role": "user", "content": "hi"}])  # fmt: skip
    developer = chat(messages=[{"role": "developer", "content": "One line."},
                               {"role": "user", "content": "hi"}])  # fmt: skip
    assert turns(developer) == turns(system)
    assert "messages.0.role: Input should be" in refusal(
        messages=[{"role": "tool", "content": "x"}]
    )


def test_neutral_values_of_unsupported_fields_are_accepted():
    """What LangChain, UIs and the playground's exported code send unprompted."""
    sent = {"top_p": 1.0, "n": 1, "frequency_penalty": 0.0, "presence_penalty": 0,
            "logprobs": False, "logit_bias": {}, "user": "u-1", "max_completion_tokens": 5,
            "stream_options": {"include_usage": True}, "response_format": {"type": "text"},
            "tools": [], "tool_choice": "none", "parallel_tool_calls": True, "store": False,
            "top_logprobs": None, "metadata": {}, "service_tier": "auto", "modalities": ["text"]}  # fmt: skip
    request = chat(**sent)
    assert request.max_completion_tokens == 5 and request.user == "u-1"
    assert request.stream_options.include_usage
    for field, values in protocol.NEUTRAL.items():
        for value in values:
            assert chat(**{field: value}).model == "m", (field, value)
    completion = {"model": "m", "prompt": "x", "echo": False, "best_of": 1, "suffix": None}
    assert protocol.parse(protocol.CompletionRequest, json.dumps(completion).encode()).prompt


@pytest.mark.parametrize(("fields", "message"), [
    ({"presence_penalty": 0.5}, "presence_penalty: not supported by this server (accepted only at its neutral value 0)"),
    ({"logprobs": True}, "logprobs: not supported by this server (accepted only at its neutral value false)"),
    ({"logprobs": 0}, "logprobs: not supported by this server"),  # 0 is not false
    ({"logit_bias": {"50256": -100}}, "logit_bias: not supported by this server (accepted only at its neutral value {})"),
    ({"n": 2}, "n: not supported by this server (accepted only at its neutral value 1)"),
    ({"response_format": {"type": "json_object"}}, "response_format: not supported by this server"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools: not supported by this server"),
    ({"functions": []}, "functions: not supported by this server"),
])  # fmt: skip
def test_a_real_request_for_a_missing_feature_is_refused_by_name(fields, message):
    assert message in refusal(**fields)


@pytest.mark.parametrize(("fields", "message"), [
    ({"seed": 2**64}, "seed: Input should be less than 18446744073709551616"),
    ({"seed": -(2**63) - 1}, "seed: Input should be greater than or equal to -9223372036854775808"),
    ({"temperature": 2.5}, "temperature: Input should be less than or equal to 2"),
    ({"top_p": 0}, "top_p: Input should be greater than 0"),
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"max_completion_tokens": -1}, "max_completion_tokens: Input should be greater than or equal to 1"),
    ({"stop": ["a", ""]}, "stop: an empty stop string would stop at once; leave it out"),
    ({"messages": []}, "messages: List should have at least 1 item"),
])  # fmt: skip
def test_every_range_is_checked_before_a_request_joins_a_batch(fields, message):
    assert message in refusal(**fields)
    assert chat(seed=2**64 - 1).seed == 2**64 - 1 and chat(seed=-(2**63)).seed == -(2**63)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(number):
    body = f'{{"model": "m", "prompt": "x", "temperature": {number}}}'.encode()
    with pytest.raises(ValueError, match="temperature: Input should be a finite number"):
        protocol.parse(protocol.CompletionRequest, body)


def test_text_utf8_cannot_hold_is_refused_before_tokenizing():
    """JSON may escape a lone surrogate; the tokenizer could not take it."""
    for escape in (b"\\ud83d", b"\\udc80 low"):
        body = b'{"model": "m", "prompt": "half an emoji ' + escape + b'"}'
        with pytest.raises(ValueError, match=r"body: Invalid JSON: .*(hex escape|surrogate)"):
            protocol.parse(protocol.CompletionRequest, body)


def test_null_is_the_default_and_a_boolean_is_not_a_number():
    request = chat(temperature=None, top_p=None, stream=None, seed=None, stop=None, n=None)
    assert (request.temperature, request.top_p, request.stream) == (1.0, 1.0, False)
    assert "seed: Input should be a valid integer" in refusal(seed=True)
    assert "max_tokens: Input should be a valid integer" in refusal(max_tokens=True)
    assert chat(tools=[], tool_choice="auto").model == "m"  # auto, with no tools, asks nothing


def test_api_keys_match_by_hash_with_any_case_of_bearer():
    import hashlib

    hashes = [hashlib.sha256(b"sk-one").hexdigest()]
    assert protocol.authorized("Bearer sk-one", hashes)
    assert protocol.authorized("bearer  sk-one ", hashes)
    assert not protocol.authorized("Bearer sk-two", hashes)
    assert not protocol.authorized("Basic sk-one", hashes) and not protocol.authorized("", hashes)
    assert protocol.authorized("", [])  # no keys: open


LIMITS = {"max_request_bytes": 4096, "max_prompt_chars": 10, "max_messages": 2,
          "max_stop_strings": 1, "max_field_chars": 3}  # fmt: skip


@pytest.mark.parametrize(("fields", "over"), [
    ({"messages": [{"role": "user", "content": "a"}] * 3},
     (400, "messages", "3 messages; this server takes at most 2 (serve.max_messages)")),
    ({"messages": [{"role": "user", "content": "abcdef"}] * 2},
     (413, "messages", "the messages holds 12 characters; this server takes at most 10 (serve.max_prompt_chars)")),
    ({"stop": ["a", "b"]}, (400, "stop", "2 stop strings; this server takes at most 1 (serve.max_stop_strings)")),
    ({"stop": "abcd"}, (400, "stop", "stop (each) is longer than 3 characters, the most this server takes (serve.max_field_chars)")),
    ({"user": "abcd"}, (400, "user", "user (each) is longer than 3 characters, the most this server takes (serve.max_field_chars)")),
    ({"model": "abcd"}, (400, "model", "model (each) is longer than 3 characters, the most this server takes (serve.max_field_chars)")),
    ({"messages": [{"role": "user", "content": "a", "name": "abcd"}]},
     (400, "messages", "a message's name is longer than 3 characters, the most this server takes (serve.max_field_chars)")),
    ({}, None), ({"stop": "abc", "user": "u"}, None),
])  # fmt: skip
def test_every_free_text_field_is_bounded_by_a_serve_limit_it_names(fields, over):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | fields
    request = protocol.parse(protocol.ChatRequest, json.dumps(body).encode())
    assert protocol.over_limit(request, LIMITS) == over
    prompt = protocol.parse(protocol.CompletionRequest, b'{"model": "m", "prompt": "12345678901"}')
    assert protocol.over_limit(prompt, LIMITS) == (
        413,
        "prompt",
        "the prompt holds 11 characters; this server takes at most 10 (serve.max_prompt_chars)",
    )
