"""The console: what a person watching a run sees, kept apart from what the run's processes print.

`llm-dist` writes its own display (progress, tables, results, errors) through `console`. While
a stage runs, everything else written to standard output and error goes to the run's log file
instead: Ray's INFO lines and its workers' output, Tune's trial tables, torch's, DeepSpeed's and
transformers' warnings, in full and in order. `--verbose` leaves the streams alone.
"""

import contextlib
import os
import sys
import tempfile
import threading
import time

from rich.console import Console

console = Console(soft_wrap=True)
"""Where llm-dist's own lines go: the terminal (or the job's log), even while output is captured."""
VERBOSE = threading.Event()
"""Set under `--verbose`: the stages print every row and event, not only the milestones."""


@contextlib.contextmanager
def capture(run: str, verbose: bool = False):
    """Send this process's standard output and error (file descriptors 1 and 2, so Ray's and
    its child processes' too) to `<run>/logs/llm-dist.log` while the block runs; `console`
    keeps writing to the terminal. An exception leaving the block is written to the log too.

    For a run on object storage the log is written to a local file and uploaded at the end.
    """
    if verbose:
        VERBOSE.set()
        yield None
        return
    from llm_dist.redact import command
    from llm_dist.run_folder import RunFolder

    folder = RunFolder(run)
    remote = "://" in run
    if remote:  # a local file of this user's own, uploaded at the end
        target = f"{folder.logs}/llm-dist-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log, path = tempfile.mkstemp(prefix="llm-dist-", suffix=".log")
    else:
        os.makedirs(folder.logs, exist_ok=True)
        path = folder.log_file
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    console.file = terminal
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(log, f"\n==== {when} {command(sys.argv)}\n".encode())
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        yield target if remote else path
    except BaseException:
        import traceback

        traceback.print_exc(file=sys.stderr)  # the full story in the log; the CLI says the rest
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)
        console.file = None  # back to whatever sys.stdout is
        terminal.close()
        if remote:
            with contextlib.suppress(Exception):  # the run's outcome does not hang on its log
                from llm_dist.storage import copy

                copy(path, target)
                os.remove(path)


@contextlib.contextmanager
def status(text: str):
    """A spinner and `text` on a terminal while the block runs (nothing elsewhere); yields a
    function that replaces the text. Unlike rich's `console.status`, it leaves sys.stdout and
    sys.stderr alone, so that what `capture` sends to the log stays there."""
    from rich.live import Live
    from rich.spinner import Spinner

    if VERBOSE.is_set():  # the raw output has the terminal: a live line would break into it
        yield lambda new: None
        return
    spinner = Spinner("dots", text)
    with Live(spinner, console=console, transient=True, redirect_stdout=False,
              redirect_stderr=False):  # fmt: skip
        yield lambda new: spinner.update(text=new)
