"""MLflow tracking when the store does not answer: one warning, and the run goes on.

The tracked runs themselves are checked where they are made: data and pretraining in
test_pretrain.py (`test_data_and_pretraining_are_tracked_in_mlflow`), the sweep, its trials and
the registered winner in test_tune.py (`tracked_in_mlflow`), both against a real `mlflow server`.
"""

import json
import socket
import time

import pytest
from conftest import write_nasty

from llm_dist import pipeline
from llm_dist.spec import JobSpec


@pytest.mark.slow
def test_an_unreachable_store_is_one_warning_and_the_run_goes_on(
    ray_session, tmp_path, capsys, monkeypatch
):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the standard variable turns tracking on
    write_nasty(tmp_path / "corpus")
    spec = JobSpec(name="d", storage_path=str(tmp_path / "runs"), stages=["data"],
                   data={"sources": [str(tmp_path / "corpus")], "seq_len": 32,
                         "max_line_bytes": 2048, "max_bad_fraction": 0.2,
                         "tokenizer": {"vocab_size": 300, "train_sample_docs": 1000}})  # fmt: skip
    start = time.monotonic()
    folder = pipeline.run(spec)
    seconds = time.monotonic() - start
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("tracking:")]
    assert len(warnings) == 1, out
    assert warnings[0].startswith(f"tracking: MLflow at {uri} failed (")
    assert warnings[0].endswith(f"the run goes on untracked; its record stays in {folder}")
    manifest = json.loads((tmp_path / "runs" / "d" / "manifest.json").read_text())
    assert manifest["stages"]["data"]["status"] == "succeeded"
    assert manifest["stages"]["data"]["outputs"]["documents"] > 0
    assert seconds < 60  # told at once, not after MLflow's minutes of retries
