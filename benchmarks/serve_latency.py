"""Serving overhead and batching, side by side in one run.

The model is the quickstart's size (the `tiny` preset, random weights, a 4,096-token BPE
tokenizer trained on standard-library text); prompts are lines of standard-library code. The
replica and this process both get 2 CPU threads. Printed:

- Overhead: the same greedy requests one at a time, transformers' `generate()` in this process
  vs the served API over HTTP (Ray Serve's proxy, the batching queue, our decode loop).
  p50/p99 latency and tokens/s of each, and their ratios. The served text is checked equal.
- Batching: 16 concurrent clients sending sampled requests (seeded) to a replica with
  max_batch_size 1, then 16 with the default batch_wait_timeout_s, then 16 waiting 0.1 s to
  fill a batch: tokens/s, p50/p99 latency and the batch sizes the replica decoded.
  The overhead part runs on the spec's defaults (max_batch_size 8, batch_wait_timeout_s 0.01).

    python benchmarks/serve_latency.py [REQUESTS] [MAX_TOKENS]   (default 32, 64)
"""

import json
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REQUESTS = int(sys.argv[1]) if len(sys.argv) > 1 else 32
MAX_TOKENS = int(sys.argv[2]) if len(sys.argv) > 2 else 64
CLIENTS = 16


def setup(root: Path) -> tuple[str, list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_dist.data.tokenizer import train_bpe
    from llm_dist.model import PRESETS

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text() for p in sorted(lib.glob("*.py"))[:60]]
    tokenizer = train_bpe(texts, 4096, 256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        **PRESETS["tiny"], vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    lines = [ln.strip() for t in texts for ln in t.splitlines() if len(ln.strip()) > 30]
    return str(root / "model"), lines[:: max(1, len(lines) // (REQUESTS * 4))][: REQUESTS * 4]


def post(url: str, body: dict) -> tuple[float, dict]:
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as r:
        answer = json.load(r)
    return time.perf_counter() - start, answer


def summary(name: str, latencies: list[float], tokens: int, wall: float) -> dict:
    q = statistics.quantiles(latencies, n=100)
    out = {"p50": q[49], "p99": q[98], "tok_s": tokens / wall}
    print(f"  {name:<34} p50 {out['p50'] * 1000:7.1f} ms  p99 {out['p99'] * 1000:7.1f} ms  "
          f"{out['tok_s']:8.1f} tok/s  ({tokens} tokens, {wall:.1f} s)")  # fmt: skip
    return out


def concurrent(url: str, prompts: list[str]) -> tuple[list[float], int, float]:
    latencies, tokens, lock = [], [0], threading.Lock()

    def client(mine: list[str], seed: int):
        for i, prompt in enumerate(mine):
            seconds, answer = post(url, {"model": "bench", "prompt": prompt, "temperature": 0.8,
                                         "max_tokens": MAX_TOKENS, "seed": seed * 1000 + i})  # fmt: skip
            with lock:
                latencies.append(seconds)
                tokens[0] += answer["usage"]["completion_tokens"]

    threads = [
        threading.Thread(target=client, args=(prompts[c::CLIENTS], c)) for c in range(CLIENTS)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, tokens[0], time.perf_counter() - start


def main() -> None:
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_dist.serve.run import deploy
    from llm_dist.spec import JobSpec

    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    folder, prompts = setup(root)
    torch.set_num_threads(2)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)

    def serve_spec(**batching) -> JobSpec:
        return JobSpec(name="bench", storage_path=str(root), stages=["serve"], serve={
            "model": folder, "port": 8123, "max_tokens": MAX_TOKENS, "cpus_per_replica": 2,
            "max_ongoing_requests": CLIENTS, "test_prompt": prompts[0], **batching})  # fmt: skip

    url = deploy(serve_spec(), str(root / "bench"))["url"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    sequential = prompts[:REQUESTS]
    print(f"\nOverhead: {REQUESTS} greedy requests one at a time, up to {MAX_TOKENS} new tokens")
    rows = {}
    for name in ("in-process generate()", "served over HTTP"):
        latencies, tokens, texts, start = [], 0, [], time.perf_counter()
        for prompt in sequential:
            if name.startswith("in-process"):
                ids = torch.tensor([tokenizer.encode(prompt)])
                t0 = time.perf_counter()
                out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)[
                    0, ids.shape[1] :
                ]
                latencies.append(time.perf_counter() - t0)
                new = [t for t in out.tolist() if t != tokenizer.eos_token_id]
                tokens += len(new)
                texts.append(tokenizer.decode(new, skip_special_tokens=True))
            else:
                seconds, answer = post(url, {"model": "bench", "prompt": prompt,
                                             "max_tokens": MAX_TOKENS, "temperature": 0})  # fmt: skip
                latencies.append(seconds)
                tokens += answer["usage"]["completion_tokens"]
                texts.append(answer["choices"][0]["text"])
        rows[name] = (summary(name, latencies, tokens, time.perf_counter() - start), texts)
    (ref, ref_texts), (served, served_texts) = rows.values()
    same = sum(a == b for a, b in zip(ref_texts, served_texts, strict=True))
    print(f"  served/in-process: p50 x{served['p50'] / ref['p50']:.2f}, p99 "
          f"x{served['p99'] / ref['p99']:.2f}, tok/s x{served['tok_s'] / ref['tok_s']:.2f}; "
          f"identical texts {same}/{REQUESTS}")  # fmt: skip

    print(f"\nBatching: {CLIENTS} concurrent clients, {len(prompts)} sampled requests in all")
    results = []
    for batch, wait in ((1, 0.0), (16, 0.01), (16, 0.1)):
        deploy(serve_spec(max_batch_size=batch, batch_wait_timeout_s=wait), str(root / "bench"))
        latencies, tokens, wall = concurrent(url, prompts)
        results.append(summary(f"max_batch_size {batch}, wait {wait} s", latencies, tokens, wall))
        with urllib.request.urlopen(f"{url}/health") as r:
            print(f"    batch size: batches decoded {json.load(r)['batches']}")
    u = results[0]
    for (batch, wait), b in zip(((16, 0.01), (16, 0.1)), results[1:], strict=True):
        print(f"  batch {batch} wait {wait} s / unbatched: tok/s x{b['tok_s'] / u['tok_s']:.2f}, "
              f"p50 x{b['p50'] / u['p50']:.2f}, p99 x{b['p99'] / u['p99']:.2f}")  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
