"""The `llm-dist` command: exit codes, messages, no tracebacks for user errors, a fast --help."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_dist.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_help_lists_every_verb_and_imports_nothing_heavy():
    probe = (
        "import sys\nfrom llm_dist import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'transformers', 'pyarrow', 'pydantic')"
        " if m in sys.modules]\nprint('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in out.stdout
    for verb in ("validate", "run", "data", "pretrain", "tune", "serve", "submit", "status",
                 "logs", "stop"):  # fmt: skip
        assert verb in out.stdout


def test_validate_imports_no_framework():
    probe = (
        "import sys\nfrom llm_dist import cli\n"
        f"assert cli.main(['validate', {str(QUICKSTART)!r}]) == 0\n"
        "print('HEAVY', [m for m in ('torch', 'ray', 'deepspeed', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in out.stdout, out.stderr


def test_validate_ok():
    out = cli("validate", str(QUICKSTART))
    assert out.returncode == 0
    assert "valid (run 'quickstart'" in out.stdout


def test_validate_print_round_trips_with_overrides(tmp_path):
    out = cli("validate", str(QUICKSTART), "--print", "--set", "pretrain.zero_stage=3")
    assert out.returncode == 0, out.stderr
    effective = yaml.safe_load(out.stdout)
    assert effective["pretrain"]["zero_stage"] == 3
    assert effective["pretrain"]["grad_clip"] == 1.0  # defaults are shown too
    (tmp_path / "effective.yaml").write_text(out.stdout)
    again = cli("validate", str(tmp_path / "effective.yaml"), "--print")
    assert again.stdout == out.stdout


def test_a_spec_on_standard_input_as_a_submitted_job_sends_it():
    """`submit` pipes the effective spec, as JSON, to `run -`: the same spec comes out."""
    import json

    effective = yaml.safe_load(cli("validate", str(QUICKSTART), "--print").stdout)
    out = subprocess.run([sys.executable, "-m", "llm_dist.cli", "validate", "-", "--print"],
                         input=json.dumps(effective), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == effective


def test_missing_file():
    out = cli("validate", "no/such/spec.yaml")
    assert out.returncode == 2
    assert out.stderr == "llm-dist: error: spec file not found: no/such/spec.yaml\n"


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npretrain:\n  zero_stage: [2\n  lr: 1\n")
    out = cli("validate", str(bad))
    assert out.returncode == 2
    assert "malformed YAML at line 4" in out.stderr
    assert "Traceback" not in out.stderr


def test_top_level_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    out = cli("validate", str(bad))
    assert out.returncode == 2
    assert "the top level must be a mapping of keys, got list" in out.stderr


def test_bad_spec_lists_problems_without_traceback():
    out = cli(
        "validate", str(QUICKSTART), "--set", "pretrain.zero_stage=4", "--set", "serve.port=0"
    )
    assert out.returncode == 2
    assert "2 problem(s)" in out.stderr
    assert "pretrain.zero_stage: got 4" in out.stderr and "serve.port: got 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_verb():
    out = cli("train", str(QUICKSTART))
    assert out.returncode == 2
    assert "invalid choice: 'train'" in out.stderr


def test_an_unreachable_jobs_address_is_one_clear_error():
    out = cli("status", "raysubmit_123", "--address", "http://127.0.0.1:1")
    assert out.returncode == 2
    assert "--address: cannot use the Ray Jobs API at http://127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_records_manifest_and_a_failed_stage(tmp_path):
    out = cli(
        "run", str(QUICKSTART), "--set", f"storage_path={tmp_path}", "--set", "stages=[serve]"
    )
    assert out.returncode == 2
    assert "serve.model: empty, and the run" in out.stderr and "Traceback" not in out.stderr
    manifest = json.loads((tmp_path / "quickstart" / "manifest.json").read_text())
    assert manifest["spec"]["storage_path"] == str(tmp_path)
    assert manifest["stages"] == {"serve": manifest["stages"]["serve"]}
    assert manifest["stages"]["serve"]["status"] == "failed"
    assert manifest["stages"]["serve"]["error"].startswith("UserError: serve.model: empty")


def test_data_stage_with_missing_corpus_names_the_source(tmp_path):
    out = cli("data", "prepare", str(QUICKSTART), "--set", f"storage_path={tmp_path}",
              "--set", f"data.sources=[{tmp_path}/none.jsonl]")  # fmt: skip
    assert out.returncode == 2
    assert f"data.sources.0: '{tmp_path}/none.jsonl' matched no corpus files" in out.stderr
    manifest = json.loads((tmp_path / "quickstart" / "manifest.json").read_text())
    assert manifest["stages"]["data"]["status"] == "failed"


def test_report_writes_the_report_of_a_run_folder_and_refuses_other_folders(tmp_path):
    out = cli("report", str(tmp_path))
    assert out.returncode == 2
    assert f"RUN: {tmp_path} is not a run folder (it has no manifest.json)" in out.stderr
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "r", "stages": {}}))
    out = cli("report", str(tmp_path))  # a run folder of llm-dist 0.1.0's loose records
    assert out.returncode == 2
    assert (
        f"{tmp_path}: a run folder of records version 1 (written by llm-dist unknown)" in out.stderr
    )
    assert not (tmp_path / "report.html").exists()
    manifest = {"records_version": 2, "name": "r", "created_at": "2026-01-01T00:00:00+0000",
                "started_at": "2026-01-01T00:00:00+0000", "spec": {}, "versions": {}, "host": {},
                "stages": {}}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    out = cli("report", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"report: {tmp_path}/report.html\n"
    assert "no stage has started" in (tmp_path / "report.html").read_text()


def test_the_console_keeps_llm_dists_lines_and_the_run_log_gets_the_rest(tmp_path):
    run = tmp_path / "run"
    script = (
        "import os, sys\nfrom llm_dist.console import capture, console\n"
        f"with capture({str(run)!r}) as log:\n"
        "    console.print('ours')\n"
        '    print("python\'s own stdout")\n'
        '    os.write(2, b"a child process\'s stderr\\n")  # below Python: a raylet, a C++ library\n'
        "    raise RuntimeError('boom')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout == "ours\n"
    assert out.stderr.rstrip().endswith("RuntimeError: boom")  # errors reach the console too
    text = (run / "logs" / "llm-dist.log").read_text()
    for line in ("python's own stdout", "a child process's stderr", "RuntimeError: boom"):
        assert line in text, line
    assert "ours" not in text
