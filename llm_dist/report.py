"""An offline HTML report of a run: `report.html` in its folder, one self-contained file.

It reads the records the stages left in the run folder (`run_folder.RunFolder`: the manifest,
the winner, pretraining's and each trial's metrics rows and result, the results table) and
writes tables and plots as inline base64 PNG, drawn on matplotlib's Agg canvas without pyplot,
so it is safe in a driver or server process. A section whose records are missing says so: a
run that stopped after its data stage still gets a report.
"""

import base64
import html
import io
import json
from typing import Any

from llm_dist.records import DataResult, Manifest, MetricsRow, ServeResult, Winner
from llm_dist.run_folder import RunFolder

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
    """Write the run's report.html and return its path.

    `run` is a run folder: a local path or an s3:// / gs:// URI. Each section reads its records
    only when present, and says so when they are missing. Raises FileNotFoundError when the run
    has no manifest, UserError when its records are of another llm-dist, and pyarrow's OSError
    when the storage cannot be read or written.
    """
    folder = RunFolder(run)
    manifest = folder.read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{folder.manifest}: not a run folder, or its run never started")
    stages = manifest.stages
    winner = folder.read_winner()
    data = stages.data.outputs if stages.data else None
    body = [
        _header(manifest),
        _lineage(winner, data),
        _data(data),
        _pretrain(folder),
        _tune(folder, manifest, winner),
        _test(winner),
        _serve(stages.serve.outputs if stages.serve else None),
    ]
    title = html.escape(manifest.name)
    page = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    return folder.write_report(page)


def _header(manifest: Manifest) -> str:
    rows = [[name, s.status, s.started_at, s.ended_at, s.error]
            for name, s in manifest.stages if s is not None]  # fmt: skip
    times = [["created_at", manifest.created_at], ["started_at", manifest.started_at]]
    return (
        f"<h1>Run {html.escape(manifest.name)}</h1>"
        + _table(times)
        + "<h2>Stages</h2>"
        + (_table(rows, ["stage", "status", "started", "ended", "error"]) if rows
           else _missing("no stage has started"))
        + "<h2>Versions</h2>"
        + (_table(list(manifest.versions.items()), ["package", "version"]) if manifest.versions
           else _missing("no versions recorded"))
    )  # fmt: skip


def _lineage(winner: Winner | None, data: DataResult | None) -> str:
    rows = []
    if winner is not None:
        found = winner.lineage
        rows += [["base_model", found.base_model], ["tokenizer (the winner's)", found.tokenizer],
                 ["task_sources", found.task_sources], ["task_prepared", found.task_prepared]]  # fmt: skip
        rows += [[f"PBT exploit {i}", f"trial {e.trial_id} went on from trial {e.donor}'s step "
                  f"{e.step} with {_fmt(e.settings)}"] for i, e in enumerate(found.exploits, 1)]  # fmt: skip
        if found.pretrain is not None:  # its result file, step, tokens, test loss, data
            rows += [[f"pretrain.{k}", v] for k, v in found.pretrain.model_dump().items()]
    if data is not None:
        rows.append(["data.tokenizer (pretraining's)", data.tokenizer])
    if not rows:
        return "<h2>Lineage</h2>" + _missing("no winner and no data stage: nothing to trace")
    text = "<h2>Lineage</h2>" + _table(rows)
    if winner is not None:
        text += f"<p>Winner: trial {html.escape(winner.trial_id)}</p>"
        text += _table(list(winner.config.items()), ["setting", "value"])
    return text


def _data(out: DataResult | None) -> str:
    if out is None:
        return "<h2>Data</h2>" + _missing("the data stage has no outputs")
    keys = ("records", "documents", "files", "vocab_size", "seq_len", "seconds", "reused",
            "prepared", "quarantine")  # fmt: skip
    splits = [[s, out.docs.get(s), out.tokens.get(s), out.sequences.get(s)] for s in out.docs]
    text = "<h2>Data</h2>" + _table([[k, getattr(out, k)] for k in keys])
    text += _table(splits, ["split", "documents", "tokens", "sequences"])
    # bad records count against data.max_bad_fraction; dropped ones are ordinary cleaning
    reasons = [[kind, reason, n] for kind in ("bad", "dropped")
               for reason, n in getattr(out, kind).items() if n]  # fmt: skip
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


