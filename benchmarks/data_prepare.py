"""Data preparation throughput: the whole Ray Data stage vs one plain process, same tokenizer.

Both sides read the same JSONL corpus, clean it, tokenize with the same fast tokenizer, append
EOS, pack windows and write Parquet. Ray is started before the clock (its start-up is printed
separately). Peak memory: the plain process's max RSS; for Ray, the summed RSS of the driver
and every Ray process, sampled every 100 ms.

    python benchmarks/data_prepare.py [CORPUS.jsonl]   (default: data/stdlib.jsonl, made if missing)
"""

import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PLAIN = r"""
import json, sys, time, numpy as np, pyarrow as pa, pyarrow.parquet as pq
from tokenizers import Tokenizer
from llm_dist.data.corpus import clean
corpus, tokenizer_json, seq_len, out = sys.argv[1:5]
start = time.perf_counter()
tok = Tokenizer.from_file(tokenizer_json)
eos = tok.token_to_id("<|endoftext|>")
texts = []
for line in open(corpus, "rb"):
    text, _ = clean(json.loads(line)["text"], 1, None)
    if text:
        texts.append(text)
ids = [np.array([*e.ids, eos], np.int32) for e in tok.encode_batch(texts, add_special_tokens=False)]
stream = np.concatenate(ids)
width = int(seq_len) + 1
n = len(stream) // width
windows = stream[: n * width]
pq.write_table(pa.table({"id": np.arange(n), "tokens": pa.FixedSizeListArray.from_arrays(pa.array(windows), width)}), out)
print(json.dumps({"tokens": len(stream), "seconds": time.perf_counter() - start}))
"""


def ray_rss() -> int:
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid == psutil.Process().pid or "ray" in cmd or "raylet" in cmd or "gcs_server" in cmd:
            total += p.info["memory_info"].rss if p.info["memory_info"] else 0
    return total


def main() -> None:
    import ray

    from llm_dist.data.prepare import prepare
    from llm_dist.data.stdlib import collect
    from llm_dist.spec import JobSpec

    corpus = Path(sys.argv[1] if len(sys.argv) > 1 else "data/stdlib.jsonl")
    if not corpus.exists():
        collect(corpus.parent)
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = {
        "sources": [str(corpus)],
        "seq_len": 128,
        "tokenizer": {"vocab_size": 4096, "train_sample_docs": 2000},
    }
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t0

    # Whole stage with BPE training, then once more with that tokenizer given (like the plain side).
    trained = prepare(JobSpec(name="b", storage_path=str(tmp / "a"), stages=["data"], data=data))
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], ray_rss())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    given = {**data, "tokenizer": {"path": trained.tokenizer}}
    ray_run = prepare(JobSpec(name="b", storage_path=str(tmp / "b"), stages=["data"], data=given))
    stop.set()
    sampler.join()

    plain = subprocess.run(
        [sys.executable, "-c", PLAIN, str(corpus), f"{trained.tokenizer}/tokenizer.json", "128", str(tmp / "plain.parquet")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    plain_stats = json.loads(plain.stdout)
    plain_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    ray_tps = sum(ray_run.tokens.values()) / ray_run.seconds
    plain_tps = plain_stats["tokens"] / plain_stats["seconds"]
    print(
        f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB, {ray_run.documents:,} documents, {sum(ray_run.tokens.values()):,} tokens)"
    )
    print(f"ray start (not timed below):         {ray_start:6.1f} s")
    print(
        f"ray data stage, BPE trained:         {trained.seconds:6.1f} s  {trained.tokens_per_s:>10,} tok/s"
    )
    print(
        f"ray data stage, tokenizer given:     {ray_run.seconds:6.1f} s  {ray_tps:>10,.0f} tok/s  peak RSS {peak[0] / 2**20:,.0f} MiB (driver + Ray)"
    )
    print(
        f"plain process, same tokenizer:       {plain_stats['seconds']:6.1f} s  {plain_tps:>10,.0f} tok/s  peak RSS {plain_peak / 2**20:,.0f} MiB"
    )
    print(f"ratio ray / plain (tokenizer given): {ray_tps / plain_tps:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
