"""Packed SFT over one record per window: useful (target) tokens trained per second, side by side.

The quickstart's task (the standard library's documented functions as `messages` chats,
data.seq_len 128) is prepared twice for the same base, with `tune.task.packing` on and off,
and the quickstart's `tiny` Llama (4 layers, 256 wide, 4,096-token BPE, random weights) takes
optimizer steps on each train split in turn with llm-dist's loss (`loss_sum_of`), AdamW, micro
batch 8, one process: `rounds` rounds of `steps` steps each way, alternating, so both see the
same machine. Printed: windows and records per split, the share of each window that is a
record rather than padding, target tokens per second of each, and their ratio (the aim is at
least 2x). The windows come in the prepared order; the first step of each round is not timed.

    python benchmarks/packing.py [steps] [rounds]
"""

import sys
import tempfile
import time
from pathlib import Path


def main(steps: int = 20, rounds: int = 3) -> None:
    import ray
    import torch

    from llm_dist.data.stdlib import collect
    from llm_dist.spec import JobSpec
    from llm_dist.tune.task import prepare_task

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="packing-"))
    collect(root)
    base = _base(root / "base")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepared = {}
    for packing in (True, False):
        spec = JobSpec(name="b", storage_path=str(root / f"p{packing}"), stages=["tune"],
                       data={"seq_len": 128}, model={"preset": "tiny"},
                       tune={"base_model": base, "search_space": {"lr": {"choice": [1e-3]}},
                             "task": {"sources": [str(root / "stdlib_docstrings.jsonl")],
                                      "group_field": "source", "packing": packing}})  # fmt: skip
        prepared[packing] = prepare_task(spec, base)
    ray.shutdown()

    batches = {p: _batches(t.prepared, 8, steps + 1) for p, t in prepared.items()}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds, targets = dict.fromkeys(batches, 0.0), dict.fromkeys(batches, 0)
    for _ in range(rounds):
        for packing, rows in batches.items():
            for i, b in enumerate(rows):
                start = time.perf_counter()
                _step(model, optimizer, b)
                if i:  # the first step of a round warms the allocator up
                    seconds[packing] += time.perf_counter() - start
                    targets[packing] += int(b["mask"][:, 1:].sum())

    width, used = prepared[True].seq_len + 1, _record_tokens(prepared[False].prepared)
    print(f"{'':8} {'train windows':>13} {'train records':>13} {'record share':>12} "
          f"{'target tok/s':>12}")  # fmt: skip
    for packing, t in prepared.items():
        windows = t.sequences["train"]
        records = t.packed_records if packing else windows
        share = used / (windows * width)  # the same records either way
        rate = targets[packing] / seconds[packing]
        name = "packed" if packing else "padded"
        print(f"{name:8} {windows:>13,} {records:>13,} {share:>12.1%} {rate:>12,.0f}")
    ratio = (targets[True] / seconds[True]) / (targets[False] / seconds[False])
    print(f"target tokens per second, packed / padded: x{ratio:.2f} "
          f"({rounds} rounds of {steps} timed steps, micro batch 8)")  # fmt: skip


def _base(folder: Path) -> str:
    """The quickstart's `tiny` Llama with a 4,096-token BPE trained on standard-library text."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_dist.data.stdlib import stdlib_files
    from llm_dist.data.tokenizer import train_bpe
    from llm_dist.model import PRESETS

    texts = [p.read_text(errors="replace") for p in stdlib_files()[:300]]
    tok = train_bpe(texts, 4096, 128)
    config = LlamaConfig(**PRESETS["tiny"], vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _batches(prepared: str, size: int, count: int) -> list[dict]:
    """The first `count` batches of `size` train windows, as the worker loop gets them."""
    from llm_dist.data.feed import Windows

    rows = Windows.read(prepared, "train", rank=0, world=1, seed=0)
    return [b for _, b in zip(range(count), rows.iter_torch_batches(size), strict=False)]


def _step(model, optimizer, b: dict) -> None:
    from llm_dist.train.losses import loss_sum_of

    loss = loss_sum_of(model, b["tokens"], b["mask"], position=b.get("position"))
    (loss / b["mask"][:, 1:].sum()).backward()
    optimizer.step()
    optimizer.zero_grad()


def _record_tokens(prepared: str) -> int:
    """Tokens of an unpacked train split that belong to a record (each ends at the last
    token of its mask: turns after the last assistant turn are left out), not padding."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(Path(prepared) / "train")
    width = table.schema.field("tokens").type.list_size
    mask = table["mask"].combine_chunks().flatten().to_numpy().reshape(-1, width)
    return int((width - np.argmax(mask[:, ::-1], axis=1)).sum())


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
