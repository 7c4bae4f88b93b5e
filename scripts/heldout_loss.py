"""Held-out flow loss of checkpoints, the tuning sweep's dense signal beside ShapesEval: 128 Shapes items of
their own seed (999, never trained on), every token (no masking), t on a fixed grid with fixed noise, the
checkpoint's (EMA) weights; one JSON row per checkpoint, per t and their mean.

    python scripts/heldout_loss.py CKPT [CKPT ...]
"""

from __future__ import annotations

import json
import sys

import torch

from ecviz.checkpoint import load_checkpoint
from ecviz.data.shapes import ShapesDataset
from ecviz.flow import interpolate, velocity
from ecviz.pipeline import Pipeline

T_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
ITEMS, SEED, BATCH = 128, 999, 32


@torch.no_grad()
def item_losses(model, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(len(T_GRID), n): the trainer's flow loss of each item x (n, ...) under its text at each t of T_GRID,
    noise (len(T_GRID), n, ...), in batches of BATCH items, routed in the model's current routing groups (heldout_loss
    sets the training group; binding_probe keeps the inference one, as sampling routes)."""
    out = torch.zeros(len(T_GRID), len(x))
    for j, t in enumerate(T_GRID):
        for s in range(0, len(x), BATCH):
            sl = slice(s, s + BATCH)
            tt = torch.full((x[sl].shape[0],), t)
            pred = model(interpolate(x[sl], noise[j, sl], tt), tt, y[sl], y_mask[sl])
            out[j, sl] = (pred - velocity(x[sl], noise[j, sl])).square().flatten(1).mean(1)
    return out


@torch.no_grad()
def heldout_loss(ckpt: str) -> dict:
    model, info = load_checkpoint(ckpt)
    model.eval()
    cfg = model.cfg
    b = ShapesDataset(length=ITEMS, size=cfg.input_size, seed=SEED).batch(range(ITEMS), fields=("image", "caption"))
    x = b["image"]  # (N, 3, H, W)
    pipe = Pipeline.from_model(model)
    y, y_mask, _ = pipe.encode_text(list(b["caption"]))
    noise = torch.randn(len(T_GRID), *x.shape, generator=torch.Generator().manual_seed(7))
    pipe.set_group_size(cfg.group_size)  # route as in training: groups of the training size
    losses = item_losses(model, x, y, y_mask, noise)  # (t, item); items of one size, so the mean is flow_loss's
    row = {"ckpt": ckpt, "step": info.meta.get("step")}
    for j, t in enumerate(T_GRID):
        row[f"t={t}"] = round(losses[j].mean().item(), 5)
    row["mean"] = round(sum(row[f"t={t}"] for t in T_GRID) / len(T_GRID), 5)
    return row


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(heldout_loss(path)), flush=True)
