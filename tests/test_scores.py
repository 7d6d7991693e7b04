"""Task metrics against hand-computed values, the lift's interval, and a model's answers against
plain reference loops (labels by likelihood, greedy answers one prompt at a time). Function level."""

import pytest
import torch
from architectures import ARCHITECTURES, build, tokenizer

from llm_dist.finetune.evaluate import TaskEval, answer_span, generate, label_scores, outcome
from llm_dist.finetune.formats import DEFAULT_CHAT_TEMPLATE, answer_ids, encode
from llm_dist.finetune.scores import compute, lift, normalize, per_record
from llm_dist.train.losses import loss_sum_of


def test_generation_metrics_equal_hand_computed_values():
    # exact match after NFKC, case folding and whitespace runs; punctuation counts
    assert normalize("  Ａ  b\n\tC ") == "a b c"
    assert per_record("exact_match", ["The  Cat", "cat.", ""], ["the cat", "cat", ""]).tolist() == [1, 0, 1]  # fmt: skip
    # ROUGE-L: the longest common subsequence "the cat on the mat" is 5 of 6 words each way
    assert per_record("rouge_l", ["the cat is on the mat"], ["the cat sat on the mat"])[0] == pytest.approx(5 / 6)  # fmt: skip
    # chrF, beta 2, over the orders the prediction has: "ab" vs "abc": 1-grams P 1, R 2/3;
    # 2-grams P 1, R 1/2; P 1, R 7/12 -> (1 + 4) P R / (4 P + R) = 35/55
    chrf = per_record("chrf", ["ab", "abc", "xyz"], ["abc", "abc", "abc"])
    assert chrf.tolist() == pytest.approx([35 / 55, 1.0, 0.0])
    # an empty answer (the model ended at once) scores 0 on both overlap metrics
    assert per_record("rouge_l", [""], ["Return the sum."]).tolist() == [0.0]
    assert per_record("chrf", [""], ["Return the sum."]).tolist() == [0.0]
    with pytest.raises(ValueError, match="accuracy is not a generation metric"):
        per_record("accuracy", ["a"], ["a"])


def test_classification_metrics_equal_hand_computed_values():
    # labels 0 0 1 2, predicted 0 1 1 2: accuracy 3/4; F1 per label 2/3, 2/3, 1 -> mean 7/9
    scores = compute(["accuracy", "f1_macro"], {"predicted": [0, 1, 1, 2], "labels": [0, 0, 1, 2]})
    assert scores == pytest.approx({"accuracy": 0.75, "f1_macro": 7 / 9})


