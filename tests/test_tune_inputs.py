"""The tune stage's inputs on a real local Ray: bad bases and records refused before any trial,
records read one by one, plain text, other architectures and ZeRO-3."""

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import STDLIB_MODULES as MODULES
from tune_specs import results, spec_for

from llm_dist.base import UserError
from llm_dist.tune.run import run_stage


@pytest.fixture(scope="module")
def base(tiny_base) -> str:
    return tiny_base


@pytest.mark.parametrize("problem", ["missing base", "other vocabulary"])
def test_a_bad_base_fails_before_ray_starts(tmp_path, task, base, problem):
    """Checked on the driver before anything else: no Ray needed, no task data, no trial."""
    test_bad_input_fails_before_any_trial(None, tmp_path, task, base, problem)


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["no usable records", "too long for the base"])
def test_bad_input_fails_before_any_trial(ray_session, tmp_path, task, base, problem):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if problem == "missing base":
        spec = spec_for(tmp_path, task, str(tmp_path / "nowhere"),
                        search_space={"lr": {"choice": [1e-3]}})  # fmt: skip
        expected = "is not a Hugging Face model folder"
    elif problem == "other vocabulary":
        other = tmp_path / "other"
        AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
            vocab_size=100)).save_pretrained(other)  # fmt: skip
        for name in os.listdir(base):
            if "token" in name:
                (other / name).write_bytes((Path(base) / name).read_bytes())
        spec = spec_for(tmp_path, task, str(other), search_space={"lr": {"choice": [1e-3]}})
        expected = "has 100 token embeddings but its tokenizer has 512 tokens"
    elif problem == "too long for the base":  # data.seq_len is what trials train at
        spec = spec_for(tmp_path, task, base, search_space={"lr": {"choice": [1e-3]}})
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"seq_len": 256})})
        expected = rf"tune: with the base model {base}: data.seq_len: 256 exceeds the model's max_position_embeddings \(128\)"
    else:
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n"
                               for i in range(20)))  # fmt: skip
        spec = spec_for(tmp_path, str(bad), base, search_space={"lr": {"choice": [1e-3]}})
        expected = r"tune.task: 20 of 20 records are unusable \(missing_field 20; "
    with pytest.raises(UserError, match=expected):
        run_stage(spec, str(tmp_path / "t"))
    assert not (tmp_path / "t" / "tune").exists()  # no trial started


