"""The transformers engine without Ray: where answers end, and one request's failure is its own."""

import shutil

import pytest
import torch

from llm_dist.serve.engine import Job, decode


@pytest.fixture(scope="module")
def loaded(tiny_base):
    from transformers import AutoModelForCausalLM

    from llm_dist.data.tokenizer import load

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), load(tiny_base)


def answer(model, tokenizer, jobs: list[Job]) -> list[tuple[str, str | None, int]]:
    """(text, finish_reason, completion_tokens) of each job, decoded together."""
    texts, last = [""] * len(jobs), [None] * len(jobs)
    for events in decode(model, tokenizer, jobs):
        for i, event in enumerate(events):
            if event is not None:
                texts[i] += event.text
                last[i] = event
    return [(t, e.finish_reason, e.completion_tokens) for t, e in zip(texts, last, strict=True)]


def test_an_end_id_listed_only_in_the_generation_config_ends_the_answer(tiny_base, tmp_path):
    """Llama 3 ends turns with <|eot_id|>, which only generation_config.json lists."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llm_dist.data.tokenizer import load

    folder = tmp_path / "model"
    shutil.copytree(tiny_base, folder)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), load(str(folder))
    ids = tokenizer.encode("def read_config(path):")
    first = int(model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)[0, -1])
    assert first != tokenizer.eos_token_id  # the model's greedy first token: its "end of turn"
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, first]).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert reference.shape[1] == len(ids) + 1  # generate() stops at once
    assert answer(model, tokenizer, [Job(ids, 16, temperature=0)]) == [("", "stop", 0)]


def test_one_request_that_fails_ends_alone(loaded):
    """A batch where one request's sampling fails: the others answer as they do alone."""
    model, tokenizer = loaded
    prompts = ["def wrap(text, width=70):", "import os\n", "class Template:", "x = ["]
    jobs = [Job(tokenizer.encode(p), 12, temperature=0.8, seed=i) for i, p in enumerate(prompts)]
    jobs[1] = Job(jobs[1].ids, 12, temperature=0)
    bad = Job(tokenizer.encode("for line in lines:"), 12, temperature=float("nan"))
    together = answer(model, tokenizer, [*jobs[:2], bad, *jobs[2:]])
    alone = [answer(model, tokenizer, [job])[0] for job in jobs]
    assert [together[i] for i in (0, 1, 3, 4)] == alone
    assert together[2] == ("", "error", 0)
    assert sum(n for _, _, n in alone) >= 12  # the others really decoded


def test_a_tiny_temperature_is_greedy(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("def main():\n    parser = ")
    greedy = answer(model, tokenizer, [Job(ids, 12, temperature=0)])
    assert answer(model, tokenizer, [Job(ids, 12, temperature=1e-30, seed=3)]) == greedy
    reference = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0]
    assert greedy[0][0] == tokenizer.decode(reference[len(ids) :], skip_special_tokens=True)
