"""Faults injected for tests of how a run survives them: NaN losses at chosen steps. Off in use.

`LLM_DIST_INJECT_NAN=5,9+` on the driver: a NaN loss on rank 0 at step 5 (once) and at every
try of step 9. The loop then trains with `with_nans(loss)` in place of its loss function.
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
