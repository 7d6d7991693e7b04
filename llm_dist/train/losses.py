"""The loss the worker loop trains on and every evaluation scores: next-token cross-entropy sums."""


def loss_sum_of(model, tokens, mask=None, per_row: bool = False, position=None):
    """Summed next-token cross-entropy of `tokens` (b, T+1): inputs [:, :-1], targets [:, 1:];
    a scalar, or (b,) with `per_row`.

    With a `mask` (b, T+1), only tokens marked 1 count as targets (an SFT response). With a
    `position` (b, T+1), rows are packed records (`finetune.packing`): the position ids, with no
    attention mask and no cache, keep each record's attention inside it.
    """
    import torch.nn.functional as F

    inputs = {"input_ids": tokens[:, :-1], "use_cache": False}  # a cache hides packed rows
    if position is not None:
        inputs["position_ids"] = position[:, :-1]
    logits = model(**inputs).logits  # (b, T, V)
    targets = tokens[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(mask[:, 1:] == 0, -100)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                             reduction="none")  # fmt: skip
    return losses.view(targets.shape).sum(1) if per_row else losses.sum()
