"""The transformers engine without Ray: continuous batching against generate(), where answers
end, and one request's failure is its own."""

import shutil

import pytest
import torch
from architectures import ARCHITECTURES, tokenizer, windowed
from conftest import engine_answers

from llm_dist.serve.engine import Engine, Job

PROMPTS = ["def wrap(text, width=70):", "import os\n", "class Template:", "x = [",
           "for line in lines:", "# Copyright"]  # fmt: skip


def greedy(model, tok, ids: list[int], new: int) -> tuple[str, int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                         pad_token_id=tok.pad_token_id)[0, len(ids) :].tolist()  # fmt: skip
    kept = [t for t in out if t != tok.eos_token_id]
    return tok.decode(kept, skip_special_tokens=True), len(kept)


@pytest.fixture(scope="module")
def loaded(tiny_base):
    from transformers import AutoModelForCausalLM

    from llm_dist.data.tokenizer import load

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), load(tiny_base)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "mistral-window-8", "gemma2-window-8"])
def test_requests_that_join_mid_decode_answer_as_generate_does(arch):
    """Two requests join a third after its 5th token: each greedy answer equals generate()'s.
    The -window-8 models fill their sliding windows while the others join."""
    tok = tokenizer()
    model = windowed(arch, tok)
    engine = Engine(model, tok, max_batch_size=4, max_batch_total_tokens=4096)
    # the first streams (an Event per step), the others get their answer once, at the end
    jobs = [Job(tok.encode(p), 16, temperature=0, stream=i == 0) for i, p in enumerate(PROMPTS[:3])]
    got = engine_answers(engine, jobs, join_after=5)
    for job, (text, finish, n) in zip(jobs, got, strict=True):
        assert (text, n) == greedy(model, tok, job.ids, 16)
        assert finish == ("length" if n == 16 else "stop")
    assert max(engine.steps) == 3  # they did run together


def test_sampled_answers_do_not_depend_on_who_else_is_decoding(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch_size=8, max_batch_total_tokens=4096)
    jobs = [
        Job(tok.encode(p), 12, temperature=0.8, top_p=0.9, seed=i) for i, p in enumerate(PROMPTS)
    ]
    together = engine_answers(engine, jobs, join_after=3)
    alone = [engine_answers(engine, [job])[0] for job in jobs]
    assert together == alone and max(engine.steps) == len(PROMPTS)


def test_the_kv_budget_makes_requests_wait_not_fail(loaded):
    """Room for one request's cache at a time: the second waits, then decodes."""
    model, tok = loaded
    jobs = [Job(tok.encode(p), 12, temperature=0) for p in PROMPTS[:2]]
    budget = max(len(j.ids) + 12 for j in jobs)
    engine = Engine(model, tok, max_batch_size=8, max_batch_total_tokens=budget)
    got = engine_answers(engine, jobs)
    assert [(t, n) for t, _, n in got] == [greedy(model, tok, j.ids, 12) for j in jobs]
    assert set(engine.steps) == {1}  # never both at once


def test_an_end_id_listed_only_in_the_generation_config_ends_the_answer(tiny_base, tmp_path):
    """Llama 3 ends turns with <|eot_id|>, which only generation_config.json lists."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llm_dist.data.tokenizer import load

    folder = tmp_path / "model"
    shutil.copytree(tiny_base, folder)
    model, tok = AutoModelForCausalLM.from_pretrained(folder), load(str(folder))
    ids = tok.encode("def read_config(path):")
    first = int(model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)[0, -1])
    assert first != tok.eos_token_id  # the model's greedy first token: its "end of turn"
    GenerationConfig(eos_token_id=[tok.eos_token_id, first]).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert reference.shape[1] == len(ids) + 1  # generate() stops at once
    engine = Engine(model, tok, max_batch_size=4, max_batch_total_tokens=4096)
    assert engine_answers(engine, [Job(ids, 16, temperature=0)]) == [("", "stop", 0)]


def test_one_request_that_fails_ends_alone(loaded):
    """A batch where one request's sampling fails: the others answer as they do alone."""
    model, tok = loaded
    jobs = [Job(tok.encode(p), 12, temperature=0.8, seed=i) for i, p in enumerate(PROMPTS[:4])]
    jobs[1] = Job(jobs[1].ids, 12, temperature=0)
    bad = Job(tok.encode("for line in lines:"), 12, temperature=float("nan"))
    engine = Engine(model, tok, max_batch_size=8, max_batch_total_tokens=4096)
    together = engine_answers(engine, [*jobs[:2], bad, *jobs[2:]])
    alone = [engine_answers(engine, [job])[0] for job in jobs]
    assert [together[i] for i in (0, 1, 3, 4)] == alone
    assert together[2] == ("", "error", 0)
    assert sum(n for _, _, n in alone) >= 12  # the others really decoded


