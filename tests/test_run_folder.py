"""The run folder: the manifest it records, re-runs that keep history, atomic writes, typed
records read back as written, tolerant JSONL, and folders of another records version refused."""

import json
import platform
import threading
from pathlib import Path

import pytest
from run_records import data_result, trial_rows, winner

from llm_dist.base import UserError
from llm_dist.records import DataResult, MetricsRow
from llm_dist.run_folder import RunFolder, run_uri, write_record
from llm_dist.spec import JobSpec, default_name


def spec_in(tmp_path: Path, **fields) -> JobSpec:
    return JobSpec(name="m", storage_path=str(tmp_path), stages=["data"],
                   data={"sources": ["c.jsonl"]}, **fields)  # fmt: skip


def test_start_records_spec_versions_host(tmp_path):
    spec = spec_in(tmp_path)
    folder = RunFolder.of(spec)
    folder.start(spec)
    assert folder.uri == str(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["records_version"] == 2
    assert manifest["spec"] == spec.model_dump(mode="json")
    versions = manifest["versions"]
    assert versions["python"] == platform.python_version()
    for package in ("llm-dist", "ray", "deepspeed", "torch", "transformers"):
        assert versions[package], package
    assert manifest["host"]["hostname"] and manifest["host"]["cpus"] >= 1
    assert manifest["created_at"] == manifest["started_at"]


def test_stage_updates_and_rerun_keep_history(tmp_path):
    spec = spec_in(tmp_path)
    folder = RunFolder.of(spec)
    folder.start(spec)
    folder.update_stage("data", "running")
    folder.update_stage("data", "succeeded", outputs=data_result(documents=3))
    first = folder.read_manifest()
    assert first.stages.data.status == "succeeded"
    assert isinstance(first.stages.data.outputs, DataResult)
    assert first.stages.data.outputs.documents == 3
    assert first.stages.data.started_at <= first.stages.data.ended_at

    RunFolder.of(spec).start(spec_in(tmp_path, pretrain={"max_steps": 70}))
    second = folder.read_manifest()
    assert second.created_at == first.created_at
    assert second.stages.data.outputs.documents == 3
    assert second.spec["pretrain"]["max_steps"] == 70


def test_relative_storage_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_uri(spec_in("./runs")) == str(tmp_path / "runs" / "m")
    assert run_uri(spec_in("s3://b/p/")) == "s3://b/p/m"


def test_the_default_name_is_the_users_own(tmp_path, monkeypatch):
    """Two people sharing a storage_path who leave `name` empty get a folder each."""
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    alice = JobSpec(storage_path=str(tmp_path), stages=["data"], data={"sources": ["c.jsonl"]})
    monkeypatch.setenv("USER", "bob o'neil")
    monkeypatch.setenv("LOGNAME", "bob o'neil")
    bob = JobSpec(storage_path=str(tmp_path), stages=["data"], data={"sources": ["c.jsonl"]})
    assert (alice.name, bob.name) == ("run-alice", "run-bob_o_neil")
    assert default_name() == "run-bob_o_neil"
    # what a trial or a submitted job gets is the resolved name, not a second guess
    assert JobSpec.model_validate(alice.model_dump(mode="json")).name == "run-alice"


def test_readers_never_see_a_partial_record(tmp_path):
    folder = RunFolder(str(tmp_path / "atomic"))
    spec = spec_in(tmp_path)
    write_record(folder.winner, winner(spec, "/x/export", "/x/base"))
    seen, errors, done = [], [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                seen.append(folder.read_winner().trial_id)
            except (json.JSONDecodeError, UserError) as e:  # a torn write
                errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    for n in range(100):
        folder.write_winner(winner(spec, "/x/export", "/x/base", trial_id=f"t_{n:05d}",
                                   config={"pad": "y" * 40_000}))  # fmt: skip
    done.set()
    thread.join()
    assert not errors and seen
    assert [p.name for p in Path(folder.uri).iterdir()] == ["winner.json"]  # no temp files left


def test_records_read_back_as_written(tmp_path):
    spec = spec_in(tmp_path)
    folder = RunFolder(str(tmp_path / "r"))
    made = winner(spec, "/x/export", "/x/base")
    folder.write_winner(made)
    assert folder.read_winner() == made
    folder.write_results(trial_rows())
    back = folder.read_results()
    assert [r.trial_id for r in back] == ["t_00000", "t_00001", "base"]
    assert back[0].settings == {"lr": 0.0003} and back[0].val == {"val_loss": 5.79}
    assert back[0].test == {"loss": 5.9} and back[1].test == {}
    assert back[2].status == "base (un-tuned)" and back[2].test == {"loss": 6.71}


def test_a_torn_metrics_line_costs_that_line_only(tmp_path):
    trial = RunFolder(str(tmp_path / "r")).trial("t_00000")
    rows = [MetricsRow(kind="eval", time=1.0, step=10, val_loss=5.0, val_rouge_l=0.1),
            MetricsRow(kind="train", time=2.0, step=20, loss=4.0)]  # fmt: skip
    text = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in rows)
    Path(trial.uri).mkdir(parents=True)
    # a row torn by a kill in the middle, and one at the end, beside whole ones
    Path(trial.metrics).write_text('{"step": 5, "ki\n' + text + '{"step": 30, "kind": "tr')
    assert trial.read_metrics() == rows
    assert trial.read_metrics()[0].figures() == {"val_loss": 5.0, "val_rouge_l": 0.1}


def test_a_run_folder_of_another_records_version_is_refused(tmp_path):
    folder = RunFolder(str(tmp_path))
    Path(folder.manifest).write_text(json.dumps(
        {"name": "old", "stages": {}, "versions": {"llm-dist": "0.1.0"}}))  # fmt: skip
    with pytest.raises(UserError) as e:
        folder.read_manifest()
    assert str(e.value) == (
        f"{tmp_path}: a run folder of records version 1 (written by llm-dist 0.1.0); this "
        "llm-dist reads version 2: run under a new name (--set name=...) or with the llm-dist "
        "that wrote it"
    )
    Path(folder.winner).write_text(json.dumps({"trial_id": "t", "export": "/x"}))
    with pytest.raises(UserError, match=r"winner\.json: not a Winner record of llm-dist records "
                                        r"version 2 \(metric: Field required\)"):  # fmt: skip
        folder.read_winner()
