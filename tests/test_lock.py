"""One process at a time in a run folder (a second is refused naming the holder, or waits), and
prepared data moved into place whole: on a local disk, and on S3 (moto on loopback)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import S3_ENV

from llm_dist import cli, lock, storage
from llm_dist.base import UserError
from llm_dist.run_folder import PreparedFolder

HOLDER = (
    "import sys\nfrom llm_dist.lock import hold\nrun = sys.argv.pop(1)\n"
    "with hold(run):\n    print('held', flush=True)\n    sys.stdin.read()\n"
)


def held_by_another(run: str) -> subprocess.Popen:
    """A process holding `run` until its standard input closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run, "run", "team.yaml"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_held_run_folder_is_refused_naming_the_holder_and_waited_for_when_asked(tmp_path):
    run = str(tmp_path / "shared")
    other = held_by_another(run)
    try:
        with pytest.raises(UserError) as refused, lock.hold(run):
            pass
        assert str(refused.value) == (
            f"{run}: this run folder is in use by pid {other.pid} on {os.uname().nodename} "
            f"(user {json.loads((tmp_path / 'shared' / 'lock').read_text())['user']}, "
            f"`llm-dist run team.yaml`, since "
            f"{json.loads((tmp_path / 'shared' / 'lock').read_text())['since']}); wait for it "
            "to end, pass --wait to wait for it, or run under another name (--set name=...)"
        )
        told, got = [], threading.Event()

        def waiter():
            with lock.hold(run, wait=True, on_wait=told.append):
                got.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        assert not got.wait(0.3)  # still held: it waits (a wait that cannot end early)
        other.stdin.close()  # the holder ends
        thread.join(30)
        assert got.is_set() and len(told) == 1 and f"pid {other.pid}" in told[0]
    finally:
        other.kill()
        other.wait()
    with lock.hold(run), lock.hold(run):  # free again, and the same process's hold nests
        assert json.loads(Path(run, "lock").read_text())["pid"] == os.getpid()


def test_a_second_llm_dist_run_on_a_held_folder_writes_nothing(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: shared\nstorage_path: {tmp_path}\nstages: [data]\n"
                    f"data: {{sources: [{tmp_path / 'c.jsonl'}]}}\n")  # fmt: skip
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    other = held_by_another(str(tmp_path / "shared"))
    try:
        code = cli.main(["run", str(spec), "--set", "cluster.env.API_KEY=s3cr3t"])
    finally:
        other.kill()
        other.wait()
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR
    assert f"this run folder is in use by pid {other.pid}" in err
    assert os.listdir(tmp_path / "shared") == ["lock"]  # no manifest, no log: nothing written
    assert "s3cr3t" not in (tmp_path / "shared" / "lock").read_text()


def prepare_into(work: PreparedFolder, marker: str, commit: bool = True) -> None:
    storage.write_bytes(f"{work.split('train')}/part-00000.parquet", marker.encode())
    storage.write_bytes(work.quarantine, marker.encode())
    if commit:
        storage.write_json(work.info, {"by": marker})


def check_prepared(root: str) -> None:
    """Two writers preparing one place at once, and an uncommitted folder there before them."""
    final = PreparedFolder(f"{root}/prepared/abc")
    prepare_into(PreparedFolder(final.uri), "crashed", commit=False)
    storage.write_bytes(f"{final.split('train')}/part-00007.parquet", b"stale")
    writers = final.preparing(), final.preparing()
    first, second = (w.__enter__() for w in writers)
    prepare_into(first, "first")
    prepare_into(second, "second")
    assert not storage.exists(final.info)  # nothing shows before a commit moves in
    for w in writers:
        w.__exit__(None, None, None)
    assert storage.read_json(final.info) == {"by": "first"}  # the first commit stays
    assert storage.read_bytes(f"{final.split('train')}/part-00000.parquet") == b"first"
    assert not storage.exists(f"{final.split('train')}/part-00007.parquet")  # replaced whole
    with pytest.raises(UserError), PreparedFolder(f"{root}/prepared/bad").preparing() as work:
        prepare_into(work, "refused", commit=False)
        raise UserError("too many bad records")
    assert storage.read_bytes(f"{root}/prepared/bad/quarantine.jsonl") == b"refused"
    assert not storage.exists(f"{root}/prepared/bad/prepared.json")
    assert sorted(storage.subfolders(f"{root}/prepared")) == ["abc", "bad"]  # no staging left


def test_prepared_data_is_moved_into_place_whole(tmp_path):
    check_prepared(str(tmp_path))
    assert sorted(os.listdir(tmp_path / "prepared")) == ["abc", "bad"]


@pytest.mark.slow
def test_on_object_storage_a_lease_holds_the_run_and_prepared_data_moves_whole(
    s3_server, monkeypatch
):
    import boto3

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="team")
    check_prepared("s3://team/runs")
    monkeypatch.setattr(lock, "SETTLE_S", 0.0)
    run = "s3://team/runs/shared"
    someone = {"pid": 7, "host": "head", "user": "ana", "command": "llm-dist run a.yaml",
               "since": "2026-12-07T10:00:00+0000", "token": "theirs"}  # fmt: skip
    storage.write_json(f"{run}/lock.json", someone | {"renewed": lock.time.time()})
    refused = r"in use by pid 7 on head \(user ana, `llm-dist run a"
    with pytest.raises(UserError, match=refused), lock.hold(run):
        pass
    storage.write_json(f"{run}/lock.json", someone | {"renewed": lock.time.time() - 1000})
    with lock.hold(run):  # a lease not renewed for STALE_S: its holder is gone
        assert storage.read_json(f"{run}/lock.json")["pid"] == os.getpid()
    assert not storage.exists(f"{run}/lock.json")  # let go
