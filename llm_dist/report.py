"""An offline HTML report of a run: `<run>/report.html`, one self-contained file.

It reads what the stages left in the run folder (manifest.json, winner.json,
pretrain/metrics.jsonl and result.json, tune/results.csv, tune/trials/<id>/metrics.jsonl) and
writes tables and plots as inline base64 PNG, drawn on matplotlib's Agg canvas without pyplot,
so it is safe in a driver or server process. A section whose files are missing says so: a run
that stopped after its data stage still gets a report.
"""

import base64
import html
import io
import json
from typing import Any

from llm_dist.manifest import filesystem, read_json, read_manifest

CSS = """
body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; }
.missing { color: #a33; }
img { max-width: 100%; }
"""


def write_report(run: str) -> str:
    """Write <run>/report.html and return its path.

    `run` is a run folder: a local path or an s3:// / gs:// URI. Reads its manifest.json,
    winner.json, pretrain/metrics.jsonl, pretrain/result.json, tune/results.csv and
    tune/trials/<trial_id>/metrics.jsonl, each only when present: a section whose files are
    missing says so. Raises FileNotFoundError when the run has no manifest.json, and pyarrow's
    OSError when the storage cannot be read or written.
    """
    manifest = read_manifest(run)
    if manifest is None:
        raise FileNotFoundError(f"{run}/manifest.json: not a run folder, or its run never started")
    outputs = {name: s.get("outputs") or {} for name, s in (manifest.get("stages") or {}).items()}
    winner = read_json(run, "winner.json") or {}
    body = [
        _header(manifest),
        _lineage(winner, outputs.get("data", {})),
        _data(outputs.get("data")),
        _pretrain(run),
        _tune(run, manifest, winner),
        _test(winner),
        _serve(outputs.get("serve")),
    ]
    title = html.escape(str(manifest.get("name", run)))
    page = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    filesys, path = filesystem(run)
    with filesys.open_output_stream(f"{path}/report.html") as f:
        f.write(page.encode())
    return f"{run.rstrip('/')}/report.html"


def _header(manifest: dict) -> str:
    stages = manifest.get("stages") or {}
    rows = [[name, s.get("status"), s.get("started_at"), s.get("ended_at"), s.get("error")]
            for name, s in stages.items()]  # fmt: skip
    times = [[k, manifest.get(k)] for k in ("created_at", "started_at")]
    versions = manifest.get("versions") or {}
    return (
        f"<h1>Run {html.escape(str(manifest.get('name', '')))}</h1>"
        + _table(times)
        + "<h2>Stages</h2>"
        + (_table(rows, ["stage", "status", "started", "ended", "error"]) if rows
           else _missing("no stage has started"))
        + "<h2>Versions</h2>"
        + (_table(list(versions.items()), ["package", "version"]) if versions
           else _missing("no versions recorded"))
    )  # fmt: skip


def _lineage(winner: dict, data: dict) -> str:
    rows = []
    for key, value in (winner.get("lineage") or {}).items():
        if isinstance(value, dict):  # pretrain: its result file, step, tokens, test loss
            rows += [[f"{key}.{k}", v] for k, v in value.items()]
        else:
            rows.append([key, value])
    if data.get("tokenizer"):
        rows.append(["tokenizer", data["tokenizer"]])
    if not rows:
        return "<h2>Lineage</h2>" + _missing("no winner.json and no tokenizer: nothing to trace")
    text = "<h2>Lineage</h2>" + _table(rows)
    if winner.get("trial_id"):
        text += f"<p>Winner: trial {html.escape(str(winner['trial_id']))}</p>"
        text += _table(list((winner.get("config") or {}).items()), ["setting", "value"])
    return text


def _data(out: dict | None) -> str:
    if not out:
        return "<h2>Data</h2>" + _missing("the data stage has no outputs")
    keys = ("records", "documents", "files", "vocab_size", "seq_len", "seconds", "reused",
            "prepared", "quarantine")  # fmt: skip
    splits = [[s, out.get("docs", {}).get(s), out.get("tokens", {}).get(s),
               out.get("sequences", {}).get(s)] for s in out.get("docs") or {}]  # fmt: skip
    text = "<h2>Data</h2>" + _table([[k, out[k]] for k in keys if k in out])
    text += _table(splits, ["split", "documents", "tokens", "sequences"])
    # bad records count against data.max_bad_fraction; dropped ones are ordinary cleaning
    reasons = [[kind, reason, n] for kind in ("bad", "dropped")
               for reason, n in (out.get(kind) or {}).items() if n]  # fmt: skip
    if not reasons:
        return text + "<p>No record was quarantined.</p>"
    fig = _figure(height=0.4 * len(reasons) + 1)
    ax = fig.subplots()
    ax.barh([f"{kind}: {reason}" for kind, reason, _ in reasons], [n for *_, n in reasons])
    ax.invert_yaxis()
    ax.set_xlabel("records")
    return (
        text
        + "<h3>Quarantine</h3>"
        + _table(reasons, ["kind", "reason", "records"])
        + _png(fig, "quarantined records by reason")
    )


