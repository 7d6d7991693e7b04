"""Reuse only what matches: a result is reused when it was made from the spec's deciding
settings, refused before anything is written when it was not, and continued when a setting only
extends it. No Ray: the refusals come first."""

import subprocess
import sys
from pathlib import Path

import pytest
from run_records import train_result, winner

from llm_dist.base import UserError
from llm_dist.records import Origin
from llm_dist.reuse import check_run, pretrain_origin
from llm_dist.run_folder import RunFolder
from llm_dist.spec import load_spec

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_dist.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture
def finished(tmp_path) -> RunFolder:
    """The quickstart's run folder as a finished run leaves it: pretrained, tuned, recorded."""
    spec = load_spec(QUICKSTART, [f"storage_path={tmp_path}"])
    folder = RunFolder.of(spec)
    folder.start(spec)
    pretrained = train_result(spec, f"{folder.pretrain.export}")
    folder.pretrain.write_result(pretrained)
    folder.write_winner(winner(spec, f"{folder.trials}/t_00000/export", pretrained.export,
                               pretrained))  # fmt: skip
    return folder


def test_origin_says_what_differs():
    old = Origin.of({"model.preset": "tiny", "pretrain.lr": 0.003}, {"data_fingerprint": "a"})
    new = Origin.of({"model.preset": "1b", "pretrain.lr": 0.003}, {"data_fingerprint": "b"})
    assert old.digest != new.digest and old.digest == Origin.of(old.settings, old.inputs).digest
    assert old.differences(new) == ['model.preset: "tiny" -> "1b"', 'data_fingerprint: "a" -> "b"']
    # a reader that cannot fingerprint the data compares the settings alone
    assert old.differences(Origin.of(old.settings)) == []


def test_a_rerun_under_another_preset_is_refused_and_nothing_is_written(finished, tmp_path):
    before = Path(finished.manifest).read_text()
    out = cli("run", str(QUICKSTART), "--set", f"storage_path={tmp_path}",
              "--set", "model.preset=125m")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr == (
        f"llm-dist: error: the pretraining result in {finished.pretrain.result} was made from "
        'other settings than this spec\'s (model.preset: "tiny" -> "125m"; recorded -> this '
        "spec): it is not reused. Run under a new name (--set name=...) to make it afresh, or "
        "set the spec back\n"
    )
    assert Path(finished.manifest).read_text() == before  # its lineage still describes its results


def test_the_winner_is_not_served_for_other_tune_settings(finished, tmp_path):
    out = cli("serve", str(QUICKSTART), "--set", f"storage_path={tmp_path}",
              "--set", "tune.max_steps=80")  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"the tune winner in {finished.winner} was made from other settings" in out.stderr
    assert "tune.max_steps: 40 -> 80" in out.stderr


def test_a_higher_max_steps_extends_pretraining_and_so_retires_the_winner(finished, tmp_path):
    spec = load_spec(QUICKSTART, [f"storage_path={tmp_path}", "pretrain.max_steps=400"])
    check_run(spec, finished, ["serve"])  # the winner of the base as it is still fits
    with pytest.raises(UserError, match=r"the tune winner in .* \(base_step: 200 -> 400;"):
        check_run(spec, finished, ["pretrain"])  # its base would be trained on
    Path(finished.winner).unlink()
    check_run(spec, finished, ["pretrain", "tune"])  # continued from its checkpoint: no mismatch


def test_every_result_in_the_folder_must_match_whatever_the_stages(finished, tmp_path):
    """The manifest takes the new spec: no result beside it may be of another one."""
    other = load_spec(QUICKSTART, [f"storage_path={tmp_path}", "model.preset=125m"])
    with pytest.raises(UserError, match=r"the pretraining result in .* \(model\.preset: "):
        check_run(other, finished, ["data"])


def test_prepared_data_settings_decide_pretraining_but_the_budget_does_not(finished, tmp_path):
    stricter = load_spec(QUICKSTART, [f"storage_path={tmp_path}", "data.max_bad_fraction=0.001"])
    check_run(stricter, finished, ["pretrain"])  # the budget is checked again, not reused
    other = load_spec(QUICKSTART, [f"storage_path={tmp_path}", "data.seq_len=64"])
    with pytest.raises(UserError, match=r"data\.seq_len: 128 -> 64"):
        check_run(other, finished, ["pretrain"])
    assert pretrain_origin(other).settings["data.seq_len"] == 64
