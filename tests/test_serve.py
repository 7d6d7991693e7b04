"""The served API on a real local Ray: real HTTP on loopback, the official `openai` client.

One application stays up for the module: a 2-layer random Llama with a chat template, API keys
from an environment variable, batches of up to 4 requests, at most 20 new tokens.
Served text is compared with transformers' own `generate()` on the same folder.
"""

import json
import shutil
import threading
import urllib.error
import urllib.request

import openai
import pytest
import torch

from llm_dist.spec import JobSpec

pytestmark = pytest.mark.slow
KEYS_ENV, KEY = "LLM_DIST_TEST_KEYS", "sk-test-one"
PROMPTS = ["def wrap(text, width=70):", "import os\n", "class Template:", "    return self._",
           "# Copyright", "def main():\n    parser = ", "x = [", "for line in lines:"]  # fmt: skip


@pytest.fixture(scope="module")
def model_folder(tiny_base, tmp_path_factory) -> str:
    """The tiny base with the chat template tuned exports carry, made to refuse a chat that
    opens with an assistant turn (as Llama 2's and Mistral's templates refuse odd orders)."""
    from llm_dist.data.tokenizer import load
    from llm_dist.finetune.formats import DEFAULT_CHAT_TEMPLATE

    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_base, folder)
    tokenizer = load(str(folder))
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}"
        "{{ raise_exception('a chat must not open with an assistant turn') }}{% endif %}"
        + DEFAULT_CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(ray_session, serve_port, model_folder, tmp_path_factory, monkeypatch_module):
    from ray import serve

    from llm_dist.serve.run import deploy

    monkeypatch_module.setenv(KEYS_ENV, f"{KEY}, sk-test-two")
    spec = JobSpec(
        name="served", storage_path=str(tmp_path_factory.mktemp("runs")), stages=["serve"],
        serve={"model": model_folder, "port": serve_port, "api_keys_env": KEYS_ENV,
               "max_batch_size": 4, "max_tokens": 20,
               "max_prompt_tokens": 40, "cpus_per_replica": 1},
    )  # fmt: skip
    outputs = deploy(spec, f"{spec.storage_path}/served")
    yield {"url": outputs.url, "outputs": outputs}
    serve.delete("served")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def reference(model_folder):
    """transformers' greedy generate() in this process, on the same folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()

    def generate(ids: list[int], new: int = 20) -> tuple[str, int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)[0]
        new_ids = out[len(ids) :].tolist()
        n = len([t for t in new_ids if t != tokenizer.eos_token_id])
        return tokenizer.decode(new_ids, skip_special_tokens=True), n

    return tokenizer, generate


def client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=key, max_retries=0, timeout=60)


def post(server, route: str, body, key: str | None = KEY) -> tuple[int, dict]:
    """A raw HTTP request: for what the openai client will not send."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | (
        {"Authorization": f"Bearer {key}"} if key else {}
    )
    request = urllib.request.Request(f"{server['url']}{route}", data, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(server) -> dict:
    with urllib.request.urlopen(f"{server['url']}/health", timeout=10) as r:
        return json.load(r)


def test_deploy_answers_the_test_prompt_and_lists_the_model(server):
    out = server["outputs"]
    assert out.source == "serve.model" and out.usage["completion_tokens"] <= 20
    assert out.usage["prompt_tokens"] > 0
    assert [m.id for m in client(server).models.list()] == ["served"]
    assert health(server)["status"] == "ok"


def test_greedy_completion_equals_generate_in_process(server, reference):
    tokenizer, generate = reference
    for prompt in PROMPTS[:3]:
        r = client(server).completions.create(model="served", prompt=prompt, max_tokens=20,
                                              temperature=0)  # fmt: skip
        ids = tokenizer.encode(prompt)
        text, n = generate(ids)
        assert r.choices[0].text == text
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
        assert r.usage.total_tokens == len(ids) + n
        assert r.choices[0].finish_reason == ("length" if n == 20 else "stop")


def test_chat_uses_the_chat_template(server, reference):
    tokenizer, generate = reference
    messages = [{"role": "user", "content": "def read_config(path):"}]
    r = client(server).chat.completions.create(model="served", messages=messages,
                                               max_tokens=12, temperature=0)  # fmt: skip
    ids = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(ids, add_special_tokens=False)
    assert ids[-1] == tokenizer.encode("\n", add_special_tokens=False)[-1]  # "content\n"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == generate(ids, 12)[0]
    assert r.usage.prompt_tokens == len(ids)


def test_streamed_chunks_add_up_to_the_whole_answer(server):
    c = client(server)
    whole = c.completions.create(model="served", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    chunks = list(c.completions.create(model="served", prompt=PROMPTS[0], max_tokens=20,
                                       temperature=0, stream=True))  # fmt: skip
    assert len(chunks) > 2
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])

    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = c.chat.completions.create(model="served", messages=messages, temperature=0)
    chunks = list(c.chat.completions.create(model="served", messages=messages, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_seed_and_stop(server):
    c = client(server)

    def sample(seed):
        return c.completions.create(model="served", prompt=PROMPTS[1], max_tokens=20,
                                    temperature=1.0, top_p=0.9, seed=seed).choices[0].text  # fmt: skip

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = c.completions.create(model="served", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    text = greedy.choices[0].text
    assert len(text) >= 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    r = c.completions.create(model="served", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                             stop=[stop, "\x00never"])  # fmt: skip
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="served", prompt=PROMPTS[0], max_tokens=20,
                                    temperature=0, stop=stop, stream=True)  # fmt: skip
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_concurrent_requests_are_batched_and_match_one_by_one(server, reference):
    tokenizer, generate = reference
    before = health(server)["steps"]
    answers: dict[int, str] = {}

    def ask(i):
        r = client(server).completions.create(model="served", prompt=PROMPTS[i], max_tokens=20,
                                              temperature=0)  # fmt: skip
        answers[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(answers) == len(PROMPTS)
    after = health(server)["steps"]
    grown = {int(k) for k, v in after.items() if v > before.get(k, 0)}
    assert max(grown) > 1, f"no step above 1 request: {after}"
    assert max(grown) <= 4  # serve.max_batch_size
    for i, prompt in enumerate(PROMPTS):  # left padding and joining mid-decode change nothing
        assert answers[i] == generate(tokenizer.encode(prompt))[0]


def test_api_keys_are_required(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").completions.create(model="served", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").models.list()
    # no key and a bad body: 401, not 422, since the body is not read without a key
    status, body = post(server, "/v1/completions", {"model": "served", "temperature": 9}, key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    second = client(server, key="sk-test-two")  # every key of the list works
    assert second.completions.create(model="served", prompt="x", max_tokens=2).usage
    assert health(server)["status"] == "ok"  # the health route is open to probes


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"model": "served", "messages": [{"role": "tool", "content": "x"}]}, 422, "messages.0.role: Input should be"),
    ({"model": "served", "prompt": "x", "temperature": 5}, 422, "temperature: Input should be less than or equal to 2"),
    ({"model": "served", "prompt": "x", "n": 2}, 422, "n: not supported by this server (accepted only at its neutral value 1)"),
    ({"model": "served", "prompt": "x", "logprobs": 3}, 422, "logprobs: not supported by this server"),
    ({"model": "served", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "5 stop strings; this server takes at most 4 (serve.max_stop_strings)"),
    ({"model": "served", "prompt": "x" * 262_145}, 413, "the prompt holds 262,145 characters; this server takes at most 262,144"),
    ({"model": "served", "prompt": "x", "user": "u" * 257}, 400, "user (each) is longer than 256 characters"),
    ({"model": "served"}, 422, "prompt: Field required"),
    ({"model": "served", "prompt": "x", "max_tokens": 0}, 422, "max_tokens: Input should be greater than or equal to 1"),
    (b'{"model": "served", "prompt": ', 422, "Invalid JSON"),
    ({"model": "other", "prompt": "x"}, 404, "model 'other' is not served here; this server serves 'served'"),
    ({"model": "served", "prompt": "word " * 60}, 413, "tokens; this server takes at most 40"),
])  # fmt: skip
def test_bad_requests_get_clear_errors(server, body, status, message):
    chat = isinstance(body, dict) and "messages" in body
    got, answer = post(server, f"/v1/{'chat/' if chat else ''}completions", body)
    assert got == status and message in answer["error"]["message"], answer
    # nothing was lost: the replica still answers
    assert client(server).completions.create(model="served", prompt="x", max_tokens=1).usage


def test_a_4_mb_prompt_is_refused_while_a_stream_goes_on(server):
    """A body over serve.max_request_bytes (1 MiB) is refused as it arrives, sent with a
    Content-Length or chunked, while another request streams on to its whole answer."""
    c = client(server)
    whole = c.completions.create(model="served", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    body = json.dumps({"model": "served", "prompt": "x" * 4_000_000}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    url = f"{server['url']}/v1/completions"
    stream = c.completions.create(model="served", prompt=PROMPTS[1], max_tokens=20,
                                  temperature=0, stream=True)  # fmt: skip
    chunks = [next(stream)]  # the stream is under way
    for data in (body, (body[i : i + 65536] for i in range(0, len(body), 65536))):  # chunked
        request = urllib.request.Request(url, data, headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
        assert json.loads(refused.value.read())["error"]["message"] == (
            "the request body is over 1,048,576 bytes, the most this server takes "
            "(serve.max_request_bytes)"
        )
    chunks += list(stream)
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert health(server)["status"] == "ok"


def test_max_tokens_is_capped_by_the_spec(server):
    r = client(server).completions.create(model="served", prompt=PROMPTS[0], max_tokens=10_000,
                                          temperature=0)  # fmt: skip
    assert r.usage.completion_tokens <= 20
    assert r.usage.completion_tokens == 20 or r.choices[0].finish_reason == "stop"


def test_bad_requests_among_good_ones_cost_only_themselves(server, reference):
    """Eight requests at once in the shapes clients send: each bad one gets its own 4xx naming
    the field, and each good one the answer it gets alone (and that generate() gives)."""
    tokenizer, generate = reference
    text = [{"type": "text", "text": "def read_"}, {"type": "text", "text": "config(path):"}]
    image = [{"type": "image_url", "image_url": {"url": "https://127.0.0.1/x.png"}}]
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False,
               "logit_bias": {}, "n": 1, "user": "u"}  # fmt: skip
    say = lambda *turns: [{"role": r, "content": c} for r, c in turns]  # noqa: E731
    requests = [
        ("", {"prompt": PROMPTS[0], **neutral}),
        ("chat/", {"messages": say(("user", text))}),
        ("chat/", {"messages": say(("developer", "Be brief."), ("user", PROMPTS[2]))}),
        ("", {"prompt": PROMPTS[3], "temperature": 1e-30}),  # greedy: no overflow
        ("chat/", {"messages": say(("assistant", "Hello."), ("user", "x"))}),
        ("", {"prompt": PROMPTS[4], "seed": 2**64, "temperature": 1}),
        ("chat/", {"messages": say(("user", image))}),
        ("", {"prompt": PROMPTS[5], "max_completion_tokens": 5}),  # a chat-only field
    ]
    answers: dict[int, tuple[int, dict]] = {}

    def ask(i):
        route, body = requests[i]
        body = {"model": "served", "max_tokens": 20, "temperature": 0, **body}
        answers[i] = post(server, f"/v1/{route}completions", body)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    together = dict(answers)
    for i in range(len(requests)):  # then each alone
        ask(i)
    content = lambda b: {k: b.get(k) for k in ("choices", "usage", "error")}  # noqa: E731
    assert {i: (s, content(b)) for i, (s, b) in together.items()} == {
        i: (s, content(b)) for i, (s, b) in answers.items()
    }
    assert [together[i][0] for i in range(len(requests))] == [
        200,
        200,
        200,
        200,
        400,
        422,
        422,
        422,
    ]
    assert "a chat must not open with an assistant turn" in together[4][1]["error"]["message"]
    assert together[4][1]["error"]["param"] == "messages"
    assert (
        together[5][1]["error"]["message"] == "seed: Input should be less than 18446744073709551616"
    )
    assert "messages.0.content: part 0 is of type 'image_url'" in together[6][1]["error"]["message"]
    assert (
        together[7][1]["error"]["message"] == "max_completion_tokens: not supported by this server"
    )
    chats = {1: [{"role": "user", "content": "def read_config(path):"}],
             2: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}]}  # fmt: skip
    for i, (status, body) in together.items():
        if status != 200:
            continue
        if i in chats:
            rendered = tokenizer.apply_chat_template(chats[i], tokenize=False,
                                                     add_generation_prompt=True)  # fmt: skip
            ids = tokenizer.encode(rendered, add_special_tokens=False)
            assert body["choices"][0]["message"]["content"] == generate(ids)[0]
        else:
            ids = tokenizer.encode(requests[i][1]["prompt"])
            assert body["choices"][0]["text"] == generate(ids)[0]
        assert body["usage"]["prompt_tokens"] == len(ids)