def test_masked_loss_counts_only_the_response():
    """The loop's loss with a mask equals plain cross-entropy over the response tokens alone."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_dist.train.losses import loss_sum_of

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
        vocab_size=50))  # fmt: skip
    tokens = torch.randint(0, 50, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.int8)
    mask[0, 4:7], mask[1, 2:9] = 1, 1  # prompt, response, padding
    logits = model(input_ids=tokens[:, :-1]).logits
    expected = sum(
        F.cross_entropy(logits[b, t - 1], tokens[b, t], reduction="sum")
        for b in range(2) for t in range(1, 9) if mask[b, t]
    )  # fmt: skip
    assert loss_sum_of(model, tokens, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss_sum_of(model, tokens).item() == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item(),
        rel=1e-5,
    )


@pytest.mark.slow
def test_freeze_on_plain_text_keeps_the_bottom_and_trains_the_top(ray_session, tmp_path, base):
    """format text (the data stage's packing, the base's tokenizer) with method freeze."""
    from safetensors.torch import load_file

    lib = Path(sysconfig.get_paths()["stdlib"])
    corpus = tmp_path / "text.jsonl"
    blocks = [b for m in MODULES for b in (lib / m).read_text().split("\n\n") if b.strip()]
    corpus.write_text("".join(json.dumps({"text": b}) + "\n" for b in blocks))
    spec = spec_for(tmp_path, str(corpus), base, method="freeze", freeze_layers=1,
                    scheduler="fifo", max_steps=10, search_space={"lr": {"choice": [3e-3]}})  # fmt: skip
    spec = spec.model_copy(update={"tune": spec.tune.model_copy(update={
        "task": spec.tune.task.model_copy(update={"format": "text", "group_field": None})})})  # fmt: skip
    winner = run_stage(spec, str(tmp_path / "t")).model_dump(mode="json")

    assert winner["trials"]["finished"] == 1
    assert winner["test"]["loss"]["winner"] < winner["test"]["loss"]["base"]
    before = load_file(Path(base) / "model.safetensors")
    after = load_file(Path(winner["export"]) / "model.safetensors")
    frozen = [k for k in before if k.startswith(("model.embed_tokens", "model.layers.0."))]
    trained = [k for k in before if k.startswith("model.layers.1.") and k.endswith("weight")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)


@pytest.mark.slow
def test_task_records_are_read_one_by_one_and_quoted_tokens_stay_text(ray_session, tmp_path, base):
    """An unused column that changes type costs nothing; a numeric or null response costs its
    record, quarantined with file and line; so does one too long for data.seq_len, outside the
    error budget; a response quoting <|endoftext|> keeps it as text."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from llm_dist.tune.task import prepare_task

    path = tmp_path / "sft.jsonl"
    records = [{"prompt": f"def f{i}(x):", "response": f"Docstring {i}: what f{i} returns.",
                "id": 1000 + i, "source": f"m{i % 6}"} for i in range(60)]  # fmt: skip
    records[37]["id"] = "ext-0037"
    records[12]["response"], records[25]["response"] = 42, None
    records[3]["response"] = "GPT-2 separates documents with <|endoftext|>; f3 strips it."
    records.append({"prompt": "def long(x):", "response": "word " * 200})  # past seq_len 64
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = spec_for(tmp_path, str(path), base, search_space={"lr": {"choice": [1e-3]}})
    task = prepare_task(spec, base).model_dump(mode="json")

    s = task["sequences"]
    assert task["records"] == 61 and task["packed_records"] + s["val"] + s["test"] == 58
    assert s["train"] < task["packed_records"]  # a Llama base: packed by default
    assert task["unusable"] == {"not_a_string": 1, "missing_field": 1, "too_long": 1}
    quarantined = [json.loads(x) for x in Path(task["quarantine"]).read_text().splitlines()]
    assert [(q["source"], q["line"], q["reason"]) for q in quarantined] == [
        (str(path), 13, "not_a_string"), (str(path), 26, "missing_field"),
        (str(path), 61, "too_long")]  # fmt: skip
    # one EOS per record, the one the template closes the answer with: the answer's last token
    tok = AutoTokenizer.from_pretrained(task["tokenizer"], local_files_only=True)
    table, eos = pq.read_table(Path(task["prepared"]) / "train"), 0
    for tokens, mask in zip(table["tokens"].to_pylist(), table["mask"].to_pylist(), strict=True):
        tokens, mask = np.array(tokens), np.array(mask, bool)
        ends = np.flatnonzero(mask & ~np.r_[mask[1:], False])  # where each answer ends
        assert (np.flatnonzero(tokens == tok.eos_token_id) == ends).all()
        eos += len(ends)
    assert eos == task["packed_records"]
    quoted = tok.encode("<|endoftext|>", split_special_tokens=True)
    assert len(quoted) > 1 and tok.eos_token_id not in quoted

    # over the error budget: refused before any trial, every record still counted
    spec.tune.task.max_bad_fraction = 0.02
    with pytest.raises(UserError) as e:
        run_stage(spec, str(tmp_path / "t"))
    assert str(e.value).startswith(
        "tune.task: 2 of 61 records are unusable (missing_field 1, not_a_string 1, too_long 1; "
        "tune.task.max_bad_fraction is 0.02, too_long not counted), listed with file, line "
        "and reason in "
    )
    assert not (tmp_path / "t" / "tune").exists()


