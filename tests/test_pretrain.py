"""The pretrain stage on a real local Ray with 2 CPU workers, checked against a plain torch loop."""

import json
import os
import signal
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from llm_dist import pipeline
from llm_dist.base import UserError
from llm_dist.data.tokenizer import load as load_tokenizer
from llm_dist.model import build
from llm_dist.spec import JobSpec
from llm_dist.train.checkpoint import committed, latest_whole
from llm_dist.train.deepspeed_config import lr_lambda, param_groups

pytestmark = pytest.mark.slow

MODULES = ["json/decoder.py", "json/encoder.py", "json/__init__.py", "textwrap.py", "string.py",
           "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "shlex.py"]  # fmt: skip


def write_corpus(path: Path, modules: list[str]) -> str:
    """Standard-library sources, one JSONL document per blank-line block: real text, no download."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    blocks = [b for m in modules for b in (lib / m).read_text().split("\n\n") if b.strip()]
    path.write_text("".join(json.dumps({"text": b}) + "\n" for b in blocks))
    return str(path)


def spec_for(root: Path, corpus: str, model: dict | None = None, **pretrain) -> JobSpec:
    pretrain = {"num_workers": 2, "zero_stage": 2, "precision": "fp32", "micro_batch_size": 4,
                "max_steps": 6, "warmup_steps": 2, "lr": 3e-3, "schedule": "constant",
                "log_every": 1, "eval_every": 3, "eval_batches": 2, "checkpoint_every": 3,
                **pretrain}  # fmt: skip
    small = {"overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "num_key_value_heads": 2, "intermediate_size": 128}}  # fmt: skip
    return JobSpec(
        name="p", storage_path=str(root), stages=["data", "pretrain"],
        data={"sources": [corpus], "seq_len": 64, "val_fraction": 0.1, "test_fraction": 0.1,
              "tokenizer": {"vocab_size": 512, "train_sample_docs": 1000}},
        model={"preset": "tiny", **(small if model is None else model)}, pretrain=pretrain,
    )  # fmt: skip


def rows(run: Path, kind: str) -> list[dict]:
    lines = (run / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train_windows(run: Path) -> dict[int, np.ndarray]:
    manifest = json.loads((run / "manifest.json").read_text())
    table = pq.read_table(Path(manifest["stages"]["data"]["outputs"]["prepared"]) / "train")
    return dict(zip(table["id"].to_pylist(), table["tokens"].to_numpy(zero_copy_only=False), strict=True))  # fmt: skip


def plain_torch_losses(spec: JobSpec, run: Path, steps: int) -> list[float]:
    """The reference: one process, plain AdamW, the same model seed and each step's sequences."""
    p = spec.pretrain
    ledger = np.load(run / "pretrain" / "ledger" / "epoch-0000.npy")
    windows = train_windows(run)
    tokenizer = load_tokenizer(str(run / "data" / "tokenizer"))
    torch.manual_seed(p.seed)
    model = build(spec.model, tokenizer)
    opt = torch.optim.AdamW(param_groups(model, p.weight_decay), lr=p.lr, betas=p.betas, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p))
    losses = []
    for step in range(1, steps + 1):
        batch = torch.from_numpy(np.stack([windows[i] for i in ledger[ledger[:, 0] == step, 1]]))
        logits = model(input_ids=batch[:, :-1].long()).logits
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch[:, 1:].flatten().long()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step(), sched.step(), opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "stdlib.jsonl", MODULES)


SECRET = "s3cr3t-52be0d"


@pytest.fixture(scope="module")
def zero2_run(ray_session, corpus, tmp_path_factory, mlflow_server):
    """6 steps at ZeRO-2 with a checkpoint every 3, then the same spec resumed up to step 9;
    both tracked in MLflow, with a secret in cluster.env."""
    root = tmp_path_factory.mktemp("zero2")
    spec = spec_for(root, corpus)
    spec.tracking.tracking_uri = mlflow_server
    spec.cluster.env = {"LLM_DIST_NOTE": SECRET}
    pipeline.run(spec)
    first = rows(root / "p", "train")
    spec = spec_for(root, corpus, max_steps=9)
    spec.tracking.tracking_uri = mlflow_server
    spec.cluster.env = {"LLM_DIST_NOTE": SECRET}
    pipeline.run(spec)
    return spec, root / "p", first