def _pretrain(run: str) -> str:
    rows = _jsonl(run, "pretrain/metrics.jsonl")
    result = read_json(run, "pretrain/result.json")
    if not rows and result is None:
        return "<h2>Pretraining</h2>" + _missing("no pretrain/metrics.jsonl or result.json")
    text = "<h2>Pretraining</h2>"
    if result is None:
        text += _missing("no pretrain/result.json: pretraining has not finished")
    else:
        keys = ("step", "tokens", "val_loss_at_start", "val_loss", "val_perplexity",
                "test_loss", "test_ppl", "world_size", "bad_steps")  # fmt: skip
        text += _table([[k, result[k]] for k in keys if k in result])
    train, evals = _by_step(rows, "train", "loss"), _by_step(rows, "eval", "val_loss")
    if train or evals:
        fig = _figure()
        ax = fig.subplots()
        ax.plot(list(train), [r["loss"] for r in train.values()], label="train loss")
        ax.plot(list(evals), [r["val_loss"] for r in evals.values()], "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        text += _png(fig, "train and val loss by step")
    speed = _by_step(rows, "train", "tokens_per_s")
    if speed:
        fig = _figure()
        ax = fig.subplots()
        ax.plot(list(speed), [r["tokens_per_s"] for r in speed.values()], color="C0")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens/s", color="C0")
        mfu = ax.twinx()
        # MFU is tokens/s times a constant: dotted, or it hides the tokens/s line
        mfu.plot(list(speed), [r.get("mfu") for r in speed.values()], ":", color="C1")
        mfu.set_ylabel("MFU", color="C1")
        text += _png(fig, "tokens/s and MFU by step")
    return text


def _tune(run: str, manifest: dict, winner: dict) -> str:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from pyarrow import fs

    spec = (manifest.get("spec") or {}).get("tune") or {}
    metric = winner.get("metric") or spec.get("metric") or "val_loss"
    mode = winner.get("mode") or spec.get("mode") or "min"
    csv = _read(run, "tune/results.csv")
    options = pacsv.ConvertOptions(column_types={"trial_id": pa.string(), "status": pa.string()})
    table = pacsv.read_csv(io.BytesIO(csv), convert_options=options).to_pylist() if csv else []
    trials = [r for r in table if r.get("trial_id") != "base"]  # the un-tuned model's test row
    if not trials:
        # no results.csv while the sweep runs or after it failed: the trials' own folders
        filesys, path = filesystem(run)
        found = filesys.get_file_info(fs.FileSelector(f"{path}/tune/trials", allow_not_found=True))
        trials = [{"trial_id": i.base_name, "status": "unknown"}
                  for i in found if i.type == fs.FileType.Directory]  # fmt: skip
    if not trials:
        return "<h2>Tuning</h2>" + _missing("no tune/results.csv and no trial folders")
    text = f"<h2>Tuning</h2><p>Metric {html.escape(metric)} ({html.escape(mode)})."
    if winner.get("trial_id"):
        text += f" Winner: trial {html.escape(str(winner['trial_id']))}."
    text += "</p>" + ("" if table else _missing("no tune/results.csv: the sweep runs or failed"))
    if counts := winner.get("task_data"):  # records left out of the task data, by reason
        split = ", ".join(f"{s} {_fmt(n)}" for s, n in (counts.get("sequences") or {}).items())
        left = ", ".join(f"{r} {_fmt(n)}" for r, n in (counts.get("unusable") or {}).items())
        line = f"Task data: {_fmt(counts.get('records'))} records; sequences {split}; left out: {left or 'none'}."  # fmt: skip
        text += f"<p>{html.escape(line)}</p>"
    fig = _figure(height=4)
    ax = fig.subplots()
    for row in sorted(trials, key=lambda r: str(r["trial_id"])):
        trial, status = str(row["trial_id"]), row.get("status") or "unknown"
        points = _by_step(_jsonl(run, f"tune/trials/{trial}/metrics.jsonl"), "eval", metric)
        if not points:
            continue
        steps, values = list(points), [r[metric] for r in points.values()]
        won = trial == winner.get("trial_id")
        (line,) = ax.plot(steps, values, "-" if status == "finished" else "--",
                          linewidth=3 if won else 1.2,
                          label=f"{trial} ({status}{', winner' if won else ''})")  # fmt: skip
        if status != "finished":  # where the scheduler or an error ended it, or it is now
            ax.plot(steps[-1:], values[-1:], "x", color=line.get_color(), markersize=10)
    if ax.lines:
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend(fontsize="small")
        labels = "; ".join(line.get_label() for line in ax.lines if line.get_label()[0] != "_")
        text += _png(fig, f"{metric} by step: {labels}")
    else:
        text += _missing(f"no trial logged {metric} in its metrics.jsonl")
    if table:
        text += "<h3>Trials</h3>" + _table([list(r.values()) for r in table], list(table[0]))
    return text


def _test(winner: dict) -> str:
    test = {m: v for m, v in (winner.get("test") or {}).items() if isinstance(v, dict)}
    if not test:
        return "<h2>Test</h2>" + _missing("no test figures in winner.json: no winner was scored")
    rows = []
    for m, v in test.items():
        interval = f"[{_fmt(v.get('low'))}, {_fmt(v.get('high'))}]"
        rows.append([m, v.get("base"), v.get("winner"), v.get("lift"), interval])
    text = (
        f"<h2>Test</h2><p>Base against winner on {_fmt(winner.get('test_records'))} test records; "
        "lift = winner &minus; base (lower is better for loss), with its bootstrap interval.</p>"
        + _table(rows, ["metric", "base", "winner", "lift", "interval"])
    )
    fig = _figure(width=max(4.0, 2.4 * len(test)), height=3)
    for ax, (m, v) in zip(fig.subplots(1, len(test), squeeze=False)[0], test.items(), strict=True):
        lift, low, high = v.get("lift"), v.get("low"), v.get("high")
        if lift is None:
            continue
        low, high = lift if low is None else low, lift if high is None else high
        # a lift just outside a rounded interval must not make a negative error bar
        error = [[max(lift - low, 0)], [max(high - lift, 0)]]
        ax.errorbar([0], [lift], yerr=error, fmt="o", capsize=6)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks([])
        ax.set_title(f"{m} lift")
    return text + _png(fig, "test lift of the winner over the base, per metric")


def _serve(out: dict | None) -> str:
    if not out:
        return "<h2>Serving</h2>" + _missing("the serve stage has no outputs")
    keys = ("url", "model", "folder", "source", "seconds_to_ready")
    return (
        "<h2>Serving</h2>"
        + _table([[k, out[k]] for k in keys if k in out])
        + f"<p>Prompt</p><pre>{html.escape(str(out.get('test_prompt', '')))}</pre>"
        + f"<p>Answer</p><pre>{html.escape(str(out.get('answer', '')))}</pre>"
    )


def _table(rows: list, header: list | None = None) -> str:
    """An HTML table; every cell is escaped, since it comes from the run's files."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header or [])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _missing(why: str) -> str:
    return f'<p class="missing">{html.escape(why)}</p>'


def _read(run: str, name: str) -> bytes | None:
    from pyarrow import fs

    filesys, path = filesystem(run)
    if filesys.get_file_info(f"{path}/{name}").type == fs.FileType.NotFound:
        return None
    with filesys.open_input_stream(f"{path}/{name}") as f:
        return f.read()


def _jsonl(run: str, name: str) -> list[dict]:
    rows = []
    for line in (_read(run, name) or b"").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
            continue
    return rows


def _by_step(rows: list[dict], kind: str, key: str) -> dict[int, dict]:
    """The rows of one kind that carry `key`, by step in order; after a resume from a checkpoint
    the steps it repeats are logged again, and the later row wins."""
    found = {r["step"]: r for r in rows
             if r.get("kind") == kind and None not in (r.get("step"), r.get(key))}  # fmt: skip
    return dict(sorted(found.items()))


def _figure(width: float = 8.0, height: float = 3.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig, alt: str) -> str:
    """The figure as an inline PNG; `alt` says in words what it shows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
