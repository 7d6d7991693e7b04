"""The worker loop's state: progress and data position, what a checkpoint saves and resume loads."""

from dataclasses import dataclass, field

import numpy as np

PROGRESS = ("step", "epoch", "tokens", "bad_steps", "val_loss_at_start")


def _rows() -> np.ndarray:
    return np.zeros((0, 2), np.int64)


@dataclass
class TrainState:
    """One rank's state. `step` counts optimizer steps, `tokens` the tokens trained on, `bad_steps`
    the NaN/inf steps skipped (`in_a_row` of them lately, not saved); `ledger` holds this rank's
    (step, sequence id) rows of the epoch in progress, and `consumed` every rank's rows of it up
    to the checkpoint resumed from: the ids this epoch must not feed again. A checkpoint saves
    the progress (in its manifest), the ledger and the RNG states (`train.checkpoint`)."""

    step: int = 0
    epoch: int = 0
    tokens: int = 0
    bad_steps: int = 0
    val_loss_at_start: float | None = None  # None when resumed
    ledger: list[np.ndarray] = field(default_factory=lambda: [_rows()])
    consumed: np.ndarray = field(default_factory=_rows)
    in_a_row: int = 0

    def progress(self) -> dict:
        return {k: getattr(self, k) for k in PROGRESS}

    def rows(self) -> np.ndarray:
        """This rank's (step, id) rows of the epoch in progress, (n, 2)."""
        return np.concatenate(self.ledger)

    def took(self, step: int, ids: np.ndarray) -> None:
        """Record that optimizer step `step` is training on the sequences `ids`."""
        self.ledger.append(np.stack([np.full(len(ids), step), ids], 1))

    def next_epoch(self) -> None:
        self.epoch, self.ledger, self.consumed = self.epoch + 1, [_rows()], _rows()

    @classmethod
    def resumed(cls, progress: dict, ledger: np.ndarray, consumed: np.ndarray) -> "TrainState":
        return cls(**{k: progress[k] for k in PROGRESS}, ledger=[ledger], consumed=consumed)
