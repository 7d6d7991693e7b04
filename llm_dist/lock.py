"""One process at a time in a run folder: `hold(run)` while a run, a stage or `serve` works in it.

Two processes in one run folder would interleave their checkpoints, read-modify-write the same
manifest and deploy over each other, so the second is refused at once, naming who holds the
folder (or waits, when asked to).

- A local run folder is held with `flock` on `<run>/lock`: the kernel lets go when the process
  ends however it ends, so a crash leaves nothing to clean up. The file names the holder.
- A run folder on object storage, which has no locks, is held by a lease: `<run>/lock.json`
  names the holder and is renewed every `RENEW_S` seconds by a thread; one not renewed for
  `STALE_S` seconds (its holder died) may be taken over. Taking it is written, then read
  back after `SETTLE_S`: of two starters at once, the one whose lease stands goes on.

Held again by the same process (the CLI around its log, `pipeline.run` inside), it is the
same hold.
"""

import contextlib
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid

from llm_dist import storage
from llm_dist.base import UserError
from llm_dist.redact import command

RENEW_S, STALE_S, SETTLE_S, POLL_S = 30.0, 120.0, 2.0, 5.0
_held: dict[str, int] = {}  # run folder -> how many holds this process has on it


def holder() -> dict:
    """Who this process is, as a lock names it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "user": getpass.getuser(),
            "command": command(sys.argv)[:500],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}  # fmt: skip


def describe(who: dict | None) -> str:
    if not who:
        return "another process (it has not yet named itself)"
    return (f"pid {who.get('pid')} on {who.get('host')} (user {who.get('user')}, "
            f"`{who.get('command')}`, since {who.get('since')})")  # fmt: skip


def _say_waiting(who: str) -> None:
    from llm_dist.console import console

    console.print(f"the run folder is in use by {who}; waiting for it to end")


def _refusal(run: str, who: dict | None) -> UserError:
    return UserError(f"{run}: this run folder is in use by {describe(who)}; wait for it to end, "
                     "pass --wait to wait for it, or run under another name (--set name=...)")  # fmt: skip


@contextlib.contextmanager
def hold(run: str, wait: bool = False, on_wait=None):
    """Hold the run folder `run` while the block runs.

    Raises UserError naming the holder when another process holds it, unless `wait`: then
    `on_wait(description)` is called once (by default it says so on the console) and the
    hold is taken when the other lets go.
    """
    run = run.rstrip("/")
    if _held.get(run):
        _held[run] += 1
        try:
            yield
        finally:
            _held[run] -= 1
        return
    take = _hold_remote if "://" in run else _hold_local
    with take(run, wait, on_wait or _say_waiting):
        _held[run] = 1
        try:
            yield
        finally:
            del _held[run]


@contextlib.contextmanager
def _hold_local(run: str, wait: bool, on_wait):
    import fcntl

    os.makedirs(run, exist_ok=True)
    fd = os.open(os.path.join(run, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _parse(os.pread(fd, 4096, 0))
            if not wait:
                raise _refusal(run, who) from None
            on_wait(describe(who))
            fcntl.flock(fd, fcntl.LOCK_EX)
        me = holder()
        me.pop("token")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # lets go of the flock


@contextlib.contextmanager
def _hold_remote(run: str, wait: bool, on_wait):
    uri, me, waited = f"{run}/lock.json", holder(), False
    while True:
        other = _live_lease(uri)
        if other is None:
            storage.write_json(uri, me | {"renewed": time.time()})
            time.sleep(SETTLE_S)  # a starter at the same moment has written by now
            other = _live_lease(uri)
            if other is not None and other.get("token") == me["token"]:
                break
        if not wait:
            raise _refusal(run, other)
        if not waited:
            on_wait(describe(other))
            waited = True
        time.sleep(POLL_S)
    done = threading.Event()

    def renew():
        while not done.wait(RENEW_S):
            try:
                storage.write_json(uri, me | {"renewed": time.time()})
            except OSError as e:  # a blip of the store: the next renewal tries again
                storage.log.warning("%s: the lease was not renewed (%s)", uri, e)

    thread = threading.Thread(target=renew, name="llm-dist-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        current = _live_lease(uri)
        if current is not None and current.get("token") == me["token"]:
            storage.delete(uri)


def _live_lease(uri: str) -> dict | None:
    """The lease in `uri` while its holder renews it; None when there is none or it is stale."""
    lease = _parse(storage.read_bytes(uri) or b"")
    renewed = lease.get("renewed") if lease else None
    if not isinstance(renewed, int | float) or time.time() - renewed > STALE_S:
        return None
    return lease


def _parse(raw: bytes) -> dict | None:
    try:
        who = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return who if isinstance(who, dict) else None
