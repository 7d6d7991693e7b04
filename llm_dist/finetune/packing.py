"""Packed SFT rows: several task records in one window of seq_len + 1 tokens, each record
attending only to itself.

A packed row holds whole records back to back, and its `position` column restarts at 0 where
each record starts. Given such position ids, no attention mask and no cache, transformers'
masking utilities (`create_causal_mask`, `find_packed_sequence_indices`) build a block-diagonal
causal mask for eager and SDPA attention (flash attention reads the same ids as varlen), so a
token sees only the tokens of its own record before it, at the positions it has alone. A
record's first token is never a target (unpacked it is token 0 of its window, with nothing
before it to predict it from), so its mask is 0 here too: no loss counts a prediction made from
the record before it. A packed row's loss is then the sum of its records' unpacked losses
(`tests/test_packing.py`, on every test architecture). Only the train split is packed:
evaluations, task metrics and the test figure stay per record.
"""

import numpy as np

from llm_dist.base import UserError

# The masking utilities that read packed position ids (transformers' masking_utils)
MASKS = ("create_causal_mask", "create_sliding_window_causal_mask")


def unsupported(base: str) -> str | None:
    """None when the causal LM class of the model in folder `base` builds its attention mask with
    transformers' masking utilities (so packed position ids keep records apart), else why not.
    """
    import inspect

    import transformers
    from transformers import AutoConfig, masking_utils
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(base, local_files_only=True)
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        return f"transformers has no causal LM class for model_type {config.model_type!r}"
    module = inspect.getmodule(getattr(transformers, name))
    if not any(getattr(module, f, None) is getattr(masking_utils, f) for f in MASKS):
        return f"{name} does not build its attention mask with transformers' masking utilities"
    return None


def decide(task, base: str) -> bool:
    """Whether a chat task's train split is packed: `tune.task.packing`, or where it is left
    empty, whether the base model's architecture supports it. Raises UserError naming the field
    when packing is asked for and the architecture cannot keep records apart."""
    if task.packing is False:
        return False
    why = unsupported(base)
    if task.packing and why:
        raise UserError(f"tune.task.packing: {why}, so packed records would attend to each "
                        f"other; set packing: false or leave it out")  # fmt: skip
    return why is None


class Packer:
    """Records into rows of `width` tokens, best fit: a record goes to the open row it fills the
    most, and when none has room and `open_rows` rows are open, the fullest is closed. Order and
    result depend only on the records' order; memory is `open_rows` rows.

    `add` and `flush` return the closed rows as (tokens, mask, position, records), each (width,)
    but records, the number of records in the row.
    """

    def __init__(self, width: int, pad_id: int, open_rows: int = 64):
        self.width, self.pad_id, self.open_rows = width, pad_id, open_rows
        self.rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self.room: list[int] = []

    def add(self, tokens: np.ndarray, mask: np.ndarray) -> list[tuple]:
        """Place one record (its tokens and loss mask, at most `width` long)."""
        assert 0 < len(tokens) <= self.width and len(tokens) == len(mask)
        fits = [i for i, r in enumerate(self.room) if r >= len(tokens)]
        closed = []
        if not fits:
            if len(self.rows) == self.open_rows:
                closed.append(self._close(min(range(len(self.room)), key=self.room.__getitem__)))
            self.rows.append([])
            self.room.append(self.width)
            fits = [len(self.rows) - 1]
        best = min(fits, key=self.room.__getitem__)
        self.rows[best].append((tokens, mask))
        self.room[best] -= len(tokens)
        return closed

    def flush(self) -> list[tuple]:
        """Close every open row."""
        return [self._close(0) for _ in range(len(self.rows))]

    def _close(self, i: int) -> tuple:
        records, _ = self.rows.pop(i), self.room.pop(i)
        tokens = np.full(self.width, self.pad_id, np.int32)
        mask, position = np.zeros(self.width, np.int8), np.zeros(self.width, np.int32)
        start = 0
        for ids, marks in records:
            end = start + len(ids)
            tokens[start:end], mask[start:end] = ids, marks
            mask[start] = 0  # predicted from the record before: never a target (see above)
            position[start:end] = np.arange(len(ids))
            start = end
        position[start:] = np.arange(self.width - start)  # the padding: a segment of its own
        return tokens, mask, position, len(records)