def test_a_tiny_temperature_is_greedy(loaded):
    model, tok = loaded
    ids = tok.encode("def main():\n    parser = ")
    engine = Engine(model, tok, max_batch_size=4, max_batch_total_tokens=4096)
    tiny = engine_answers(engine, [Job(ids, 12, temperature=1e-30, seed=3)])[0]
    assert (tiny[0], tiny[2]) == greedy(model, tok, ids, 12)


def test_sampling_follows_the_distribution_temperature_and_top_p():
    """Inverse-CDF draws from each row's own generator: frequencies match softmax(logits / T),
    top_p keeps the smallest head whose mass reaches it, and rows do not affect each other."""
    from llm_dist.serve.engine import _sample

    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    n = 4000
    for temperature, top_p, expected in ((1.0, 1.0, [0.5, 0.25, 0.15, 0.1]),
                                         (1.0, 0.7, [2 / 3, 1 / 3, 0, 0]),
                                         (0.5, 1.0, [0.25 / 0.3525, 0.0625 / 0.3525,
                                                     0.0225 / 0.3525, 0.01 / 0.3525])):  # fmt: skip
        job = Job([1], 1, temperature=temperature, top_p=top_p)
        generator = torch.Generator().manual_seed(0)
        draws = [_sample(logits[None], [job], [generator])[0] for _ in range(n)]
        freq = [draws.count(t) / n for t in range(4)]
        assert all(abs(f - e) < 0.03 for f, e in zip(freq, expected, strict=True)), freq
    jobs = [Job([1], 1, temperature=0.9, seed=s) for s in range(3)]
    alone = [_sample(logits[None], [j], [torch.Generator().manual_seed(7)])[0] for j in jobs]
    generators = [torch.Generator().manual_seed(7) for _ in jobs]
    assert _sample(logits.expand(3, 4), jobs, generators) == alone


def test_a_cancelled_request_leaves_the_batch(loaded):
    """A client that goes away (the app marks its request cancelled): its row is dropped at the
    next step, it gets nothing more, and the others go on to their own answers."""
    import threading

    model, tok = loaded
    engine = Engine(model, tok, max_batch_size=4, max_batch_total_tokens=4096)
    seen, submitted, done = [], threading.Event(), threading.Event()
    leaving: list = []

    def gone(event):  # runs in the engine's thread, as the app's delivery does
        seen.append(event)
        if event.completion_tokens == 3:
            submitted.wait(10)
            leaving[0].cancelled = True

    leaving.append(engine.submit(Job(tok.encode(PROMPTS[0]), 60, temperature=0), gone))
    submitted.set()
    staying = Job(tok.encode(PROMPTS[1]), 40, temperature=0)
    got = []
    engine.submit(staying, lambda e: (got.append(e), e.finish_reason and done.set()))
    assert done.wait(30)
    assert [e.completion_tokens for e in seen] == [1, 2, 3]  # nothing after the cancel
    alone = engine_answers(Engine(model, tok, 4, 4096), [staying])[0]
    assert "".join(e.text for e in got) == alone[0]


