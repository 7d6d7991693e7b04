"""Shared fixtures: one real local Ray for the whole session, a corpus with every kind of bad record, and real S3 and MLflow servers on loopback."""

import gzip
import json
import os
import signal
import zlib
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A real local Ray, started once (a start costs ~6 s on two cores).

    Its workers inherit the environment at start, so the loopback S3 endpoint and dummy keys
    are set first, as a user's credentials would be.
    """
    import os

    import ray

    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=s3_server)

    # 4 logical CPUs on 2 cores: 2 training workers hold 2, and Ray Data still needs
    # CPU slots to read their shards or the split waits forever.
    # The dashboard serves the state API, which Ray Train's placement-group cleaner polls:
    # without it a trial that Tune stops early keeps its workers' CPUs for good.
    # address="local": a new instance even when a `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """The port of Ray Serve's HTTP proxy: one per Ray session, so every serve test shares it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """An un-tuned model folder: a BPE tokenizer trained on stdlib text, a 2-layer random Llama.

    Its tokenizer's model_max_length (64) is the sequence length it is said to be trained at.
    """
    import sysconfig

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_dist.data.tokenizer import train_bpe

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(lib / m).read_text() for m in STDLIB_MODULES]
    tokenizer = train_bpe(texts, 512, 64)
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True))  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def task(tmp_path_factory) -> str:
    """Signature -> docstring pairs of a few standard-library modules, `source` per module."""
    import ast
    import sysconfig

    from llm_dist.data.stdlib import _signature_docstrings

    lib = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("task") / "pairs.jsonl"
    with open(path, "w") as f:
        for module in STDLIB_MODULES:
            for prompt, response in _signature_docstrings(ast.parse((lib / module).read_text())):
                f.write(json.dumps({"prompt": prompt, "response": response, "source": module}))
                f.write("\n")
    return str(path)


STDLIB_MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "shlex.py",
                  "argparse.py", "calendar.py", "fractions.py", "statistics.py", "difflib.py",
                  "ftplib.py", "gettext.py", "imaplib.py", "mailbox.py", "pprint.py", "random.py",
                  "smtplib.py", "tarfile.py", "zipfile.py", "configparser.py"]  # fmt: skip

GOOD = [
    f"document {i:04d} says " + " ".join(f"word{i % 7}{j}" for j in range(30)) for i in range(100)
]

# The nasty folder: each bad kind once or more, cleaning cases (not bad), good documents, and
# damaged files (a BOM-led JSONL, a gzip stream cut short, a Parquet file with a broken row group).
NASTY_BAD = {"invalid_json": 2, "invalid_utf8": 1, "invalid_unicode": 1, "missing_field": 2,
             "not_a_string": 2, "line_too_long": 1, "unreadable": 2}  # fmt: skip
NASTY_DROPPED = {"empty": 2}


def write_nasty(folder: Path) -> int:
    """Write the nasty folder; returns how many of cut.jsonl.gz's records precede its cut.

    nasty.jsonl (32 records), more.jsonl.gz (19), notes.txt (1 document), table.parquet (10),
    bom.jsonl (5, the file opens with a BOM), cut.jsonl.gz (GOOD[65:90] compressed and cut
    short: the records before the cut, then one unreadable rest) and broken.parquet (two row
    groups of GOOD[90:100], the second unreadable).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t}).encode() for t in GOOD[:20]]
    lines += [
        b'{"text": "unterminated',  # invalid_json
        b"not json at all",  # invalid_json
        b'{"text": "caf\xe9 latin-1"}',  # invalid_utf8
        b'{"body": "no text field"}',  # missing_field
        b'["a", "list"]',  # missing_field
        b'{"text": 42}',  # not_a_string
        b'{"text": null}',  # not_a_string
        json.dumps(
            {"text": "x" * 5000}
        ).encode(),  # line_too_long (the tests cap lines at 2048 or 4096 bytes; notes.txt is 2,499)
        b"",  # a blank line: not a record
        json.dumps({"text": "   \n\t "}).encode(),  # empty after cleaning
        json.dumps({"text": "\ufeff\x00"}).encode(),  # only a BOM and a NUL: empty
        json.dumps({"text": "\ufeffCafe\u0301 \x00menu " + GOOD[20]}).encode(),  # cleaned, kept
        b'{"text": "half an emoji \\ud83d"}',  # invalid_unicode: JSON allows a lone surrogate
    ]
    (folder / "nasty.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    gz = [json.dumps({"text": t}) for t in GOOD[21:40]]
    (folder / "more.jsonl.gz").write_bytes(gzip.compress(("\n".join(gz) + "\n").encode()))
    (folder / "notes.txt").write_text("\n\n".join(GOOD[40:50]) + "\n")
    pq.write_table(pa.table({"text": GOOD[50:60]}), folder / "table.parquet")
    bom = "".join(json.dumps({"text": t}) + "\n" for t in GOOD[60:65])
    (folder / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + bom.encode())
    whole = "".join(json.dumps({"text": t}) + "\n" for t in GOOD[65:90]).encode()
    cut = gzip.compress(whole, mtime=0)[:-60]  # the trailer and the last blocks never arrived
    (folder / "cut.jsonl.gz").write_bytes(cut)
    pq.write_table(pa.table({"text": GOOD[90:100]}), folder / "broken.parquet", row_group_size=5,
                   use_dictionary=False)  # fmt: skip
    data = bytearray((folder / "broken.parquet").read_bytes())
    chunk = pq.ParquetFile(folder / "broken.parquet").metadata.row_group(1).column(0)
    start = chunk.data_page_offset + 10  # keep the page header's start, scramble the rest
    data[start : chunk.data_page_offset + chunk.total_compressed_size] = b"\x07" * (
        chunk.data_page_offset + chunk.total_compressed_size - start
    )
    (folder / "broken.parquet").write_bytes(bytes(data))
    readable = zlib.decompressobj(wbits=31).decompress(cut)
    return readable.count(b"\n")


def engine_answers(engine, jobs: list, join_after: int | None = None) -> list[tuple]:
    """(text, finish_reason, completion_tokens) of each of `jobs` through a serve `Engine`. All
    are submitted at once, or the first alone and the rest once it has produced `join_after`
    tokens (they join mid-decode)."""
    import threading

    results: list[list] = [["", None, 0] for _ in jobs]
    done = [threading.Event() for _ in jobs]
    started = threading.Event()

    def deliver(i):
        def on(event):
            results[i][0] += event.text
            results[i][2] = event.completion_tokens
            if join_after is not None and i == 0 and event.completion_tokens >= join_after:
                started.set()
            if event.finish_reason:
                results[i][1] = event.finish_reason
                done[i].set()

        return on

    engine.submit(jobs[0], deliver(0))
    if join_after is not None:
        assert started.wait(60)
    for i, job in enumerate(jobs[1:], 1):
        engine.submit(job, deliver(i))
    assert all(d.wait(60) for d in done)
    return [tuple(r) for r in results]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible endpoint on loopback (moto in server mode); yields its URL."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start within 30 s")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}  # fmt: skip


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback (sqlite backend, artifacts in a temp folder); yields
    its tracking URI."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"),  # noqa: SIM115 (the server holds it)
        stderr=subprocess.STDOUT, start_new_session=True,
        # no job runner (eight huey workers of 240 MB each): tracking needs none of its jobs
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start: {root}/server.log") from None
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGTERM)  # uvicorn's workers are in its process group
    proc.wait(timeout=30)
