"""The run report: one offline HTML file from whatever stages a run folder holds."""

import base64
import re
from pathlib import Path

import pytest
from run_records import data_result, serve_result, train_result, trial_rows, winner

from llm_dist.records import Manifest, MetricsRow, StageEntry, Stages
from llm_dist.report import write_report
from llm_dist.run_folder import RunFolder, write_record
from llm_dist.spec import JobSpec

SPEC = JobSpec(name="demo", stages=["data", "pretrain"], data={"sources": ["c.jsonl"]})


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _rows(path: str, rows: list[MetricsRow], tail: str = "") -> None:
    text = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in rows)
    _write(Path(path), text + tail)


def _stage(outputs=None, **fields) -> StageEntry:
    return StageEntry(status="succeeded", started_at="2026-01-01T00:00:00+0000", outputs=outputs,
                      **fields)  # fmt: skip


def _manifest(folder: RunFolder, stages: Stages, name: str = "demo") -> None:
    write_record(folder.manifest, Manifest(
        name=name, created_at="2026-01-01T00:00:00+0000", started_at="2026-01-01T00:00:00+0000",
        spec=SPEC.model_dump(mode="json"), versions={"ray": "2.60.0", "python": "3.11.7"},
        host={}, stages=stages))  # fmt: skip


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def _self_contained(page: str) -> None:
    assert page.startswith("<!doctype html>") and page.count("<html") == 1
    assert 'src="http' not in page and "<script src" not in page and "<link" not in page


def test_the_report_lists_pbt_exploits_and_the_winners_chain(tmp_path):
    from llm_dist.records import Exploit

    folder = RunFolder(str(tmp_path))
    _manifest(folder, Stages())
    folder.write_results(trial_rows())
    took = Exploit(trial_id="t_00001", donor="t_00000", step=8, source="a/step-00000008-9",
                   checkpoint="b/step-00000008-10", settings={"lr": 0.0024})  # fmt: skip
    _rows(folder.trial("t_00000").metrics, [MetricsRow(step=8, kind="eval", time=1, val_loss=6.0)])
    _rows(folder.trial("t_00001").metrics, [
        MetricsRow(step=8, kind="eval", time=1, val_loss=6.5),
        MetricsRow(kind="event", event="exploited", time=2, step=8, exploit=took)])  # fmt: skip
    won = winner(SPEC, "/runs/demo/tune/trials/t_00001/export", "/base")
    won.trial_id, won.lineage.exploits = "t_00001", [took]
    folder.write_winner(won)

    page = Path(write_report(str(tmp_path))).read_text()

    assert ("<h3>PBT exploits</h3><table><tr><th>trial</th><th>went on from trial</th><th>at "
            "its step</th><th>with the settings</th></tr><tr><td>t_00001</td><td>t_00000</td>"
            "<td>8</td><td>{&quot;lr&quot;: 0.0024}</td></tr></table>") in page  # fmt: skip
    assert ("<td>PBT exploit 1</td><td>trial t_00001 went on from trial t_00000&#x27;s step 8 "
            "with {&quot;lr&quot;: 0.0024}</td>") in page  # fmt: skip


def test_report_of_a_full_run(tmp_path):
    folder = RunFolder(str(tmp_path))
    pretrained = train_result(SPEC, "/runs/demo/pretrain/export", step=20)
    _manifest(folder, Stages(data=_stage(data_result()), pretrain=_stage(pretrained),
                             serve=_stage(serve_result())))  # fmt: skip
    t = MetricsRow
    _rows(folder.pretrain.metrics,
          [t(step=0, kind="eval", time=1, val_loss=8.3, val_ppl=4000.0)]
          + [t(step=s, kind="train", time=2, loss=8 - s / 10, tokens_per_s=1000.0 + s, mfu=0.1)
             for s in (10, 20)]
          + [t(kind="event", time=3, event="checkpoint", step=20),
             t(step=20, kind="eval", time=4, val_loss=6.1, val_ppl=445.0),
             t(step=20, kind="test", time=5, test_loss=6.3)],
          tail='{"step": 30, "kind": "tr')  # a run killed mid-write  # fmt: skip
    folder.pretrain.write_result(pretrained)
    folder.write_results(trial_rows())
    for trial, losses in (("t_00000", [6.6, 6.1, 5.9, 5.79]), ("t_00001", [6.6, 6.2, 5.91])):
        rows = [t(step=10 * i, kind="eval", time=i, val_loss=v) for i, v in enumerate(losses)]
        _rows(folder.trial(trial).metrics, rows)
    folder.write_winner(winner(SPEC, "/runs/demo/tune/trials/t_00000/export",
                               pretrained.export, pretrained))  # fmt: skip

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
    assert ("Task data: 4,625 of 4,659 records prepared (train 4,098, val 271, test 256); "
            "left out: too_long 34.") in page  # fmt: skip
    assert "<td>bad</td><td>bad_utf8</td><td>3</td>" in page
    assert "<td>dropped</td><td>duplicate</td><td>7</td>" in page
    assert "<td>empty</td>" not in page  # a zero count is no reason
    assert "<td>-0.8141</td><td>[-0.8747, -0.7615]</td>" in page
    assert "<td>0.07</td><td>[0.02, 0.125]</td>" in page
    assert "<td>pretrain.tokens</td><td>40,960</td>" in page
    assert "<td>tokenizer (the winner&#x27;s)</td><td>/runs/prepared/task-1/tokenizer</td>" in page
    assert (
        "<td>data.tokenizer (pretraining&#x27;s)</td><td>/runs/prepared/abc/tokenizer</td>" in page
    )
    assert "<td>url</td><td>http://127.0.0.1:8000</td>" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'class="missing"' not in page


def test_report_of_a_run_with_only_data(tmp_path):
    folder = RunFolder(str(tmp_path))
    failed = StageEntry(status="failed", error="RuntimeError: <boom>")
    quiet = data_result(bad={}, dropped={})
    _manifest(folder, Stages(data=_stage(quiet), pretrain=failed), name="early")

    # a URI goes through pyarrow's filesystem, as s3:// and gs:// do
    path = write_report(f"file://{tmp_path}")

    assert path == f"file://{tmp_path}/report.html"
    page = (tmp_path / "report.html").read_text()
    _self_contained(page)
    assert _images(page) == []
    assert "<td>pretrain</td><td>failed</td>" in page and "RuntimeError: &lt;boom&gt;" in page
    assert "<td>train</td><td>100</td><td>9,000</td><td>70</td>" in page
    assert "No record was quarantined." in page
    for why in ("no metrics rows and no result: not started", "no results table and no trial",
                "no winner: no test figures were scored", "the serve stage has no outputs"):  # fmt: skip
        assert f'<p class="missing">{why}' in page, why


def test_report_needs_a_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json: not a run folder"):
        write_report(str(tmp_path))
    assert not (tmp_path / "report.html").exists()
