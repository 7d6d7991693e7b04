"""Packed SFT rows: every record placed once and whole, the same loss as one record per window
on every test architecture, no attention across a record's boundary, and packing refused by
name for an architecture that cannot keep records apart."""

import numpy as np
import pytest
from architectures import ARCHITECTURES, tokenizer, windowed

from llm_dist.base import UserError
from llm_dist.finetune.packing import Packer, decide
from llm_dist.records import TaskCounts
from llm_dist.train.losses import loss_sum_of
from llm_dist.tune.config import TaskConfig

WIDTH = 33  # data.seq_len 32, + 1


def _records(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n chat-like records: a prompt (mask 0) then an answer (mask 1), 3-28 tokens long."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt, answer = int(rng.integers(2, 14)), int(rng.integers(1, 15))
        ids = rng.integers(5, 300, prompt + answer).astype(np.int32)
        out.append((ids, np.r_[np.zeros(prompt, np.int8), np.ones(answer, np.int8)]))
    return out


def _pack(records, open_rows: int = 64):
    packer = Packer(WIDTH, pad_id=0, open_rows=open_rows)
    rows = [row for ids, mask in records for row in packer.add(ids, mask)]
    return rows + packer.flush()


@pytest.mark.parametrize("open_rows", [1, 4, 64])
def test_every_record_is_in_one_row_whole_with_its_own_positions(open_rows):
    records = _records(40)
    rows = _pack(records, open_rows)
    found = []
    for tokens, mask, position, n in rows:
        starts = np.flatnonzero(position == 0)
        ends = [*starts[1:], WIDTH]
        assert len(starts) in (n, n + 1)  # n records, then the padding's own segment if any
        for s, e in list(zip(starts, ends, strict=True))[:n]:
            found.append(tokens[s:e].tolist())
            assert mask[s] == 0  # a record's first token is never a target
            assert (position[s:e] == np.arange(e - s)).all()
        assert (tokens[ends[n - 1] :] == 0).all() and not mask[ends[n - 1] :].any()
    assert sorted(found) == sorted(ids.tolist() for ids, _ in records)  # each once, whole
    assert len(rows) < len(records)
    if open_rows == 64:  # best fit: 40 records of 3-28 tokens fill their rows well
        used = sum(len(ids) for ids, _ in records)
        assert used / (len(rows) * WIDTH) > 0.85


def test_a_record_as_long_as_the_window_gets_a_row_of_its_own():
    ids, mask = np.arange(5, 5 + WIDTH, dtype=np.int32), np.ones(WIDTH, np.int8)
    rows = _pack([(ids, mask), *_records(3)])
    assert any(n == 1 and (t == ids).all() for t, _, _, n in rows)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "mistral-window-8", "gemma2-window-8"])
def test_packed_rows_have_the_loss_of_one_record_per_window(arch):
    """The sum of a packed batch's losses equals the unpacked windows' (within 1e-5 relative),
    and changing one record leaves every other record's logits as they were. The -window-8
    models' sliding windows are shorter than most records."""
    import torch

    tok = tokenizer()
    model = windowed(arch, tok)
    records = _records(12, seed=1)
    for _, m in records[3:6]:
        m[0] = 1  # an assistant-first chat: its first token still predicts, not is predicted
    rows = _pack(records)
    tokens, mask, position = (torch.from_numpy(np.stack([r[i] for r in rows])).long()
                              for i in range(3))  # fmt: skip
    unpacked = np.zeros((len(records), WIDTH), np.int64)
    marks = np.zeros((len(records), WIDTH), np.int8)
    for i, (ids, m) in enumerate(records):
        unpacked[i, : len(ids)], marks[i, : len(ids)] = ids, m
    with torch.no_grad():
        packed = loss_sum_of(model, tokens, mask, position=position).item()
        alone = loss_sum_of(model, torch.from_numpy(unpacked), torch.from_numpy(marks)).item()
        assert packed == pytest.approx(alone, rel=1e-5)
        assert mask[:, 1:].sum() == marks[:, 1:].sum()  # the same targets

        # perturb the second record of the first row with 2+ records: only its own logits move
        row = next(i for i, r in enumerate(rows) if r[3] >= 3)
        starts = np.flatnonzero(rows[row][2] == 0)
        before = model(input_ids=tokens[row : row + 1], position_ids=position[row : row + 1],
                       use_cache=False).logits[0]  # fmt: skip
        changed = tokens[row : row + 1].clone()
        changed[0, starts[1] : starts[2]] = (changed[0, starts[1] : starts[2]] + 7) % 300
        after = model(input_ids=changed, position_ids=position[row : row + 1],
                      use_cache=False).logits[0]  # fmt: skip
    moved = (before - after).abs().amax(-1) > 1e-6
    assert not moved[: starts[1]].any() and not moved[starts[2] :].any()
    assert moved[starts[1] : starts[2]].all()


def test_packing_is_decided_by_the_architecture_and_refused_by_name(tmp_path):
    from transformers import LlamaConfig, MambaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2).save_pretrained(
        tmp_path / "llama"
    )
    MambaConfig(num_hidden_layers=1, hidden_size=16).save_pretrained(tmp_path / "mamba")
    auto, on, off = TaskConfig(), TaskConfig(packing=True), TaskConfig(packing=False)
    assert decide(auto, str(tmp_path / "llama")) and decide(on, str(tmp_path / "llama"))
    assert not decide(off, str(tmp_path / "llama"))
    assert not decide(auto, str(tmp_path / "mamba"))  # a state carried across records
    with pytest.raises(UserError) as e:
        decide(on, str(tmp_path / "mamba"))
    assert str(e.value) == (
        "tune.task.packing: MambaForCausalLM does not build its attention mask with "
        "transformers' masking utilities, so packed records would attend to each other; set "
        "packing: false or leave it out"
    )
    with pytest.raises(ValueError, match=r"tune\.task\.packing: format text windows are already"):
        TaskConfig(format="text", packing=True)


def test_the_task_counts_say_how_many_records_went_into_the_packed_rows():
    counts = TaskCounts(records=100, sequences={"train": 20, "val": 5, "test": 5},
                        unusable={"too_long": 2}, packed_records=88)  # fmt: skip
    assert counts.line() == ("98 of 100 records prepared (train 20, val 5, test 5; train "
                             "packed: 88 records in 20 windows)")  # fmt: skip
    counts.packed_records = None
    assert counts.line() == "30 of 100 records prepared (train 20, val 5, test 5)"
