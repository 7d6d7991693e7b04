"""Training metrics: the device's peak FLOPs for MFU, peak memory, and the JSONL + TensorBoard log."""

import json
import os
import resource
import time

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


class MetricsLog:
    """Rank 0's record: `metrics.jsonl` and TensorBoard events in `out` (`<run>/pretrain/` or a
    trial's folder), and the driver's live display (a Ray queue, when there is one). For a run
    on object storage the files are kept in a local folder and uploaded at each checkpoint and
    at the end.
    """

    def __init__(self, out: str, queue):
        import tempfile

        from torch.utils.tensorboard import SummaryWriter

        self.remote = out if "://" in out else None
        self.folder = tempfile.mkdtemp() if self.remote else out
        if self.remote:  # carry on the file an earlier attempt uploaded
            from pyarrow import fs

            from llm_dist.manifest import filesystem

            filesys, path = filesystem(self.remote)
            if filesys.get_file_info(f"{path}/metrics.jsonl").type == fs.FileType.File:
                fs.copy_files(f"{path}/metrics.jsonl", f"{self.folder}/metrics.jsonl", filesys)
        os.makedirs(self.folder, exist_ok=True)
        # open for the run's life, line-buffered: a reader sees every row as it is written
        self.jsonl = open(f"{self.folder}/metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self.tensorboard = SummaryWriter(f"{self.folder}/tensorboard")
        self.queue = queue

    def write(self, step: int, kind: str, values: dict) -> None:
        """A row of metrics: to the JSONL file, TensorBoard, and the driver's display."""
        row = {"step": step, "kind": kind, "time": time.time(), **values}
        self.jsonl.write(json.dumps(row) + "\n")
        for key, value in values.items():
            if isinstance(value, int | float):
                self.tensorboard.add_scalar(f"{kind}/{key}", value, step)
        self.tensorboard.flush()
        if self.queue is not None:
            self.queue.put_nowait(row)

    def note(self, event: dict) -> None:
        """An event (resumed, checkpoint, bad step): to the JSONL file and the display."""
        row = {"kind": "event", "time": time.time(), **event}
        self.jsonl.write(json.dumps(row) + "\n")
        if self.queue is not None:
            self.queue.put_nowait(row)

    def publish(self) -> None:
        """Upload the files when the run lives on object storage."""
        if self.remote:
            from pyarrow import fs

            from llm_dist.manifest import filesystem

            filesys, path = filesystem(self.remote)
            fs.copy_files(self.folder, path, destination_filesystem=filesys)

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()
        self.publish()