@pytest.mark.slow
def test_gpt2_chat_data_lora_and_freeze_under_zero3(ray_session, tmp_path):
    """A GPT-2 base (Conv1D layers, `transformer.h` blocks, no pad token), OpenAI messages in
    Parquet, LoRA on all linear layers and frozen blocks, ZeRO-3 on 2 workers: both trials
    sample, export whole weights (LoRA merged, no empty tensor) that the serve engine answers
    from, leave the frozen part unchanged, and report chrF."""
    import ast

    import pyarrow as pa
    import pyarrow.parquet as pq
    from architectures import save, tokenizer
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llm_dist.data.stdlib import SYSTEM, _signature_docstrings
    from llm_dist.data.tokenizer import load

    tok = tokenizer(vocab_size=512)
    tok.pad_token = None  # as GPT-2's own tokenizer: llm-dist pads with EOS
    base = save("gpt2", tmp_path / "gpt2", tok)
    lib = Path(sysconfig.get_paths()["stdlib"])
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p},
              {"role": "assistant", "content": r}]
             for m in MODULES[:8] for p, r in _signature_docstrings(ast.parse((lib / m).read_text()))]  # fmt: skip
    pq.write_table(pa.table({"messages": chats, "n": list(range(len(chats)))}),
                   tmp_path / "chats.parquet")  # fmt: skip
    spec = spec_for(tmp_path, str(tmp_path / "chats.parquet"), base, scheduler="fifo",
                    max_steps=6, eval_every=3, lr=3e-3, freeze_layers=1, max_concurrent_trials=1,
                    num_workers=2,
                    search_space={"method": {"grid": ["lora", "freeze"]}})  # fmt: skip
    spec.data.seq_len = 128
    spec.pretrain.zero_stage = 3
    spec.tune.task.format, spec.tune.task.group_field = "messages", None
    spec.tune.lora_target_modules = "all-linear"
    # greedy answers for the task metric come from the ZeRO-3-partitioned model
    spec.tune.task.metrics, spec.tune.task.max_new_tokens = ["chrf"], 8
    winner = run_stage(spec, str(tmp_path / "t")).model_dump(mode="json")

    assert winner["trials"] == {"finished": 2, "stopped early": 0, "failed": 0}
    done = json.loads(Path(winner["lineage"]["task_prepared"], "prepared.json").read_text())
    assert done["packed_records"] > done["sequences"]["train"]  # packed: ZeRO-3, 2 workers
    assert 0 <= winner["test"]["chrf"]["winner"] <= 1
    assert len(winner["samples"]) == 3 and all(s["prompt"] for s in winner["samples"])
    before = load_file(Path(base) / "model.safetensors")
    trials = tmp_path / "t" / "tune" / "trials"
    exports = {r["method"]: trials / r["trial_id"] / "export" for r in results(tmp_path / "t")}
    for method, export in exports.items():
        after = load_file(export / "model.safetensors")
        assert {k: v.shape for k, v in after.items() if k in before} == {
            k: v.shape for k, v in before.items()
        }  # whole tensors, not ZeRO-3 shards
        assert not any("lora" in k for k in after) and all(v.numel() for v in after.values())
        model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
        if method == "lora":  # served: the serve engine answers as generate() does
            assert_served_as_generate(model, load(str(export)))
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        if method == "lora":  # merged into every linear layer of the blocks, nothing else
            assert changed == {f"transformer.h.{b}.{m}.weight" for b in (0, 1)
                               for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # fmt: skip
        else:
            assert "transformer.h.1.mlp.c_fc.weight" in changed
            assert not any(k.startswith(("transformer.wte", "transformer.h.0.")) for k in changed)


def assert_served_as_generate(model, tok) -> None:
    """The serve engine's greedy answer to one prompt is generate()'s."""
    from conftest import engine_answers

    from llm_dist.serve.engine import Engine, Job

    ids = tok.encode("def wrap(text, width=70):")
    engine = Engine(model, tok, max_batch_size=2, max_batch_total_tokens=1024)
    [(text, _, n)] = engine_answers(engine, [Job(ids, 8, temperature=0)])
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.eos_token_id)[0, len(ids) :].tolist()  # fmt: skip
    kept = [t for t in out if t != tok.eos_token_id]
    assert (text, n) == (tok.decode(kept, skip_special_tokens=True), len(kept))
