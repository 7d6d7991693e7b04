"""Checkpoints that count only when whole: every rank's DeepSpeed shard, then a manifest, last.

A checkpoint is `<run>/pretrain/checkpoints/step-<step>-<time>/`:

    state/...            DeepSpeed's files from every rank (model, optimizer shards, scheduler)
    worker-<rank>.safetensors  that rank's RNG states and the sequences it consumed this epoch
                         (tensors, and JSON in the metadata: nothing in it can run code)
    checkpoint.json      written by rank 0 after every rank's upload finished: step, epoch,
                         world size, and the size and sha256 of every file above

Ray Train uploads each rank's files (`ray.train.report(checkpoint=...)`) into one folder and
keeps the last N. Loading walks the checkpoints newest first and takes the first whose
manifest is there and whose files all match it, logging why it passed over any other.
DeepSpeed's own files under state/ are pickles that DeepSpeed loads: a run folder must be
writable only by those its runs trust (docs/cluster.md says so).
"""

import hashlib
import json
import logging
import os
import random
import tempfile
import time

import numpy as np

from llm_dist.run_folder import checkpoint_manifest
from llm_dist.storage import filesystem, read_json, write_json

log = logging.getLogger("llm_dist.checkpoint")


def save(engine, state, root: str, metrics: dict, origin: dict | None = None,
         before_report=None, before_commit=None) -> str:  # fmt: skip
    """Every rank: write its shard, report it to Ray Train, then rank 0 commits the manifest.

    `state` is the loop's `TrainState` (its progress goes into the manifest, its ledger into
    the rank's file with the RNG states); `origin` what the run is made from (`records.Origin` as JSON), which
    a later run must match to resume from it; `before_report`, called on every rank once its shard is written,
    does the work that must be done before the report (a Tune scheduler may stop the run at
    it); `before_commit`, called on rank 0 just before it commits, is a test's fault
    (`train.faults`). Returns the checkpoint's folder.
    """
    import ray.train
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    dir_name = [f"step-{state.step:08d}-{int(time.time())}"]
    dist.broadcast_object_list(dir_name, src=0)  # one folder for every rank's files
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="state")
        save_worker(f"{tmp}/worker-{rank}.safetensors", state.rows())
        files = {}
        for parent, _, names in os.walk(tmp):
            for path in (os.path.join(parent, name) for name in names):
                with open(path, "rb") as f:
                    files[os.path.relpath(path, tmp)] = _digest(f)
        if before_report is not None:
            before_report()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=dir_name[0])  # fmt: skip
    everyone = [None] * world
    dist.all_gather_object(everyone, files)  # also a barrier: every rank's upload is done
    folder = f"{root}/{dir_name[0]}"
    if rank == 0:
        if before_commit is not None:
            before_commit()
        merged = {k: v for per_rank in everyone for k, v in per_rank.items()}
        write_json(checkpoint_manifest(folder),
                   {**state.progress(), "world_size": world, "files": merged, "origin": origin})  # fmt: skip
    dist.barrier()
    return folder


def on_disk(p) -> int:
    """Ray Train's num_to_keep for `keep_checkpoints` (pretraining's or a trial's): one more,
    since Ray Train deletes the oldest as it registers a new one, before it is committed."""
    return p.keep_checkpoints + 1


def committed(root: str) -> list[tuple[str, dict]]:
    """The checkpoints that have a manifest, newest first: (folder, manifest). Files unchecked."""
    from pyarrow import fs

    filesys, path = filesystem(root)
    if filesys.get_file_info(path).type == fs.FileType.NotFound:
        return []
    found = []
    for info in filesys.get_file_info(fs.FileSelector(path)):
        if info.type == fs.FileType.Directory and info.base_name.startswith("step-"):
            folder = f"{root}/{info.base_name}"
            meta = read_json(checkpoint_manifest(folder))
            if meta is None:
                log.warning("checkpoint %s has no manifest: not whole, passed over", folder)
            else:
                found.append((folder, meta))
    return sorted(found, key=lambda f: written(f[0]), reverse=True)


def written(folder: str) -> tuple[int, int]:
    """(time, step) of a `step-<step>-<time>` folder: newest written first, so a checkpoint a
    PBT trial took from its donor outranks the trial's own older ones, whatever their steps."""
    _, step, when = folder.rsplit("/", 1)[-1].split("-")
    return int(when), int(step)


def adopt(source: str, root: str) -> tuple[str, dict]:
    """Copy the whole checkpoint `source` (another run's: a PBT donor's) into `root` as its
    newest, (folder, manifest); a UserError when it is not whole."""
    from llm_dist.base import UserError
    from llm_dist.storage import copy

    meta = read_json(checkpoint_manifest(source))
    filesys, path = filesystem(source)
    problem = "it has no manifest" if meta is None else _check(filesys, path, meta["files"])
    if problem is not None:
        raise UserError(f"the checkpoint {source} is not whole ({problem}); it cannot be taken")
    folder = f"{root}/step-{meta['step']:08d}-{int(time.time())}"
    copy(source, folder)
    return folder, meta


