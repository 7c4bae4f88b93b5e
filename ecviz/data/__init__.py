"""Training data: the synthetic shapes set with ground truth (`shapes`) and real image-caption pairs
(`imagetext`), and the one `collate` both are batched with."""

from __future__ import annotations

import torch


def collate(batch: list[dict]) -> dict:
    """DataLoader collate_fn of every data set: stack tensors (ints become a tensor), keep strings and lists as
    lists (an image-text batch: images (B, 3, size, size), captions and keys as lists)."""
    out = {}
    for key, first in batch[0].items():
        values = [b[key] for b in batch]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, int):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
