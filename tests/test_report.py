"""The run report: one offline HTML file from whatever stages a run folder holds."""

import base64
import json
import re
from pathlib import Path

import pytest

from llm_dist.report import write_report

DATA = {
    "records": 120, "documents": 110, "files": 2,
    "bad": {"bad_utf8": 3}, "dropped": {"duplicate": 7, "empty": 0},
    "tokenizer": "/runs/prepared/abc/tokenizer",
    "docs": {"train": 100, "val": 5, "test": 5},
    "tokens": {"train": 9000, "val": 450, "test": 460},
    "sequences": {"train": 70, "val": 3, "test": 3},
}  # fmt: skip


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    _write(path, "".join(json.dumps(r) + "\n" for r in rows) + tail)


def _stage(outputs: dict) -> dict:
    return {"status": "succeeded", "started_at": "2026-01-01T00:00:00+0000", "outputs": outputs}


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def _self_contained(page: str) -> None:
    assert page.startswith("<!doctype html>") and page.count("<html") == 1
    assert 'src="http' not in page and "<script src" not in page and "<link" not in page


def test_report_of_a_full_run(tmp_path):
    serve = {"url": "http://127.0.0.1:8000", "model": "demo", "folder": "/x/export",
             "seconds_to_ready": 4.5, "test_prompt": "def f():",
             "answer": "<script>alert(1)</script>"}  # fmt: skip
    manifest = {
        "name": "demo", "created_at": "2026-01-01T00:00:00+0000",
        "stages": {"data": _stage(DATA), "pretrain": _stage({"step": 20}),
                   "tune": _stage({"trial_id": "t_00000"}), "serve": _stage(serve)},
        "versions": {"ray": "2.60.0", "python": "3.11.7"},
    }  # fmt: skip
    _write(tmp_path / "manifest.json", json.dumps(manifest))
    _jsonl(
        tmp_path / "pretrain" / "metrics.jsonl",
        [{"step": 0, "kind": "eval", "val_loss": 8.3, "val_ppl": 4000.0}]
        + [{"step": s, "kind": "train", "loss": 8 - s / 10, "tokens_per_s": 1000.0 + s,
            "mfu": 0.1} for s in (10, 20)]
        + [{"kind": "event", "event": "checkpoint", "step": 20},
           {"step": 20, "kind": "eval", "val_loss": 6.1, "val_ppl": 445.0},
           {"step": 20, "kind": "test", "test_loss": 6.3}],
        tail='{"step": 30, "kind": "tr',  # a run killed mid-write
    )  # fmt: skip
    result = {"step": 20, "tokens": 40960, "val_loss_at_start": 8.3, "val_loss": 6.1,
              "test_loss": 6.3}  # fmt: skip
    _write(tmp_path / "pretrain" / "result.json", json.dumps(result))
    _write(
        tmp_path / "tune" / "results.csv",
        "trial_id,lr,val_loss,step,status,seconds,error,test_loss\n"
        "t_00000,0.0003,5.79,40,finished,81.1,,5.9\n"
        "t_00001,0.003,5.91,20,stopped early,40.2,,\n"
        "base,,,,base (un-tuned),,,6.71\n",
    )
    for trial, losses in (("t_00000", [6.6, 6.1, 5.9, 5.79]), ("t_00001", [6.6, 6.2, 5.91])):
        rows = [{"step": 10 * i, "kind": "eval", "val_loss": v} for i, v in enumerate(losses)]
        _jsonl(tmp_path / "tune" / "trials" / trial / "metrics.jsonl", rows)
    winner = {
        "trial_id": "t_00000", "metric": "val_loss", "mode": "min",
        "config": {"method": "full", "lr": 0.0003},
        "test": {"loss": {"winner": 5.9, "base": 6.71, "lift": -0.81409,
                          "low": -0.87468, "high": -0.76146},
                 "rouge_l": {"winner": 0.12, "base": 0.05, "lift": 0.07, "low": 0.02,
                             "high": 0.125}},
        "test_records": 256,
        "task_data": {"records": 4659, "sequences": {"train": 4098, "val": 271, "test": 256},
                      "unusable": {"too_long": 34}},
        "lineage": {"base_model": "/runs/demo/pretrain/export", "task_sources": ["t.jsonl"],
                    "pretrain": {"step": 20, "tokens": 40960}},
    }  # fmt: skip
    _write(tmp_path / "winner.json", json.dumps(winner))

    path = write_report(str(tmp_path))

    assert path == f"{tmp_path}/report.html"
    page = Path(path).read_text()
    _self_contained(page)
    # quarantine bars, pretrain loss, tokens/s and MFU, the trials, the test lifts
    images = _images(page)
    assert len(images) == 5
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images)
    assert "t_00000 (finished, winner); t_00001 (stopped early)" in page  # the legend
    stopped = re.search(r"<tr><td>t_00001</td>.*?</tr>", page)
    assert stopped and "<td>stopped early</td>" in stopped.group()
    assert "Winner: trial t_00000" in page
    assert ("Task data: 4,659 records; sequences train 4,098, val 271, test 256; left out: "
            "too_long 34.") in page  # fmt: skip
    assert "<td>bad</td><td>bad_utf8</td><td>3</td>" in page
    assert "<td>dropped</td><td>duplicate</td><td>7</td>" in page
    assert "<td>empty</td>" not in page  # a zero count is no reason
    assert "<td>-0.8141</td><td>[-0.8747, -0.7615]</td>" in page
    assert "<td>0.07</td><td>[0.02, 0.125]</td>" in page
    assert "<td>pretrain.tokens</td><td>40,960</td>" in page
    assert "<td>tokenizer</td><td>/runs/prepared/abc/tokenizer</td>" in page
    assert "<td>url</td><td>http://127.0.0.1:8000</td>" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'class="missing"' not in page


def test_report_of_a_run_with_only_data(tmp_path):
    quiet = DATA | {"bad": {}, "dropped": {}}
    failed = {"status": "failed", "error": "RuntimeError: <boom>"}
    stages = {"data": _stage(quiet), "pretrain": failed}
    manifest = {"name": "early", "created_at": "2026-01-01T00:00:00+0000", "stages": stages}
    _write(tmp_path / "manifest.json", json.dumps(manifest))

    # a URI goes through pyarrow's filesystem, as s3:// and gs:// do
    path = write_report(f"file://{tmp_path}")

    assert path == f"file://{tmp_path}/report.html"
    page = (tmp_path / "report.html").read_text()
    _self_contained(page)
    assert _images(page) == []
    assert "<td>pretrain</td><td>failed</td>" in page and "RuntimeError: &lt;boom&gt;" in page
    assert "<td>train</td><td>100</td><td>9,000</td><td>70</td>" in page
    assert "No record was quarantined." in page
    for why in ("no pretrain/metrics.jsonl or result.json", "no tune/results.csv",
                "no test figures in winner.json", "the serve stage has no outputs"):  # fmt: skip
        assert f'<p class="missing">{why}' in page, why


def test_report_needs_a_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        write_report(str(tmp_path))
    assert not (tmp_path / "report.html").exists()