def test_the_lift_and_its_paired_interval():
    truth = [0, 0, 1, 2]
    right, wrong = (
        {"predicted": truth, "labels": truth},
        {"predicted": [1, 1, 2, 0], "labels": truth},
    )
    assert lift("accuracy", right, wrong) == {"winner": 1.0, "base": 0.0, "lift": 1.0, "low": 1.0, "high": 1.0}  # fmt: skip
    # the same answers: no lift, and no resample shows one
    same = lift("rouge_l", {"predictions": ["a b", "c"], "references": ["a b", "d"]},
                {"predictions": ["a b", "c"], "references": ["a b", "d"]})  # fmt: skip
    assert (same["lift"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    # the loss is per target token: (1 + 2 + 3) / 3 against (2 + 3 + 4) / 3, one lower per record
    loss = lift("loss", {"loss_sum": [1, 2, 3], "targets": [1, 1, 1]},
                {"loss_sum": [2, 3, 4], "targets": [1, 1, 1]})  # fmt: skip
    assert loss["lift"] == -1.0 and loss["low"] == pytest.approx(-1) and loss["high"] == pytest.approx(-1)  # fmt: skip
    # one record right of two in the winner, none in the base: the interval spans 0 to 1
    half = lift("exact_match", {"predictions": ["x", "y"], "references": ["x", "z"]},
                {"predictions": ["q", "q"], "references": ["x", "z"]})  # fmt: skip
    assert half["lift"] == 0.5 and half["low"] == 0.0 and half["high"] == 1.0
    # one record: a lift, but no interval (None, which JSON can hold)
    one = lift("chrf", {"predictions": ["ab"], "references": ["abc"]}, {"predictions": [""], "references": ["abc"]})  # fmt: skip
    assert one == {"winner": pytest.approx(35 / 55), "base": 0.0, "lift": pytest.approx(35 / 55), "low": None, "high": None}  # fmt: skip


def test_answer_span_is_the_last_assistant_turn():
    assert answer_span([0, 0, 1, 1, 0, 0, 1, 1, 1, 0]) == (6, 9)
    assert answer_span([0, 1, 1, 1]) == (1, 4)
    assert answer_span([0, 0]) == (0, 0)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_labels_scored_by_likelihood_equal_a_plain_loop(arch):
    tok = tokenizer(template=DEFAULT_CHAT_TEMPLATE)
    model = build(arch, tok).eval()
    texts, labels = ["def wrap(text, width=70):", "Return a list of lines.", "x = 1"], ["short", "a longer label", "z"]  # fmt: skip
    prompts, label_ids = [], [answer_ids(tok, label) for label in labels]
    for text in texts:
        ids, mask = encode(tok, [{"role": "user", "content": text}, {"role": "assistant", "content": labels[0]}])  # fmt: skip
        prompts.append(ids[: mask.index(1)])
    got = label_scores(model, prompts, label_ids, "cpu", batch_size=4)
    with torch.no_grad():  # the plain loop: each whole chat, its log-likelihood on the mask
        for i, text in enumerate(texts):
            for k, label in enumerate(labels):
                ids, mask = encode(tok, [{"role": "user", "content": text}, {"role": "assistant", "content": label}])  # fmt: skip
                expected = -loss_sum_of(model, torch.tensor([ids]), torch.tensor([mask])).item()
                assert got[i, k] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # the windows a classify task stores end with the true label's answer: it is found again
    truth = [0, 2, 1]
    rows = [(p + label_ids[k], [0] * len(p) + [1] * len(label_ids[k])) for p, k in zip(prompts, truth, strict=True)]  # fmt: skip
    width = max(len(ids) for ids, _ in rows)
    windows = [{"tokens": torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in rows]),
                "mask": torch.tensor([mask + [0] * (width - len(mask)) for _, mask in rows])}]  # fmt: skip
    task = TaskEval("classify", ("accuracy",), label_ids=tuple(map(tuple, label_ids)))
    answers = outcome(model, tok, windows, task, "cpu")
    assert answers == {"predicted": got.argmax(1).tolist(), "labels": truth}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_batched_greedy_answers_equal_one_prompt_at_a_time(arch):
    tok = tokenizer(template=DEFAULT_CHAT_TEMPLATE)
    model = build(arch, tok).eval()
    prompts = [tok("def fill(text):\n")["input_ids"], tok("x")["input_ids"],
               tok("Wrap a single paragraph of text, returning a list")["input_ids"]]  # fmt: skip
    batched = generate(model, tok, prompts, 12, [], "cpu", batch_size=3)
    for prompt, answer in zip(prompts, batched, strict=True):
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, len(prompt) :].tolist()  # fmt: skip
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id)]
        assert answer == tok.decode(ids, skip_special_tokens=True).strip()
    # a stop string cuts the answer before it; positions bound the new tokens (gpt2: 128)
    some = batched[0][2:5]
    if some.strip():
        cut = generate(model, tok, prompts[:1], 12, [some], "cpu")[0]
        assert cut == batched[0][: batched[0].find(some)].strip()
    if arch == "gpt2":  # 128 positions: a prompt that fills them gets no answer, not an error
        full = (prompts[0] * 200)[:128]
        assert generate(model, tok, [full], 50, [], "cpu") == [""]
        assert isinstance(generate(model, tok, [full[:120]], 50, [], "cpu")[0], str)