def _pretrain(folder: RunFolder) -> str:
    rows = folder.pretrain.read_metrics()
    result = folder.pretrain.read_result()
    if not rows and result is None:
        return "<h2>Pretraining</h2>" + _missing("no metrics rows and no result: not started")
    text = "<h2>Pretraining</h2>"
    if result is None:
        text += _missing("no result: pretraining has not finished")
    else:
        figures = [["step", result.step], ["tokens", result.tokens],
                   ["val_loss_at_start", result.val_loss_at_start],
                   *([k, v] for k, v in result.val.items()), ["test_loss", result.test_loss],
                   ["test_ppl", result.test_ppl], ["world_size", result.world_size],
                   ["bad_steps", result.bad_steps]]  # fmt: skip
        text += _table(figures)
    train, evals = _by_step(rows, "train", "loss"), _by_step(rows, "eval", "val_loss")
    if train or evals:
        fig = _figure()
        ax = fig.subplots()
        ax.plot(list(train), [r.loss for r in train.values()], label="train loss")
        ax.plot(list(evals), [r.val_loss for r in evals.values()], "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        text += _png(fig, "train and val loss by step")
    speed = _by_step(rows, "train", "tokens_per_s")
    if speed:
        fig = _figure()
        ax = fig.subplots()
        ax.plot(list(speed), [r.tokens_per_s for r in speed.values()], color="C0")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens/s", color="C0")
        mfu = ax.twinx()
        # MFU is tokens/s times a constant: dotted, or it hides the tokens/s line
        mfu.plot(list(speed), [r.mfu for r in speed.values()], ":", color="C1")
        mfu.set_ylabel("MFU", color="C1")
        text += _png(fig, "tokens/s and MFU by step")
    return text


def _tune(folder: RunFolder, manifest: Manifest, winner: Winner | None) -> str:
    spec = manifest.spec.get("tune") or {}
    metric = winner.metric if winner else spec.get("metric") or "val_loss"
    mode = winner.mode if winner else spec.get("mode") or "min"
    table = folder.read_results()
    trials = [r for r in table if r.status != "base (un-tuned)"]
    # no results table while the sweep runs or after it failed: the trials' own folders
    ids = [(r.trial_id, r.status) for r in trials] or [(i, "unknown") for i in folder.trial_ids()]
    if not ids:
        return "<h2>Tuning</h2>" + _missing("no results table and no trial folders")
    text = f"<h2>Tuning</h2><p>Metric {html.escape(metric)} ({html.escape(mode)})."
    if winner is not None:
        text += f" Winner: trial {html.escape(winner.trial_id)}."
    text += "</p>" + ("" if table else _missing("no results table: the sweep runs or failed"))
    if winner is not None:  # records left out of the task data, by reason
        counts = winner.task_data
        left = ", ".join(f"{r} {_fmt(n)}" for r, n in counts.unusable.items())
        line = f"Task data: {counts.line()}; left out: {left or 'none'}."
        text += f"<p>{html.escape(line)}</p>"
    fig = _figure(height=4)
    ax = fig.subplots()
    rows_of = {trial: folder.trial(trial).read_metrics() for trial, _ in ids}
    for trial, status in sorted(ids):
        points = _by_step(rows_of[trial], "eval", metric)
        if not points:
            continue
        steps, values = list(points), [getattr(r, metric, None) for r in points.values()]
        won = winner is not None and trial == winner.trial_id
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
        text += _missing(f"no trial logged {metric} in its metrics rows")
    if table:
        header = ["trial_id", *table[0].settings, *table[0].val, "step", "status", "seconds",
                  "error", *(f"test_{m}" for m in (winner.test if winner else {}))]  # fmt: skip
        rows = [[r.trial_id, *r.settings.values(), *r.val.values(), r.step, r.status, r.seconds,
                 r.error, *(r.test.get(m) for m in (winner.test if winner else {}))]
                for r in table]  # fmt: skip
        text += "<h3>Trials</h3>" + _table(rows, header)
    exploits = sorted(((r.time, r.exploit) for rows in rows_of.values() for r in rows if r.exploit),
                      key=lambda found: found[0])  # fmt: skip
    if exploits:  # PBT: which trial went on from which, where, with what
        text += "<h3>PBT exploits</h3>" + _table(
            [[e.trial_id, e.donor, e.step, e.settings] for _, e in exploits],
            ["trial", "went on from trial", "at its step", "with the settings"])  # fmt: skip
    return text


def _test(winner: Winner | None) -> str:
    if winner is None or not winner.test:
        return "<h2>Test</h2>" + _missing("no winner: no test figures were scored")
    rows = [[m, v.base, v.winner, v.lift, f"[{_fmt(v.low)}, {_fmt(v.high)}]"]
            for m, v in winner.test.items()]  # fmt: skip
    text = (
        f"<h2>Test</h2><p>Base against winner on {_fmt(winner.test_records)} test records; "
        "lift = winner &minus; base (lower is better for loss), with its bootstrap interval.</p>"
        + _table(rows, ["metric", "base", "winner", "lift", "interval"])
    )
    test = winner.test
    fig = _figure(width=max(4.0, 2.4 * len(test)), height=3)
    for ax, (m, v) in zip(fig.subplots(1, len(test), squeeze=False)[0], test.items(), strict=True):
        lift = v.lift
        low, high = lift if v.low is None else v.low, lift if v.high is None else v.high
        # a lift just outside a rounded interval must not make a negative error bar
        error = [[max(lift - low, 0)], [max(high - lift, 0)]]
        ax.errorbar([0], [lift], yerr=error, fmt="o", capsize=6)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks([])
        ax.set_title(f"{m} lift")
    return text + _png(fig, "test lift of the winner over the base, per metric")


def _serve(out: ServeResult | None) -> str:
    if out is None:
        return "<h2>Serving</h2>" + _missing("the serve stage has no outputs")
    keys = ("url", "model", "folder", "source", "seconds_to_ready")
    return (
        "<h2>Serving</h2>"
        + _table([[k, getattr(out, k)] for k in keys])
        + f"<p>Prompt</p><pre>{html.escape(out.test_prompt)}</pre>"
        + f"<p>Answer</p><pre>{html.escape(out.answer)}</pre>"
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


def _by_step(rows: list[MetricsRow], kind: str, key: str) -> dict[int, MetricsRow]:
    """The rows of one kind that carry `key`, by step in order; after a resume from a checkpoint
    the steps it repeats are logged again, and the later row wins."""
    found = {r.step: r for r in rows
             if r.kind == kind and None not in (r.step, getattr(r, key, None))}  # fmt: skip
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
