"""The loss the worker loop trains on and every evaluation scores: next-token cross-entropy sums."""


def loss_sum_of(model, tokens, mask=None, per_row: bool = False):
    """Summed next-token cross-entropy of `tokens` (b, T+1): inputs [:, :-1], targets [:, 1:];
    a scalar, or (b,) with `per_row`.

    With a `mask` (b, T+1), only tokens marked 1 count as targets (an SFT response).
    """
    import torch.nn.functional as F

    logits = model(input_ids=tokens[:, :-1]).logits  # (b, T, V)
    targets = tokens[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(mask[:, 1:] == 0, -100)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                             reduction="none")  # fmt: skip
    return losses.view(targets.shape).sum(1) if per_row else losses.sum()
