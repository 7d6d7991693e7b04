"""The engine's running batch as tensors: KV cache, attention mask, positions, next tokens.

Rows are left-padded to one length. A row's padding is masked out, and positions are explicit
(counted over its own tokens), so padding changes no row's answer. Rows that joined with a
shorter cache are padded on the left to the batch's length; padding that no row needs any more
(everyone it was for has left) is cut off again.
"""

from dataclasses import dataclass


@dataclass
class Batch:
    """A batch ready for its next forward pass: `ids` (B, 1) are fed at `position` (B, 1);
    `mask` (B, L + 1) covers the cache's L tokens and `ids`."""

    cache: object  # transformers.DynamicCache
    mask: object
    position: object
    ids: object = None
    logits: object = None  # (B, V) float32 on CPU: the scores the prefill ended on

    @property
    def mergeable(self) -> bool:
        """Whether new rows can join: full-attention and sliding-window layers pad alike; other
        caches (linear attention, indexers, quantized) are left to decode as they started."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                   and layer.is_initialized for layer in self.cache.layers)  # fmt: skip

    @staticmethod
    def prefill(model, prompts: list[list[int]], pad: int) -> "Batch | None":
        """Run `prompts` (left-padded) through `model`; the Batch's logits score each next token."""
        import torch
        from transformers import DynamicCache

        if not prompts:
            return None
        width, device = max(map(len, prompts)), model.device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=device)  # fmt: skip
        position = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache,
                    use_cache=True, logits_to_keep=1)  # fmt: skip
        return Batch(cache, mask, position[:, -1:], logits=out.logits[:, -1].float().cpu())

    def step(self, model):
        """One forward pass over `ids`: (B, V) float32 scores on CPU for each row's next token."""
        out = model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position,
                    cache=self.cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1].float().cpu()

    @staticmethod
    def merged(old: "Batch | None", new: "Batch | None", keep: list[int], n_old: int,
               tokens: list[int]) -> "Batch | None":  # fmt: skip
        """The next step's batch: rows `keep` of old + new (old's rows numbered first, new's
        from `n_old`), each to be fed its entry of `tokens`."""
        import torch

        parts = [_select(b, [k - start for k in keep if start <= k < end])
                 for b, start, end in ((old, 0, n_old), (new, n_old, 1 << 62)) if b is not None]  # fmt: skip
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        batch = parts[0] if len(parts) == 1 else _concat(*parts)
        device = batch.mask.device
        batch.ids = torch.tensor([[t] for t in tokens], device=device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(tokens), 1)], dim=1)
        batch.position = batch.position + 1
        return batch


def _select(batch: Batch, rows: list[int]) -> Batch | None:
    """`batch` with only `rows`, cut of the padding none of them needs any more."""
    import torch

    if not rows:
        return None
    if rows != list(range(batch.mask.shape[0])):
        index = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
        batch.cache.batch_select_indices(index)
        batch.mask, batch.position = batch.mask[index], batch.position[index]
    unused = int(batch.mask.any(0).int().argmax())  # leading columns no row attends to
    if unused and batch.mergeable:  # the layer kinds whose columns we know
        length = batch.mask.shape[1] - unused
        for layer in batch.cache.layers:
            if hasattr(layer, "cumulative_length"):  # a sliding window counts what it has seen
                layer.cumulative_length = length
            keep = min(layer.keys.shape[-2], length)  # a window may hold fewer columns already
            layer.keys, layer.values = layer.keys[..., -keep:, :], layer.values[..., -keep:, :]
        batch.mask = batch.mask[:, unused:]
    return batch


def _concat(a: Batch, b: Batch) -> Batch:
    """Rows of `a` then rows of `b`, left-padded to one length (`a`'s cache is reused)."""
    import torch
    import torch.nn.functional as F

    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        length = max(la.keys.shape[-2], lb.keys.shape[-2])  # a sliding window keeps fewer
        la.keys = torch.cat([F.pad(x, (0, 0, length - x.shape[-2], 0)) for x in (la.keys, lb.keys)])
        la.values = torch.cat([F.pad(x, (0, 0, length - x.shape[-2], 0))
                               for x in (la.values, lb.values)])  # fmt: skip
        if hasattr(la, "cumulative_length"):  # sliding windows count what they have seen
            la.cumulative_length = max(la.cumulative_length, lb.cumulative_length)
    a.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (a.mask, b.mask)])
    a.position = torch.cat([a.position, b.position])
    return a
