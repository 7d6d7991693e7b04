"""The GPU check: one short prepared script for the day a GPU machine is lent (under 8 minutes).

    python benchmarks/gpu_check.py [--dry-run] [FOLDER]      (default FOLDER: a temp folder)

1. data: the standard library's sources (`llm-dist data stdlib`), a 32k BPE, 1,024 tokens.
2. pretrain: the `1b` preset in bf16, ZeRO-2 over NCCL, 1 GPU, 30 steps: tokens/s and MFU of
   the last logged steps (`pretrain/metrics.jsonl`).
3. the same on 2 workers when the machine has 2 GPUs or more.
4. serve step 2's export, first with `engine: transformers`, then `engine: vllm` (when vLLM is
   installed) with API keys on: 16 clients, 64 sampled requests of 128 tokens: tokens/s; and
   one request without a key, which must get 401.

Prints one table. `--dry-run` validates every spec the check would run and prints its
commands, running nothing: the test suite runs it on CPU, so the script cannot rot.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

STEPS, CLIENTS, REQUESTS, TOKENS, KEY = 30, 16, 64, 128, "sk-gpu-check"


def specs(root: Path, gpus: int) -> dict[str, dict]:
    """Every spec the check runs, by name."""
    base = {"storage_path": str(root / "runs"), "cluster": {"use_gpu": True}}
    data = {"sources": [str(root / "data" / "stdlib.jsonl")], "seq_len": 1024,
            "tokenizer": {"vocab_size": 32000, "train_sample_docs": 2000}}  # fmt: skip
    pretrain = {"zero_stage": 2, "precision": "bf16", "micro_batch_size": 8, "max_steps": STEPS,
                "warmup_steps": 5, "log_every": 5, "eval_every": STEPS, "checkpoint_every": STEPS}  # fmt: skip
    out = {}
    for workers in [1, 2] if gpus >= 2 else [1]:
        out[f"pretrain-{workers}gpu"] = {**base, "name": f"pretrain-{workers}gpu",
            "stages": ["data", "pretrain"], "data": data, "model": {"preset": "1b"},
            "pretrain": {**pretrain, "num_workers": workers}}  # fmt: skip
    export = str(root / "runs" / "pretrain-1gpu" / "pretrain" / "export")
    for engine in ("transformers", "vllm"):
        out[f"serve-{engine}"] = {**base, "name": f"serve-{engine}", "stages": ["serve"],
            "serve": {"model": export, "engine": engine, "gpus_per_replica": 1, "port": 8011,
                      "max_prompt_tokens": 512, "max_tokens": TOKENS, "max_ongoing_requests": 32,
                      "api_keys_env": "LLM_DIST_GPU_CHECK_KEYS"}}  # fmt: skip
    return out


def pretrained(root: Path, name: str) -> dict:
    """tokens/s and MFU, the mean of the logged rows after the first (warm-up, JIT builds)."""
    from llm_dist.run_folder import RunFolder

    rows = RunFolder(str(root / "runs" / name)).pretrain.read_metrics()
    rows = [r for r in rows if r.tokens_per_s is not None][1:] or rows[-1:]
    return {k: sum(getattr(r, k) for r in rows) / len(rows) for k in ("tokens_per_s", "mfu")}


def served(root: Path, spec: Path, prompts: list[str]) -> dict:
    """Serve `spec` in a subprocess; 16 clients' tokens/s, and the status of a keyless request."""
    from serve_latency import concurrent

    env = {**os.environ, "LLM_DIST_GPU_CHECK_KEYS": KEY}
    url = "http://127.0.0.1:8011"
    with open(spec.with_suffix(".log"), "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "llm_dist.cli", "serve", str(spec)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    urllib.request.urlopen(f"{url}/v1/models", timeout=5).close()
                    break
                except urllib.error.HTTPError:  # 401: up, and keyed
                    break
                except OSError:
                    time.sleep(2)
            try:
                keyless = urllib.request.urlopen(f"{url}/v1/models", timeout=10).status
            except urllib.error.HTTPError as e:
                keyless = e.code
            _, tokens, wall = concurrent(url, prompts, CLIENTS, model=spec.stem, key=KEY,
                                         max_tokens=TOKENS)  # fmt: skip
            return {"tokens_per_s": tokens / wall, "keyless": keyless}
        finally:
            server.terminate()
            server.wait(timeout=120)


def main() -> None:
    dry = "--dry-run" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--dry-run"]
    root = Path(args[0] if args else tempfile.mkdtemp(prefix="gpu-check-"))
    gpus = 2 if dry else _gpus()
    from llm_dist.spec import JobSpec

    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, spec in specs(root, gpus).items():
        JobSpec.model_validate(spec)  # a spec that would fail on the GPU machine fails here
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(spec))
    commands = [["llm-dist", "data", "stdlib", str(root / "data")]]
    commands += [["llm-dist", "run", str(p)] for n, p in paths.items() if n.startswith("pretrain")]
    if dry:
        for command in commands:
            print(" ".join(command))
        print(
            *(f"serve {p} with 16 clients" for n, p in paths.items() if n.startswith("serve")),
            sep="\n",
        )
        return
    start, table = time.monotonic(), []
    for command in commands:
        subprocess.run([sys.executable, "-m", "llm_dist.cli", *command[1:]], check=True)
    for name in (n for n in paths if n.startswith("pretrain")):
        got = pretrained(root, name)
        table.append((name, f"{got['tokens_per_s']:,.0f} tok/s", f"MFU {got['mfu']:.1%}"))
    prompts = [
        line for line in (root / "data" / "stdlib.jsonl").read_text().splitlines()[:REQUESTS]
    ]
    prompts = [json.loads(p)["text"][:400] for p in prompts]
    for engine in ("transformers", "vllm"):
        if engine == "vllm" and not _has("vllm"):
            table.append(("serve-vllm", "not run: vLLM is not installed", ""))
            continue
        got = served(root, paths[f"serve-{engine}"], prompts)
        table.append((f"serve-{engine}", f"{got['tokens_per_s']:,.0f} tok/s at {CLIENTS} clients",
                      f"keyless request: {got['keyless']}"))  # fmt: skip
    print(f"\nGPU check ({gpus} GPU(s), {time.monotonic() - start:.0f} s)")
    for row in table:
        print(f"  {row[0]:<22} {row[1]:<36} {row[2]}")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
