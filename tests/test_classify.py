"""Classification as a tune task on a real local Ray: labels scored by likelihood at every
evaluation, ASHA deciding on val_accuracy, the winner and the base scored once on test."""

import ast
import csv
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import STDLIB_MODULES

from llm_dist.data.stdlib import _signature_docstrings
from llm_dist.spec import JobSpec
from llm_dist.tune.run import run_stage

# The documented functions of these modules are one label, the rest's the other: both labels
# are one token in the base's tokenizer, so the base's choice is not a matter of length.
FILES = ("mailbox.py", "tarfile.py", "zipfile.py")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_base) -> tuple[str, list[str]]:
    """(records file, label set): signature and docstring -> which of two kinds of module, and
    three records whose label is not in the set (quarantined). The rarer label is the one the
    un-tuned base prefers, so a trial that learns even the labels' frequencies beats it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_dist.finetune.evaluate import label_scores
    from llm_dist.finetune.formats import DEFAULT_CHAT_TEMPLATE, answer_ids, encode

    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.chat_template = tok.chat_template or DEFAULT_CHAT_TEMPLATE  # as the tune stage does
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    words, prompts = ["file", "text"], []
    for text in ("def f(x):\nReturn x.", "def read(self, n):\nRead n bytes."):
        ids, mask = encode(tok, [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}])  # fmt: skip
        prompts.append(ids[: mask.index(1)])
    with torch.no_grad():
        scores = label_scores(model, prompts, [answer_ids(tok, w) for w in words], "cpu")
    rare, common = (words[k] for k in np.argsort(-scores.mean(0)))
    lib = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("classify") / "labelled.jsonl"
    with open(path, "w") as f:
        for module in STDLIB_MODULES:
            for prompt, response in _signature_docstrings(ast.parse((lib / module).read_text())):
                record = {"text": f"{prompt}\n{response}"[:80], "label": rare if module in FILES else common}  # fmt: skip
                f.write(json.dumps(record) + "\n")
        for label in ("other", common.upper(), 7):
            f.write(json.dumps({"text": "def f(x):\nReturn x.", "label": label}) + "\n")
    return str(path), sorted(words)


@pytest.mark.slow
def test_a_classification_sweep_decides_on_val_accuracy(ray_session, tmp_path, labelled, tiny_base):
    """Two trials one after the other: one learns, one (lr 1e-6) stays at the base's answers
    and ASHA stops it at its first rung on val_accuracy."""
    from llm_dist.finetune.evaluate import task_of
    from llm_dist.finetune.scores import lift
    from llm_dist.tune.winner import outcome_on_test

    tune = {"base_model": tiny_base, "max_steps": 20, "eval_every": 5, "micro_batch_size": 8,
            "task": {"sources": [labelled[0]], "format": "classify", "labels": labelled[1],
                     "val_fraction": 0.15, "test_fraction": 0.2},
            "metric": "val_accuracy", "scheduler": "asha", "grace_period": 1, "reduction_factor": 3,
            "max_concurrent_trials": 1, "num_samples": 1, "method": "full",
            "search_space": {"lr": {"grid": [3e-3, 1e-6]}}}  # fmt: skip
    spec = JobSpec(name="c", storage_path=str(tmp_path), stages=["tune"], data={"seq_len": 64},
                   pretrain={"precision": "fp32", "zero_stage": 2, "log_every": 5}, tune=tune)  # fmt: skip
    assert spec.tune.mode == "max" and spec.tune.task.metrics == ["accuracy", "f1_macro"]
    run = tmp_path / "c"
    winner = run_stage(spec, str(run)).model_dump(mode="json")

    prepared = winner["lineage"]["task_prepared"]
    done = json.loads(Path(prepared, "prepared.json").read_text())
    assert done["labels"] == ["file", "text"] and all(done["label_ids"])
    assert done["unusable"] == {"unknown_label": 3}  # per record: nothing else was lost
    assert winner["task_data"] == {k: done[k] for k in ("records", "sequences", "unusable",
                                                        "packed_records")}  # fmt: skip
    assert done["packed_records"] > done["sequences"]["train"]  # Llama: packed by default
    quarantined = Path(prepared, "quarantine.jsonl").read_text().splitlines()
    heads = [json.loads(x)["head"].split(" is not")[0] for x in quarantined]
    assert heads[0] == "label: 'other'" and heads[1] in ("label: 'FILE'", "label: 'TEXT'")
    assert heads[2] == "label: '7'"  # a whole number is its digits; labels match case exactly
    # every evaluation of every trial reported both metrics; ASHA stopped the trial that trailed
    # on val_accuracy at the rung the other had reached with a higher one
    trials = Path(run, "tune", "trials")
    evals = {t.name: {r["step"]: r for r in map(json.loads, (t / "metrics.jsonl").read_text().splitlines())
                      if r["kind"] == "eval"} for t in trials.iterdir()}  # fmt: skip
    assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["val_f1_macro"] <= 1
               for rows in evals.values() for r in rows.values())  # fmt: skip
    with open(run / "tune" / "results.csv") as f:
        table = [r for r in csv.DictReader(f) if r["trial_id"] != "base"]
    (good,), (bad,) = ([r for r in table if float(r["lr"]) == lr] for lr in (3e-3, 1e-6))
    assert (good["status"], good["step"], bad["status"], bad["step"]) == ("finished", "20", "stopped early", "5")  # fmt: skip
    assert evals[bad["trial_id"]][5]["val_accuracy"] < evals[good["trial_id"]][5]["val_accuracy"]
    assert winner["trial_id"] == good["trial_id"] and winner["mode"] == "max"
    # the test figures, once each, reproduced from the export
    assert list(winner["test"]) == ["loss", "accuracy", "f1_macro"]
    again = outcome_on_test(winner["export"], prepared, 8, task_of(spec, prepared))
    assert set(again["labels"]) == {0, 1} and len(again["labels"]) == winner["test_records"]
    for metric, v in winner["test"].items():
        assert lift(metric, again, again)["winner"] == pytest.approx(v["winner"], rel=1e-4)
        assert v["low"] <= v["lift"] <= v["high"]