def test_a_failing_forward_pass_ends_its_requests_and_the_loop_goes_on(tiny_base):
    """A forward pass that raises (as an out-of-memory error would) ends the requests in it
    with finish_reason "error"; the next request decodes normally."""
    from transformers import AutoModelForCausalLM

    from llm_dist.data.tokenizer import load

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_base).eval(), load(tiny_base)
    poison = tok.encode("import os\n")

    def hook(module, args, kwargs):
        if poison[0] in kwargs["input_ids"].tolist()[0]:
            raise RuntimeError("out of memory (injected)")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    engine = Engine(model, tok, max_batch_size=4, max_batch_total_tokens=4096)
    bad = engine_answers(engine, [Job(poison, 8, temperature=0)])
    assert bad == [("", "error", 0)]
    ids = tok.encode(PROMPTS[0])
    assert ids and poison[0] not in ids
    good = engine_answers(engine, [Job(ids, 8, temperature=0)])[0]
    assert (good[0], good[2]) == greedy(model, tok, ids, 8)


@pytest.mark.parametrize("arch", ["llama", "mistral-window-8", "gemma2-window-8"])
def test_the_cache_stays_within_its_rows_under_steady_load(arch):
    """A request joins every 3rd step and each lives 8 steps, so the batch never empties: the
    padding left by rows that have gone is cut, on full and sliding-window layers alike."""
    from llm_dist.serve.batch import Batch

    tok = tokenizer()
    model = windowed(arch, tok)
    batch, rows = None, []  # rows: [prompt length, steps left] in batch order
    with torch.inference_mode():
        for step in range(60):
            prompt = tok.encode(PROMPTS[step % len(PROMPTS)])[: 3 + step % 5]
            new = Batch.prefill(model, [prompt], tok.pad_token_id) if step % 3 == 0 else None
            if batch is not None:
                batch.step(model)
            everyone = rows + ([[len(prompt), 8]] if new else [])
            for row in everyone:
                row[1] -= 1
            keep = [k for k, row in enumerate(everyone) if row[1] > 0]
            batch = Batch.merged(batch, new, keep, len(rows), [5] * len(keep))
            rows = [everyone[k] for k in keep]
            longest = max(n + 8 - left for n, left in rows)  # tokens a row holds, and its next
            assert batch.mask.shape[1] <= longest, step
            assert all(
                layer.keys.shape[-2] <= batch.mask.shape[1] - 1 for layer in batch.cache.layers
            )


def test_a_greedy_row_with_non_finite_scores_ends_alone():
    from llm_dist.serve.engine import _sample

    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 2.0, 1.0]])
    jobs = [Job([1], 1, temperature=0), Job([1], 1, temperature=0)]
    assert _sample(logits, jobs, [None, None]) == [None, 1]


def test_a_failing_prefill_ends_only_the_newcomers(tiny_base):
    """A newcomer whose prefill fails (as an out-of-memory error would) ends alone; the
    request already decoding finishes with its own answer."""
    import threading

    from transformers import AutoModelForCausalLM

    from llm_dist.data.tokenizer import load

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_base).eval(), load(tiny_base)
    poison = tok.encode("import os\n")

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1 and poison[0] in kwargs["input_ids"].flatten().tolist():
            raise RuntimeError("out of memory (injected)")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    engine = Engine(model, tok, max_batch_size=4, max_batch_total_tokens=4096)
    ids, got, bad = tok.encode(PROMPTS[0]), [], []
    second, done = threading.Event(), threading.Event()

    def running(event):
        got.append(event)
        if event.completion_tokens == 2:
            engine.submit(Job(poison, 8, temperature=0), lambda e: (bad.append(e), second.set()))
        if event.finish_reason:
            done.set()

    engine.submit(Job(ids, 12, temperature=0), running)
    assert done.wait(30) and second.is_set()
    assert [(e.finish_reason, e.error[:12]) for e in bad] == [("error", "RuntimeError")]
    assert ("".join(e.text for e in got), got[-1].completion_tokens) == greedy(model, tok, ids, 12)