def test_zero2_matches_plain_torch_across_a_resume(zero2_run):
    spec, run, first = zero2_run
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
    losses = {r["step"]: r["loss"] for r in rows(run, "train")}  # the resumed run wrote 7..9
    assert sorted(losses) == list(range(1, 10))
    resumed = [r for r in rows(run, "event") if r["event"] == "resumed"]
    assert [r["step"] for r in resumed] == [6]
    # model, optimizer, scheduler and data position all came back: the curve goes on unbroken
    reference = plain_torch_losses(spec, run, 9)
    assert [losses[s] for s in range(1, 10)] == pytest.approx(reference, rel=1e-4, abs=1e-4)
    assert losses[9] < losses[1] - 0.5


def test_metrics_result_and_manifest(zero2_run):
    _, run, _ = zero2_run
    train = rows(run, "train")[-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_worker", "mfu",
                "data_wait", "peak_memory_gb"):  # fmt: skip
        assert train[key] > 0, key
    assert train["tokens_per_s"] == pytest.approx(2 * train["tokens_per_s_per_worker"])
    assert 0 < train["mfu"] < 1 and 0 <= train["data_wait"] < 1
    assert list((run / "pretrain" / "tensorboard").glob("events.out.tfevents.*"))
    result = json.loads((run / "pretrain" / "result.json").read_text())
    assert result["step"] == 9 and result["tokens"] == 9 * 8 * 64
    assert result["test_loss"] < result["val_loss_at_start"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["pretrain"]["status"] == "succeeded"
    assert manifest["stages"]["pretrain"]["outputs"]["test_loss"] == result["test_loss"]
    # keep_checkpoints: 2 whole ones at every moment, so Ray Train keeps 3 on disk: it deletes
    # the oldest as it registers a new one, before that one's manifest is committed
    assert [m["step"] for _, m in committed(str(run / "pretrain" / "checkpoints"))] == [9, 6, 3]


def test_data_and_pretraining_are_tracked_in_mlflow(zero2_run):
    from mlflow import MlflowClient

    spec, run, _ = zero2_run
    client = MlflowClient(spec.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("llm-dist")
    runs = client.search_runs([experiment.experiment_id], f"tags.`llm_dist.run_folder` = '{run}'")
    by_stage = {r.data.tags["llm_dist.stage"]: r for r in runs}
    assert len(runs) == 3 and sorted(by_stage) == ["data", "pretrain", "run"]  # resumed: reopened
    parent = by_stage["run"]
    assert parent.info.run_name == "p" and parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.zero_stage"] == "2"
    assert parent.data.params["data.tokenizer.vocab_size"] == "512"
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    data, pretrain = by_stage["data"], by_stage["pretrain"]
    for child in (data, pretrain):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
    assert data.data.metrics["records"] == manifest["data"]["outputs"]["records"]
    assert data.data.metrics["tokens.train"] == manifest["data"]["outputs"]["tokens"]["train"]
    assert {"quarantine.json", "outputs.json"} <= {
        a.path for a in client.list_artifacts(data.info.run_id)
    }
    assert pretrain.data.params["pretrain.micro_batch_size"] == "4"
    # every row the workers wrote, at its step, across the resume: the curve in MLflow is the file's
    history = client.get_metric_history(pretrain.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [
        (r["step"], pytest.approx(r["loss"])) for r in rows(run, "train")
    ]
    val = client.get_metric_history(pretrain.info.run_id, "val_loss")
    assert sorted(m.step for m in val) == [r["step"] for r in rows(run, "eval")]
    assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "mfu")] != []
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"metrics.jsonl", "result.json"} <= artifacts
    # the cluster.env value: in no file of the run (manifest, console log, checkpoints, Ray
    # Train's state), no MLflow parameter and not in the logged spec.yaml
    assert [f for f in run.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()] == []
    assert parent.data.params["cluster.env.LLM_DIST_NOTE"] == "<redacted>"
    for r in runs:
        assert SECRET not in json.dumps(r.data.params)
    logged = client.download_artifacts(parent.info.run_id, "spec.yaml")
    assert "LLM_DIST_NOTE: <redacted>" in Path(logged).read_text()
    assert SECRET not in Path(logged).read_text()


