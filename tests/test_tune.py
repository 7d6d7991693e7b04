"""The tune stage on a real local Ray: sweeps of real fine-tuning trials from a small base model."""

import csv
import json
import os
import signal
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import STDLIB_MODULES as MODULES
from ray.tune.schedulers import FIFOScheduler

from llm_dist import pipeline
from llm_dist.base import UserError
from llm_dist.spec import JobSpec
from llm_dist.tune.run import run_stage


@pytest.fixture(scope="module")
def base(tiny_base) -> str:
    return tiny_base


def spec_for(root: Path, task: str, base: str, **tune) -> JobSpec:
    tune = {"base_model": base, "task": {"sources": [task], "format": "sft", "group_field": "source",
            "val_fraction": 0.15, "test_fraction": 0.15},
            "max_steps": 20, "eval_every": 5,
            "micro_batch_size": 8, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"],
            "max_concurrent_trials": 2, "num_samples": 1, **tune}  # fmt: skip
    return JobSpec(
        name="t", storage_path=str(root), stages=["tune"], data={"seq_len": 64},
        model={"preset": "tiny", "overrides": {"num_hidden_layers": 2}},
        pretrain={"precision": "fp32", "zero_stage": 2, "log_every": 5}, tune=tune,
    )  # fmt: skip


def results(run: Path, base: bool = False) -> list[dict]:
    """The trials' rows of results.csv, or with `base` the un-tuned base's (its test figures)."""
    with open(run / "tune" / "results.csv") as f:
        return [r for r in csv.DictReader(f) if (r["trial_id"] == "base") == base]


