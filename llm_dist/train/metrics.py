"""Training metrics: the device's peak FLOPs for MFU, peak memory, and the JSONL + TensorBoard log."""

import os
import resource
import time

from llm_dist.records import MetricsRow

# Dense bf16 peak FLOP/s per device (vendor figures), matched on the CUDA device name.
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def peak_flops(device) -> tuple[float, str]:
    """This worker's peak dense FLOP/s and where the figure came from (the table, or a probe)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops, f"{key} datasheet"
    # No datasheet figure (CPUs, other GPUs): measure a large matmul once.
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * 1024**3 / best, f"matmul probe on {device.type}"


def peak_memory(device) -> int:
    """Bytes: the most this worker's accelerator held, or the process's peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Phases:
    """Seconds spent in each named phase of a worker's start (or end), in order: `lap(name)`
    closes the phase that ran since the last lap. Rank 0 writes them as a `started` (or
    `finished`) event, the per-trial start breakdown that `benchmarks/trial_start.py` reads."""

    def __init__(self, since: float | None = None):
        self.last = time.time() if since is None else since  # wall clock: `since` may come
        self.seconds: dict[str, float] = {}  # from another process (the trial's launch)

    def lap(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now


class MetricsLog:
    """Rank 0's record: `metrics.jsonl` and TensorBoard events of a `TrainFolder` (pretraining's
    or a trial's), and the driver's live display (a Ray queue of `MetricsRow`, when there is
    one). For a run on object storage the files are kept in a local folder and uploaded at each
    checkpoint and at the end.
    """

    def __init__(self, out, queue):
        import tempfile

        from torch.utils.tensorboard import SummaryWriter

        from llm_dist.run_folder import TrainFolder
        from llm_dist.storage import copy, exists

        self.remote = out if "://" in out.uri else None
        self.local = TrainFolder(tempfile.mkdtemp()) if self.remote else out
        if self.remote and exists(out.metrics):  # carry on the file an earlier attempt uploaded
            copy(out.metrics, self.local.metrics)
        os.makedirs(self.local.uri, exist_ok=True)
        # open for the run's life, line-buffered: a reader sees every row as it is written
        self.jsonl = open(self.local.metrics, "a", buffering=1)  # noqa: SIM115
        self.tensorboard = SummaryWriter(self.local.tensorboard)
        self.queue = queue

    def write(self, step: int, kind: str, values: dict) -> None:
        """A row of metrics: to the JSONL file, TensorBoard, and the driver's display."""
        row = MetricsRow(step=step, kind=kind, time=time.time(), **values)
        self.jsonl.write(row.model_dump_json(exclude_none=True) + "\n")
        for key, value in row.figures().items():
            self.tensorboard.add_scalar(f"{kind}/{key}", value, step)
        self.tensorboard.flush()
        if self.queue is not None:
            self.queue.put_nowait(row)

    def note(self, event: dict) -> None:
        """An event (resumed, checkpoint, checkpoint_skipped, bad_step): to the JSONL file and
        the display."""
        row = MetricsRow(kind="event", time=time.time(), **event)
        self.jsonl.write(row.model_dump_json(exclude_none=True) + "\n")
        if self.queue is not None:
            self.queue.put_nowait(row)

    def publish(self) -> None:
        """Upload the files when the run lives on object storage."""
        if self.remote:
            from llm_dist.storage import copy

            copy(self.local.uri, self.remote.uri)

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()
        self.publish()
