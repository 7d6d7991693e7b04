"""Serving overhead and continuous batching, side by side in one run.

The model is the quickstart's size (the `tiny` preset, random weights, a 4,096-token BPE
tokenizer trained on standard-library text); prompts are lines of standard-library code. The
replica and this process both get 2 CPU threads. Printed:

- Overhead: the same greedy requests one at a time, transformers' `generate()` in this process
  vs the served API over HTTP on the shipped defaults (Ray Serve's proxy, the engine's queue
  and decode loop). p50/p99 latency and tokens/s of each, and their ratios. The served text
  is checked equal.
- Batching: 1, 4, 16 and 32 concurrent clients sending sampled requests (seeded) to a replica
  with max_batch_size 1 (unbatched), then to one on the shipped defaults (continuous
  batching): tokens/s, p50/p99 latency, the batch sizes decode steps ran at, and the ratios.

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


def post(url: str, body: dict, key: str | None = None) -> tuple[float, dict]:
    headers = {"Content-Type": "application/json"} | (
        {"Authorization": f"Bearer {key}"} if key else {}
    )
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), headers)
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


def steps(url: str) -> dict[str, int]:
    """The replica's decode steps so far, by batch size."""
    with urllib.request.urlopen(f"{url}/health") as r:
        return json.load(r)["steps"]


def concurrent(url: str, prompts: list[str], clients: int, model: str = "bench",
               key: str | None = None, max_tokens: int = MAX_TOKENS) -> tuple[list[float], int, float]:  # fmt: skip
    """`clients` threads sending `prompts` between them, sampled and seeded: latencies, tokens, wall s."""
    latencies, tokens, lock = [], [0], threading.Lock()

    def client(mine: list[str], seed: int):
        for i, prompt in enumerate(mine):
            seconds, answer = post(url, {"model": model, "prompt": prompt, "temperature": 0.8,
                                         "max_tokens": max_tokens, "seed": seed * 1000 + i}, key)  # fmt: skip
            with lock:
                latencies.append(seconds)
                tokens[0] += answer["usage"]["completion_tokens"]

    threads = [
        threading.Thread(target=client, args=(prompts[c::clients], c)) for c in range(clients)
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

    def serve_spec(**settings) -> JobSpec:
        return JobSpec(name="bench", storage_path=str(root), stages=["serve"], serve={
            "model": folder, "port": 8123, "max_tokens": MAX_TOKENS, "cpus_per_replica": 2,
            "test_prompt": prompts[0], **settings})  # fmt: skip

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

    print("\nBatching: concurrent clients, sampled requests (temperature 0.8, a seed each)")
    for name, settings in (("unbatched (max_batch_size 1)", {"max_batch_size": 1}),
                           ("continuous (defaults)", {})):  # fmt: skip
        deploy(serve_spec(**settings), str(root / "bench"))
        for clients in (1, 4, 16, 32):
            mine = prompts[: max(REQUESTS, 4 * clients)]
            before = steps(url)
            latencies, tokens, wall = concurrent(url, mine, clients)
            rows[name, clients] = summary(f"{name}, {clients} clients", latencies, tokens, wall)
            ran = {k: v - before.get(k, 0) for k, v in steps(url).items() if v > before.get(k, 0)}
            print(f"    decode steps by batch size: {ran}")
    for clients in (1, 4, 16, 32):
        u, c = rows["unbatched (max_batch_size 1)", clients], rows["continuous (defaults)", clients]
        print(f"  {clients:>2} clients, continuous / unbatched: tok/s x{c['tok_s'] / u['tok_s']:.2f}, "
              f"p50 x{c['p50'] / u['p50']:.2f}, p99 x{c['p99'] / u['p99']:.2f}")  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
