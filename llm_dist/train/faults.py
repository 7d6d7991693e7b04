"""Faults injected for tests of how a run survives them. Off in use.

`LLM_DIST_INJECT_NAN=5,9+` on the driver: a NaN loss on rank 0 at step 5 (once) and at every
try of step 9. The loop then trains with `with_nans(loss)` in place of its loss function.

`LLM_DIST_INJECT_KILL_AT_COMMIT=4` on the driver: rank 0 is killed (SIGKILL) in the window
between Ray Train registering step 4's checkpoint (and deleting the oldest one beyond
`num_to_keep`) and rank 0 committing its manifest; only in a try that started from no
checkpoint, so the restart goes on.
"""

import os


def injected_nans() -> dict[int, str]:
    """{step: "once" | "always"} from LLM_DIST_INJECT_NAN; empty in normal use."""
    nans = {}
    for item in filter(None, os.environ.get("LLM_DIST_INJECT_NAN", "").split(",")):
        nans[int(item.rstrip("+"))] = "always" if item.endswith("+") else "once"
    return nans


def with_nans(loss, nan_at: dict[int, str], rank: int, step_of):
    """`loss` (a loss-sum function), NaN on rank 0 at the steps of `nan_at`; `step_of()` is the
    optimizer step the micro batch being scored belongs to."""
    left = dict(nan_at)

    def poisoned(*args, **kwargs):
        value, step = loss(*args, **kwargs), step_of()
        if rank == 0 and left.get(step) in ("once", "always"):
            left[step] = "done" if left[step] == "once" else "always"
            return value * float("nan")
        return value

    return poisoned


def injected_kill() -> int | None:
    """The step from LLM_DIST_INJECT_KILL_AT_COMMIT; None in normal use."""
    step = os.environ.get("LLM_DIST_INJECT_KILL_AT_COMMIT", "")
    return int(step) if step else None


def kill_in_commit_window(root: str, kept: int) -> None:
    """Wait until Ray Train has registered the checkpoint just reported, which it shows by
    pruning `root` to `kept` checkpoints (at most 60 s), then SIGKILL this process."""
    import signal
    import time

    from llm_dist.storage import subfolders

    deadline = time.monotonic() + 60
    while len([f for f in subfolders(root) if f.startswith("step-")]) > kept:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{root}: Ray Train kept more than {kept} checkpoints")
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