@pytest.mark.slow
def test_asha_sweep_picks_the_best_finished_trial_and_beats_the_base(
    ray_session, tmp_path, task, base, mlflow_server
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_dist.finetune.evaluate import task_of
    from llm_dist.finetune.scores import lift
    from llm_dist.tune.winner import outcome_on_test

    spec = spec_for(tmp_path, task, base, scheduler="asha", grace_period=1, reduction_factor=3,
                    search_space={"lr": {"grid": [1e-5, 3e-3]},
                                  "method": {"grid": ["full", "lora"]}})  # fmt: skip
    spec.tune.task.metrics, spec.tune.task.max_new_tokens = ["rouge_l", "chrf"], 16
    spec.tracking.tracking_uri, spec.tracking.registered_model_name = mlflow_server, "docstrings"
    run = tmp_path / "t"
    pipeline.run(spec)
    winner = json.loads((run / "winner.json").read_text())

    table, (base_row,) = results(run), results(run, base=True)
    assert len(table) == 4
    assert {(float(r["lr"]), r["method"]) for r in table} == {
        (lr, m) for lr in (1e-5, 3e-3) for m in ("full", "lora")
    }
    stopped = [r for r in table if r["status"] == "stopped early"]
    finished = [r for r in table if r["status"] == "finished"]
    assert stopped and all(int(r["step"]) < 20 for r in stopped)
    assert all(int(r["step"]) == 20 for r in finished)
    best = min(finished, key=lambda r: float(r["val_loss"]))
    assert winner["trial_id"] == best["trial_id"]
    assert winner["value"] == pytest.approx(float(best["val_loss"]))
    assert json.loads((run / "winner.json").read_text())["trial_id"] == best["trial_id"]
    # one test figure, for the winner only, and it beats the un-tuned base
    assert [r["test_loss"] for r in table if r["test_loss"]] == [best["test_loss"]]
    assert winner["test"]["loss"]["winner"] < winner["test"]["loss"]["base"]
    assert base_row["status"] == "base (un-tuned)"
    assert float(base_row["test_loss"]) == pytest.approx(winner["test"]["loss"]["base"])
    # the task metrics: each with the lift over the base and its interval
    assert list(winner["test"]) == ["loss", "rouge_l", "chrf"]
    for metric, v in winner["test"].items():
        assert v["low"] <= v["lift"] <= v["high"]
        assert v["lift"] == pytest.approx(v["winner"] - v["base"])
        assert float(best[f"test_{metric}"]) == pytest.approx(v["winner"])
        assert float(base_row[f"test_{metric}"]) == pytest.approx(v["base"])
    assert winner["test"]["loss"]["high"] < 0  # tuning lowered the loss beyond the noise
    assert winner["lineage"]["base_model"] == str(Path(base).resolve())
    assert winner["trials"] == {"finished": len(finished), "stopped early": len(stopped),
                                "failed": 0}  # fmt: skip
    # the export (LoRA merged when the winner used it) reloads as a plain HF model, offline
    export = winner["export"]
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(export, local_files_only=True).chat_template
    prepared = winner["lineage"]["task_prepared"]
    again = outcome_on_test(export, prepared, 8, task_of(spec, prepared))
    assert len(again["targets"]) == winner["test_records"]
    for metric, v in winner["test"].items():
        assert lift(metric, again, again)["winner"] == pytest.approx(v["winner"], rel=1e-4)
    # every trial evaluated every 5 steps (what it reported to ASHA) until it stopped
    for r in table:
        lines = (run / "tune" / "trials" / r["trial_id"] / "metrics.jsonl").read_text()
        evals = [
            row["step"] for row in map(json.loads, lines.splitlines()) if row["kind"] == "eval"
        ]
        assert evals[: int(r["step"]) // 5 + 1] == list(range(0, int(r["step"]) + 1, 5))
        if r["status"] == "finished":
            assert evals == [0, 5, 10, 15, 20]
        rows = [row for row in map(json.loads, lines.splitlines()) if row["kind"] == "eval"]
        assert all(0 <= row["val_rouge_l"] <= 1 and 0 <= row["val_chrf"] <= 1 for row in rows)
    # a finished sweep is reported, not rerun (nor its winner registered again)
    assert run_stage(spec, str(run)).trial_id == winner["trial_id"]
    pipeline.run(spec)
    tracked_in_mlflow(mlflow_server, run, table, winner)
    reported(run, table, winner)


def reported(run: Path, table: list[dict], winner: dict) -> None:
    """The report of the sweep's real run folder: every trial's curve with its status, the
    winner, its test figures; only the stages this run did not have are said to be missing."""
    import re

    from llm_dist.report import write_report

    page = Path(write_report(str(run))).read_text()
    legend = re.search(r'alt="val_loss by step: ([^"]*)"', page).group(1)
    for r in table:
        won = ", winner" if r["trial_id"] == winner["trial_id"] else ""
        assert f"{r['trial_id']} ({r['status']}{won})" in legend
    assert f"Winner: trial {winner['trial_id']}." in page
    assert f"<td>loss</td><td>{winner['test']['loss']['base']:.4g}</td>" in page
    assert re.findall(r'<p class="missing">([^<]*)</p>', page) == [
        "the data stage has no outputs", "no metrics rows and no result: not started",
        "the serve stage has no outputs"]  # fmt: skip


def tracked_in_mlflow(uri: str, run: Path, table: list[dict], winner: dict) -> None:
    """The sweep in MLflow: a run per trial under the tune run, with its figures at their steps
    and its status; the winner registered with its lineage and its export as the version."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("llm-dist")
    runs = client.search_runs([experiment.experiment_id], f"tags.`llm_dist.run_folder` = '{run}'")
    (parent,) = [r for r in runs if r.data.tags["llm_dist.stage"] == "run"]
    (tune,) = [r for r in runs if r.data.tags["llm_dist.stage"] == "tune"]
    trials = {
        r.data.tags["llm_dist.trial_id"]: r
        for r in runs
        if r.data.tags["llm_dist.stage"] == "trial"
    }
    assert tune.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert tune.data.params["tune.scheduler"] == "asha"
    assert tune.data.metrics["test.loss.lift"] == pytest.approx(winner["test"]["loss"]["lift"])
    assert tune.data.metrics["task_data.records"] == winner["task_data"]["records"]
    assert {a.path for a in client.list_artifacts(tune.info.run_id)} >= {
        "results.csv",
        "winner.json",
    }
    assert sorted(trials) == sorted(r["trial_id"] for r in table)
    for r in table:
        trial = trials[r["trial_id"]]
        assert trial.data.tags["mlflow.parentRunId"] == tune.info.run_id
        assert trial.data.tags["llm_dist.status"] == r["status"]
        assert float(trial.data.params["lr"]) == float(r["lr"])
        rows = [json.loads(line) for line in
                (run / "tune" / "trials" / r["trial_id"] / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
        for key, kind in (("val_loss", "eval"), ("val_rouge_l", "eval"), ("loss", "train")):
            history = client.get_metric_history(trial.info.run_id, key)
            assert sorted((m.step, m.value) for m in history) == [
                (row["step"], pytest.approx(row[key])) for row in rows if row["kind"] == kind
            ], (r["trial_id"], key)
    (version,) = client.search_model_versions("name='docstrings'")
    assert version.run_id == trials[winner["trial_id"]].info.run_id
    assert trials[winner["trial_id"]].data.tags["llm_dist.winner"] == "true"
    tags = version.tags
    assert tags["trial_id"] == winner["trial_id"]
    assert tags["base_model"] == winner["lineage"]["base_model"]
    assert tags["task_prepared"] == winner["lineage"]["task_prepared"]
    assert json.loads(tags["config"])["method"] == winner["config"]["method"]
    low, high = winner["test"]["loss"]["low"], winner["test"]["loss"]["high"]
    assert f"[{low:+.6g}, {high:+.6g}]" in tags["test.loss"] and "test.rouge_l" in tags
    files = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= files


class StopAtTheFinalReport(FIFOScheduler):
    """A Tune scheduler that stops every trial at its final report (as ASHA does at max_t, but
    always), noting which files the trial's folder held at that moment."""

    def __init__(self, trials: Path, max_steps: int):
        super().__init__()
        self.trials, self.max_steps, self.held = trials, max_steps, {}

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("step", 0) < self.max_steps:
            return self.CONTINUE
        self.held[trial.trial_id] = {p.name for p in (self.trials / trial.trial_id).iterdir()}
        return self.STOP


@pytest.mark.slow
def test_a_trial_stopped_at_its_final_report_is_whole(ray_session, tmp_path, task, base,
                                                       monkeypatch):  # fmt: skip
    """Whatever a scheduler decides at a trial's last report, a trial that trained to its
    budget has its export and result.json: they are written before that report."""
    from transformers import AutoModelForCausalLM

    spec = spec_for(tmp_path, task, base, scheduler="fifo", max_steps=10,
                    search_space={"method": {"grid": ["lora", "full"]}})  # fmt: skip
    run = tmp_path / "t"
    scheduler = StopAtTheFinalReport(run / "tune" / "trials", 10)
    monkeypatch.setattr("llm_dist.tune.run._scheduler", lambda t: scheduler)
    ctrl_c = signal.getsignal(signal.SIGINT)
    winner = run_stage(spec, str(run)).model_dump(mode="json")
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # Tune's own handler is not left behind

    table = results(run)
    assert scheduler.held.keys() == {r["trial_id"] for r in table}  # both stopped at step 10
    for held in scheduler.held.values():
        assert {"export", "result.json"} <= held
    assert [(r["status"], r["step"]) for r in table] == [("finished", "10")] * 2
    assert winner["trials"] == {"finished": 2, "stopped early": 0, "failed": 0}
    assert AutoModelForCausalLM.from_pretrained(winner["export"], local_files_only=True)


@pytest.mark.slow
def test_optuna_sweep_survives_a_failing_trial(ray_session, tmp_path, task, base, capsys):
    """Optuna (TPE) proposes the learning rates; one trial loses its worker and fails."""
    from ray.util.state import list_actors

    spec = spec_for(tmp_path, task, base, search="optuna", scheduler="fifo", num_samples=2,
                    method="lora", max_failures=0, max_concurrent_trials=1,
                    search_space={"lr": {"loguniform": [1e-4, 1e-2]}})  # fmt: skip
    run = tmp_path / "t"
    killed = []

    def kill_first_worker():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            trials = list((run / "tune" / "trials").glob("*/metrics.jsonl"))
            if trials:  # a trial is training: kill its Ray Train worker, as a lost node would
                for actor in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                  ("state", "=", "ALIVE")]):  # fmt: skip
                    os.kill(actor.pid, signal.SIGKILL)
                    killed.append(actor.pid)
                    break
            time.sleep(0.5)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    winner = run_stage(spec, str(run)).model_dump(mode="json")
    killer.join()

    assert killed
    table = results(run)
    assert [r["status"] for r in table].count("failed") == 1
    assert [r["status"] for r in table].count("finished") == 1
    failed = next(r for r in table if r["status"] == "failed")
    assert failed["error"]  # the reason is recorded
    console = capsys.readouterr().out  # the failure and its reason reach the console
    (line,) = [x for x in console.splitlines() if x.startswith(f"tune: trial {failed['trial_id']}")]
    assert line.startswith(f"tune: trial {failed['trial_id']} failed at step ")
    assert "· 1 failed" in line
    assert "(the whole traceback: " in console
    lrs = [float(r["lr"]) for r in table]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert winner["trial_id"] != failed["trial_id"]
    assert winner["trials"]["failed"] == 1


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_resumes(ray_session, tmp_path, task, base):
    """SIGTERM (a container's stop) to `llm-dist tune` mid-trial acts as Ctrl-C: Tune saves the
    sweep, the process exits 143 with no Ray process left, and `--resume` finishes the sweep."""
    from ray_head import cli_in_background, no_marked_process_within

    spec = spec_for(tmp_path, task, base, scheduler="fifo", method="lora", max_steps=10,
                    search_space={"lr": {"grid": [3e-3]}})  # fmt: skip
    run = tmp_path / "t"
    proc, mark, log = cli_in_background("tune", spec, tmp_path)
    deadline = time.monotonic() + 300
    while not list((run / "tune" / "trials").glob("*/checkpoints/*/checkpoint.json")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    out = log.read_text()
    assert "continue it with `llm-dist tune SPEC --resume`" in out
    full = (run / "logs" / "llm-dist.log").read_text()  # the rest of the process's output
    assert "SIGTERM received" not in out + full  # Ray's own handler: a stack dump, then exit 15
    assert no_marked_process_within(mark, 30) == []
    assert not (run / "winner.json").exists()
    with pytest.raises(UserError, match="continue it with `llm-dist tune SPEC --resume`"):
        run_stage(spec, str(run))

    winner = run_stage(spec, str(run), resume=True).model_dump(mode="json")
    table = results(run)
    assert [r["status"] for r in table] == ["finished"]
    lines = (run / "tune" / "trials" / winner["trial_id"] / "metrics.jsonl").read_text()
    events = [row.get("event") for row in map(json.loads, lines.splitlines())]
    assert "resumed" in events  # the interrupted trial went on from its checkpoint


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

    assert task["records"] == 61 and sum(task["sequences"].values()) == 58
    assert task["unusable"] == {"not_a_string": 1, "missing_field": 1, "too_long": 1}
    quarantined = [json.loads(x) for x in Path(task["quarantine"]).read_text().splitlines()]
    assert [(q["source"], q["line"], q["reason"]) for q in quarantined] == [
        (str(path), 13, "not_a_string"), (str(path), 26, "missing_field"),
        (str(path), 61, "too_long")]  # fmt: skip
    # one EOS per window, the one the template closes the answer with: the mask's last token
    tok = AutoTokenizer.from_pretrained(task["tokenizer"], local_files_only=True)
    table = pq.read_table(Path(task["prepared"]) / "train")
    for tokens, mask in zip(table["tokens"].to_pylist(), table["mask"].to_pylist(), strict=True):
        tokens, answer = np.array(tokens), np.flatnonzero(mask)
        assert (tokens == tok.eos_token_id).sum() == 1 and tokens[answer[-1]] == tok.eos_token_id
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
    sample, export whole weights (LoRA merged, no empty tensor), leave the frozen part
    unchanged, and report chrF."""
    import ast

    import pyarrow as pa
    import pyarrow.parquet as pq
    from architectures import save, tokenizer
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llm_dist.data.stdlib import SYSTEM, _signature_docstrings

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
        AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        if method == "lora":  # merged into every linear layer of the blocks, nothing else
            assert changed == {f"transformer.h.{b}.{m}.weight" for b in (0, 1)
                               for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # fmt: skip
        else:
            assert "transformer.h.1.mlp.c_fc.weight" in changed
            assert not any(k.startswith(("transformer.wte", "transformer.h.0.")) for k in changed)
