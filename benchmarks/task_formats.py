"""Task preparation speed: the `messages` format vs prompt/response (`sft`), side by side.

The quickstart's task (the standard library's documented functions: a system turn, the
signature, its docstring) is written twice, as OpenAI `messages` and as prompt/response pairs
of the same signatures and docstrings, and prepared for the same base (a BPE tokenizer with
the quickstart's vocabulary, no chat template, so llm-dist's default one). Printed per format:
tokens in the prepared windows per second of `prepare_task` on a local Ray (best of 2), and
of the per-record rendering alone in one process (`formats.encode`), and their ratio.

    python benchmarks/task_formats.py
"""

import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    import ray

    from llm_dist.data.stdlib import collect
    from llm_dist.finetune.formats import encode
    from llm_dist.spec import JobSpec
    from llm_dist.tune.task import prepare_task

    root = Path(tempfile.mkdtemp(prefix="task-formats-"))
    collect(root)
    chats = [json.loads(x) for x in (root / "stdlib_docstrings.jsonl").read_text().splitlines()]
    with open(root / "pairs.jsonl", "w") as f:
        for c in chats:
            _, user, assistant = c["messages"]
            pair = {
                "prompt": user["content"],
                "response": assistant["content"],
                "source": c["source"],
            }
            f.write(json.dumps(pair) + "\n")
    base = _base(root / "base")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = {}
    for fmt, source in (("messages", "stdlib_docstrings.jsonl"), ("sft", "pairs.jsonl")):
        best = float("inf")
        for attempt in range(2):
            spec = JobSpec(name="b", storage_path=str(root / f"{fmt}{attempt}"), stages=["tune"],
                           data={"seq_len": 128}, model={"preset": "tiny"},
                           tune={"base_model": base, "search_space": {"lr": {"choice": [1e-3]}},
                                 "task": {"sources": [str(root / source)], "format": fmt,
                                          "group_field": "source"}})  # fmt: skip
            start = time.perf_counter()
            task = prepare_task(spec, base)
            best = min(best, time.perf_counter() - start)
        tokens = _tokens(task.prepared)
        rows[fmt] = {"records": task.records, "tokens": tokens, "ray_tok_s": tokens / best}
    ray.shutdown()

    from llm_dist.data.tokenizer import load
    from llm_dist.finetune.formats import DEFAULT_CHAT_TEMPLATE

    tok = load(base)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    convs = {"messages": [c["messages"] for c in chats],
             "sft": [c["messages"][1:] for c in chats]}  # fmt: skip
    for fmt, items in convs.items():
        start, n = time.perf_counter(), 0
        for messages in items:
            n += len(encode(tok, messages)[0])
        rows[fmt]["encode_tok_s"] = n / (time.perf_counter() - start)

    print(f"{'format':10} {'records':>8} {'tokens':>9} {'prepare tok/s':>14} {'encode tok/s':>13}")
    for fmt, r in rows.items():
        print(f"{fmt:10} {r['records']:>8,} {r['tokens']:>9,} {r['ray_tok_s']:>14,.0f} "
              f"{r['encode_tok_s']:>13,.0f}")  # fmt: skip
    m, s = rows["messages"], rows["sft"]
    print(
        f"messages / sft: prepare x{m['ray_tok_s'] / s['ray_tok_s']:.2f}, "
        f"encode x{m['encode_tok_s'] / s['encode_tok_s']:.2f}"
    )


def _base(folder: Path) -> str:
    """A base folder: a 4096-token BPE trained on standard-library text, a tiny random Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_dist.data.stdlib import stdlib_files
    from llm_dist.data.tokenizer import train_bpe

    texts = [p.read_text(errors="replace") for p in stdlib_files()[:300]]
    tok = train_bpe(texts, 4096, 128)
    AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        vocab_size=len(tok), max_position_embeddings=256)).save_pretrained(folder)  # fmt: skip
    tok.save_pretrained(folder)
    return str(folder)


def _tokens(prepared: str) -> int:
    """Tokens in the windows that are not padding (the mask's last 1 ends each record)."""
    import numpy as np
    import pyarrow.parquet as pq

    n = 0
    for split in ("train", "val", "test"):
        mask = np.stack(
            pq.read_table(Path(prepared) / split)["mask"].to_numpy(zero_copy_only=False)
        )
        if len(mask):
            n += int((mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)).sum())
    return n


if __name__ == "__main__":
    main()
