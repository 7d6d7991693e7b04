"""The run manifest: what it records, that re-runs keep history, and that writes are atomic."""

import json
import platform
import threading
from pathlib import Path

from llm_dist.manifest import read_manifest, run_uri, start_run, update_stage, write_manifest
from llm_dist.spec import JobSpec


def spec_in(tmp_path: Path, **fields) -> JobSpec:
    return JobSpec(name="m", storage_path=str(tmp_path), stages=["data"],
                   data={"sources": ["c.jsonl"]}, **fields)  # fmt: skip


def test_start_run_records_spec_versions_host(tmp_path):
    spec = spec_in(tmp_path)
    run = start_run(spec)
    assert run == str(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["spec"] == spec.model_dump(mode="json")
    versions = manifest["versions"]
    assert versions["python"] == platform.python_version()
    for package in ("llm-dist", "ray", "deepspeed", "torch", "transformers"):
        assert versions[package], package
    assert manifest["host"]["hostname"] and manifest["host"]["cpus"] >= 1
    assert manifest["created_at"] == manifest["started_at"]


def test_stage_updates_and_rerun_keep_history(tmp_path):
    spec = spec_in(tmp_path)
    run = start_run(spec)
    update_stage(run, "data", "running")
    update_stage(run, "data", "succeeded", outputs={"documents": 3})
    first = read_manifest(run)
    assert first["stages"]["data"]["status"] == "succeeded"
    assert first["stages"]["data"]["outputs"] == {"documents": 3}
    assert first["stages"]["data"]["started_at"] <= first["stages"]["data"]["ended_at"]

    again = start_run(spec_in(tmp_path, pretrain={"max_steps": 70}))
    second = read_manifest(again)
    assert second["created_at"] == first["created_at"]
    assert second["stages"]["data"]["outputs"] == {"documents": 3}
    assert second["spec"]["pretrain"]["max_steps"] == 70


def test_relative_storage_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_uri(spec_in("./runs")) == str(tmp_path / "runs" / "m")
    assert run_uri(spec_in("s3://b/p/")) == "s3://b/p/m"


def test_readers_never_see_a_partial_manifest(tmp_path):
    run = str(tmp_path / "atomic")
    big = {"stages": {f"s{i}": {"outputs": "x" * 5000} for i in range(50)}}
    write_manifest(run, big)
    seen, errors, done = [], [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                seen.append(len(json.loads(Path(run, "manifest.json").read_text())["stages"]))
            except json.JSONDecodeError as e:  # a torn write
                errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    for n in range(100):
        write_manifest(run, {"stages": {f"s{i}": {"n": n, "pad": "y" * 4000} for i in range(50)}})
    done.set()
    thread.join()
    assert not errors and seen
    assert [p.name for p in Path(run).iterdir()] == ["manifest.json"]  # no temp files left