def test_export_reloads_offline_and_generates(zero2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run, _ = zero2_run
    export = run / "pretrain" / "export"
    assert (export / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(export, local_files_only=True)
    prompt = tokenizer("def ", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert out.shape[1] == prompt.shape[1] + 8


def test_resume_falls_back_past_a_broken_checkpoint(zero2_run, tmp_path):
    import shutil

    _, run, _ = zero2_run
    copy = tmp_path / "p"
    shutil.copytree(run, copy)
    root = str(copy / "pretrain" / "checkpoints")
    newest, previous, oldest = [f for f, _ in committed(root)]
    assert latest_whole(root) == ((newest, committed(root)[0][1]), [])
    shard = next(Path(newest, "state").glob("*optim_states.pt"))
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated shard
    found, skipped = latest_whole(root)
    assert found[0] == previous
    assert skipped == [
        (newest, f"{shard.relative_to(newest)} has 100 bytes, the manifest says {size}")
    ]
    shard.unlink()
    Path(previous, "checkpoint.json").unlink()  # a missing manifest
    missing = [(newest, f"{shard.relative_to(newest)} is missing")]
    assert latest_whole(root) == ((oldest, committed(root)[1][1]), missing)
    Path(oldest, "checkpoint.json").unlink()
    assert latest_whole(root) == (None, missing)


def test_worker_state_runs_no_code_and_a_crafted_pickle_is_refused(zero2_run, tmp_path):
    """A crafted worker-0.pt in a shared bucket ran code on every worker (torch.load with
    weights_only=False): worker state is safetensors, and a pickle under its name is refused
    naming the file, without running. The RNG streams and the ledger come back as saved."""
    import pickle
    import random

    from llm_dist.train.checkpoint import _set_rng_states, load_worker, save_worker

    _, run, _ = zero2_run
    for folder, meta in committed(str(run / "pretrain" / "checkpoints")):
        assert sorted(f for f in meta["files"] if f.startswith("worker-")) == [
            "worker-0.safetensors", "worker-1.safetensors"]  # fmt: skip
        assert load_worker(f"{folder}/worker-1.safetensors")[1].shape[1] == 2
    ledger = np.arange(8, dtype=np.int64).reshape(4, 2)
    save_worker(str(tmp_path / "w.safetensors"), ledger)
    after = random.random(), np.random.rand(), torch.rand(1).item()
    rng, back = load_worker(str(tmp_path / "w.safetensors"))
    _set_rng_states(rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == after
    assert np.array_equal(back, ledger)

    class Crafted:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)

    crafted = tmp_path / "worker-0.safetensors"
    crafted.write_bytes(pickle.dumps(Crafted()))
    with pytest.raises(UserError, match=f"^{crafted}: not an llm-dist worker state"):
        load_worker(str(crafted))
    assert not (tmp_path / "ran").exists()


def test_a_rerun_under_another_model_is_refused_and_serves_nothing_stale(zero2_run, corpus):
    """The same name with another model: refused before anything is written, by every stage
    that would reuse the run's pretraining (a higher max_steps alone continues it)."""
    _, run, _ = zero2_run
    before = (run / "manifest.json").read_text(), (run / "pretrain" / "result.json").read_text()
    wider = {"overrides": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "num_key_value_heads": 2, "intermediate_size": 128}}  # fmt: skip
    other = spec_for(run.parent, corpus, model=wider, max_steps=9)
    for stages in (["data", "pretrain"], ["serve"]):
        with pytest.raises(UserError) as e:
            pipeline.run(other.model_copy(update={"stages": stages}))
        assert str(e.value).startswith(
            f"the pretraining result in {run}/pretrain/result.json was made from other settings "
            "than this spec's (model.overrides.hidden_size: 64 -> 128; recorded -> this spec)"
        )
    assert (
        (run / "manifest.json").read_text(),
        (run / "pretrain" / "result.json").read_text(),
    ) == before


def test_other_world_size_fails_at_once(zero2_run, corpus):
    _, run, _ = zero2_run
    other = spec_for(run.parent, corpus, max_steps=12, num_workers=1)
    start = time.monotonic()
    with pytest.raises(UserError, match="written by 2 workers and this run has 1"):
        pipeline.run(other)
    assert time.monotonic() - start < 30


def test_zero3_with_activation_checkpointing_trains_and_exports_whole_weights(
    ray_session, corpus, tmp_path
):
    from transformers import AutoModelForCausalLM

    spec = spec_for(tmp_path, corpus, zero_stage=3, max_steps=8, log_every=4, eval_every=8,
                    checkpoint_every=8, activation_checkpointing=True)  # fmt: skip
    pipeline.run(spec)
    run = tmp_path / "p"
    train = rows(run, "train")
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    result = json.loads((run / "pretrain" / "result.json").read_text())
    assert result["val"]["val_loss"] < result["val_loss_at_start"]
    model = AutoModelForCausalLM.from_pretrained(run / "pretrain" / "export", local_files_only=True)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (128, 64)  # not a ZeRO-3 shard


def test_nan_steps_are_skipped_counted_and_stop_the_run(ray_session, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_DIST_INJECT_NAN", "2,4")
    pipeline.run(spec_for(tmp_path / "a", corpus, max_steps=5, eval_every=5, checkpoint_every=5))
    result = json.loads((tmp_path / "a" / "p" / "pretrain" / "result.json").read_text())
    assert result["step"] == 5 and result["bad_steps"] == 2
    bad = [r for r in rows(tmp_path / "a" / "p", "event") if r["event"] == "bad_step"]
    assert [(r["step"], r["in_a_row"]) for r in bad] == [(2, 1), (4, 1)]

    monkeypatch.setenv("LLM_DIST_INJECT_NAN", "3+")  # step 3 is bad on every try
    spec = spec_for(tmp_path / "b", corpus, max_steps=5, checkpoint_every=2, max_bad_steps=2,
                    max_failures=0)  # fmt: skip
    with pytest.raises(Exception, match="3 steps in a row had a NaN or inf loss"):
        pipeline.run(spec)
    root = str(tmp_path / "b" / "p" / "pretrain" / "checkpoints")
    assert [m["step"] for _, m in committed(root)] == [2]  # nothing after the NaNs was saved


def test_killed_worker_restarts_and_consumes_each_id_once(ray_session, tmp_path, capsys,
                                                          monkeypatch):  # fmt: skip
    """A worker killed mid-run, in the worst place: rank 0, after Ray Train registered step
    15's checkpoint (deleting the oldest past num_to_keep) and before rank 0 committed it.
    With keep_checkpoints 1, step 10's is whole then: Ray Train restarts the group, which
    resumes from it and consumes each sequence of the epoch once. Then the console's lines:
    a rerun that trains on past a torn checkpoint says it falls back and where it resumes,
    and one more says what it reused."""
    corpus = write_corpus(tmp_path / "small.jsonl", MODULES[:3])
    spec = spec_for(tmp_path, corpus, model={}, max_steps=32, eval_every=32, checkpoint_every=5,
                    keep_checkpoints=1, max_failures=2)  # fmt: skip
    run = tmp_path / "p"
    monkeypatch.setenv("LLM_DIST_INJECT_KILL_AT_COMMIT", "15")  # `train.faults`
    assert pipeline.run(spec) == str(run)
    monkeypatch.delenv("LLM_DIST_INJECT_KILL_AT_COMMIT")
    resumed = [r for r in rows(run, "event") if r["event"] == "resumed"]
    assert [r["step"] for r in resumed] == [10]  # not 0: a whole checkpoint was there
    steps = [r["step"] for r in rows(run, "train")]
    assert steps == [*range(1, 16), *range(11, 33)]  # the steps lost: 11-15, no more
    ids = sorted(train_windows(run))
    ledger = np.load(run / "pretrain" / "ledger" / "epoch-0000.npy")
    assert sorted(ledger[:, 1].tolist()) == ids  # every sequence of the epoch once, none twice
    result = json.loads((run / "pretrain" / "result.json").read_text())
    assert result["step"] == 32 and result["epoch"] == 1  # 205 sequences: about 26 steps each
    steps = ledger[:, 0]
    assert steps.min() == 1 and np.all(np.diff(np.unique(steps)) == 1)

    final, before = committed(str(run / "pretrain" / "checkpoints"))[:2]
    assert (final[1]["step"], before[1]["step"]) == (32, 30)
    shard = next(Path(final[0], "state").glob("*optim_states.pt"))
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:100])  # torn
    capsys.readouterr()
    longer = spec_for(tmp_path, corpus, model={}, max_steps=34, eval_every=32, checkpoint_every=5)
    pipeline.run(longer)
    out = capsys.readouterr().out
    assert (
        f"pretrain: the checkpoint {final[0]} is not whole ({shard.relative_to(final[0])} "
        f"has 100 bytes, the manifest says {size}); falling back to the one before it\n"
    ) in out
    assert f"pretrain: resumed at step 30 from the checkpoint {before[0]}\n" in out
    assert json.loads((run / "pretrain" / "result.json").read_text())["step"] == 34
    pipeline.run(longer)
    out = capsys.readouterr().out
    assert " (reused: prepared earlier from the same files and settings)\n" in out and (
        f"pretrain: reused {run}/pretrain/result.json (step 34 of max_steps 34, made from this "
        "spec's data, model and pretrain settings)\n") in out  # fmt: skip


def test_object_storage_run_checkpoints_resumes_and_exports(ray_session, s3_server, corpus):
    """storage_path on s3:// (a real S3 server on loopback): checkpoints, resume and the export."""
    import boto3
    from transformers import AutoModelForCausalLM

    from llm_dist.storage import filesystem, local_folder, read_json

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="ckpt")
    pipeline.run(spec_for("s3://ckpt/runs", corpus))  # type: ignore[arg-type]
    pipeline.run(spec_for("s3://ckpt/runs", corpus, max_steps=9))  # type: ignore[arg-type]
    s3, path = filesystem("s3://ckpt/runs/p/pretrain/metrics.jsonl")
    with s3.open_input_stream(path) as f:
        logged = [json.loads(line) for line in f.read().decode().splitlines()]
    steps = [r["step"] for r in logged if r["kind"] == "train"]
    assert steps == list(range(1, 10))  # each step once across the two attempts
    resumed = [r for r in logged if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 6
    assert resumed[0]["checkpoint"].startswith("s3://ckpt/runs/p/pretrain/checkpoints/")
    result = read_json("s3://ckpt/runs/p/pretrain/result.json")
    assert result["step"] == 9 and result["export"] == "s3://ckpt/runs/p/pretrain/export"
    model = AutoModelForCausalLM.from_pretrained(local_folder(result["export"]))
    assert model.config.num_hidden_layers == 2


def test_sigterm_stops_training_like_ctrl_c(corpus, tmp_path):
    """SIGTERM (a container's or process manager's stop) to `llm-dist run` mid-training: exit
    143 with the resume hint, without Ray's stack dump, and no process of its Ray left."""
    from ray_head import cli_in_background, no_marked_process_within

    spec = spec_for(tmp_path, corpus, max_steps=100_000, log_every=5, checkpoint_every=5)
    proc, mark, log = cli_in_background("run", spec, tmp_path)
    deadline = time.monotonic() + 300
    while not committed(str(tmp_path / "p" / "pretrain" / "checkpoints")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    out = log.read_text()
    assert code == 143, out[-3000:]
    assert (
        "pretrain: interrupted; run the same spec again to resume from its newest checkpoint" in out
    )
    assert "llm-dist: stopped by SIGTERM" in out
    assert "SIGTERM received" not in out  # Ray's own handler: a stack dump, then exit 15
    assert no_marked_process_within(mark, 30) == []
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["stages"]["pretrain"]["status"] == "interrupted"