def latest_whole(root: str) -> tuple[tuple[str, dict] | None, list[tuple[str, str]]]:
    """The newest checkpoint whose files all match its manifest, (folder, manifest), or None (a
    fresh start); and the newer ones passed over, (folder, why), which the run says."""
    filesys, path = filesystem(root)
    skipped = []
    for folder, meta in committed(root):
        problem = _check(filesys, f"{path}/{folder.rsplit('/', 1)[1]}", meta["files"])
        if problem is None:
            return (folder, meta), skipped
        log.warning(
            "checkpoint %s is not whole (%s); falling back to the previous one", folder, problem
        )
        skipped.append((folder, problem))
    return None, skipped


def load(engine, folder: str, meta: dict):
    """Restore this rank's engine (model, optimizer, scheduler) and RNG from the whole checkpoint
    in `folder`, whose manifest is `meta`; returns the loop's `TrainState` as it was saved, with
    every rank's ledger rows of the epoch in progress as the ids already consumed."""
    import ray.train
    import torch.distributed as dist

    from llm_dist.train.state import TrainState

    with ray.train.Checkpoint(folder).as_directory() as local:  # downloads from object storage
        # the worker files first: a checkpoint of an older llm-dist fails before DeepSpeed's
        workers = [load_worker(f"{local}/worker-{r}.safetensors")
                   for r in range(dist.get_world_size())]  # fmt: skip
        engine.load_checkpoint(local, tag="state", load_optimizer_states=True,
                               load_lr_scheduler_states=True)  # fmt: skip
    rng, ledger = workers[dist.get_rank()]
    _set_rng_states(rng)
    everyone = np.concatenate([rows for _, rows in workers]).reshape(-1, 2)
    return TrainState.resumed(meta, ledger.reshape(-1, 2), everyone)


def save_worker(path: str, ledger) -> None:
    """One rank's RNG states and `ledger` (int64 rows of the epoch's consumed ids) as safetensors:
    the generators' tensors and arrays as tensors, the rest JSON in the file's metadata."""
    import torch
    from safetensors.torch import save_file

    rng = _rng_states()
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    version, words, gauss_next = rng["python"]
    tensors = {"torch": rng["torch"], "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
               "python_words": torch.tensor(words, dtype=torch.int64),
               "ledger": torch.from_numpy(np.ascontiguousarray(ledger, dtype=np.int64))}  # fmt: skip
    if "cuda" in rng:
        tensors["cuda"] = rng["cuda"]
    meta = {"numpy": [kind, pos, has_gauss, gauss], "python": [version, gauss_next]}
    save_file(tensors, path, metadata={"llm_dist": json.dumps(meta)})


def load_worker(path: str) -> tuple[dict, np.ndarray]:
    """(RNG states, ledger) from `save_worker`'s file; a UserError naming it when it is not one
    (a pickle, an older llm-dist's worker-<rank>.pt): safetensors never runs what it reads."""
    from safetensors import SafetensorError, safe_open

    from llm_dist.base import UserError

    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["llm_dist"])
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open is no dict)
    except (FileNotFoundError, SafetensorError, KeyError, ValueError) as e:
        raise UserError(
            f"{path}: not an llm-dist worker state ({type(e).__name__}: {e}); the checkpoint "
            "was written by another llm-dist or altered: resume with the llm-dist that wrote "
            "it, or start the run under a new name"
        ) from None
    kind, pos, has_gauss, gauss = meta["numpy"]
    version, gauss_next = meta["python"]
    rng = {"torch": t["torch"],
           "numpy": (kind, t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss),
           "python": (version, tuple(t["python_words"].tolist()), gauss_next)}  # fmt: skip
    if "cuda" in t:
        rng["cuda"] = t["cuda"]
    return rng, t["ledger"].numpy()


def _check(filesys, path: str, files: dict) -> str | None:
    """Why the checkpoint at `path` does not match its manifest, or None when it does."""
    from pyarrow import fs

    for rel, (size, sha) in sorted(files.items()):
        info = filesys.get_file_info(f"{path}/{rel}")
        if info.type == fs.FileType.NotFound:
            return f"{rel} is missing"
        if info.size != size:
            return f"{rel} has {info.size} bytes, the manifest says {size}"
        with filesys.open_input_stream(f"{path}/{rel}") as f:
            if _digest(f)[1] != sha:
                return f"{rel} does not match its sha256"
    return None


def _digest(f) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    while chunk := f.read(1 << 24):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def _rng_states() -> dict:
    import torch

    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
              "python": random.getstate()}  # fmt: skip
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    import torch

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
