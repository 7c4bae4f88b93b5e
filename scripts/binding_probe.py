"""Does a checkpoint bind words to places and objects? A dense signal for ShapesEval's two weakest categories.

For held-out Shapes items (seed 999, never trained on) of the position and colour-attribution categories, the
flow loss of each image under its own caption, under the same caption with the two objects' roles swapped
("a square left of a ring" -> "a ring left of a square"; "a white ring and a red circle" -> "a red ring and a
white circle") and, as the control, under another item's caption of the same category. Same images, noise,
t grid and routing groups for the three; per item the loss is the mean over t. The model routes in its inference
groups (as it samples), where scripts/heldout_loss.py routes in the training groups: the same items' loss is
about 2% higher here (0.0629 against 0.0614 on 64 items of ec-dit-shapes), so compare losses within one script
only. Per category:

- binding: the share of items whose own caption gives a lower loss than the swapped one (0.5: the model cannot
  tell a caption from its swap); rel_gap: the mean loss increase of the swap, relative to the own loss;
- other_beaten, rel_gap_other: the same against another item's caption, which names other shapes or colours:
  how much the model listens to the caption at all;
- by_t: binding and rel_gap at each t of the grid alone (binding shows at some noise levels, not at others:
  the shipped EC-DiT's colour attribution at t = 0.3-0.9, its position at none).

Takes a minute per shipped checkpoint on 2 CPU cores; a GPU session can score a model mid-training with it.

    python scripts/binding_probe.py CKPT [CKPT ...]     (one JSON line per checkpoint)
"""

from __future__ import annotations

import json
import re
import sys

import torch
from heldout_loss import SEED, T_GRID, item_losses  # scripts/heldout_loss.py, beside this script

from ecviz.checkpoint import load_checkpoint
from ecviz.data.shapes import ShapesDataset
from ecviz.pipeline import Pipeline

ITEMS = 128  # per category; held-out items of scripts/heldout_loss.py's seed
POSITION = re.compile(r"^an? (\w+) (left of|right of|above|below) an? (\w+)$")
COLOUR_ATTR = re.compile(r"^an? (\w+) (\w+) and an? (\w+) (\w+)$")
CATEGORIES = ("position", "color_attr")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def swapped(caption: str, category: str) -> str:
    """The caption with its two objects' roles exchanged: the shapes around a relation, or the two colours."""
    if category == "position":
        a, relation, b = POSITION.match(caption).groups()
        return f"{_a(b)} {b} {relation} {_a(a)} {a}"
    c1, s1, c2, s2 = COLOUR_ATTR.match(caption).groups()
    return f"{_a(c2)} {c2} {s1} and {_a(c1)} {c1} {s2}"


def held_out(size: int, items: int = ITEMS) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{category: (images (n, 3, H, W), captions)}: the first `items` held-out items of each category."""
    data = ShapesDataset(length=1_000_000, size=size, seed=SEED)
    found: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    start = 0
    while any(len(v) < items for v in found.values()):
        cats = data.batch(range(start, start + 512), fields=("category",))["category"]
        for i, c in enumerate(cats):
            if c in found and len(found[c]) < items:
                found[c].append(start + i)
        start += 512
    out = {}
    for c, idx in found.items():
        b = data.batch(idx, fields=("image", "caption"))
        out[c] = (b["image"], list(b["caption"]))
    return out


def per_item_loss(model, pipe: Pipeline, x: torch.Tensor, texts: list[str], noise: torch.Tensor) -> torch.Tensor:
    """(len(T_GRID), n) flow loss of each image under texts at each t (noise (len(T_GRID), n, ...))."""
    y, mask, _ = pipe.encode_text(texts)
    return item_losses(model, x, y, mask, noise)


def compare(own: torch.Tensor, rival: torch.Tensor) -> tuple[float, float]:
    """(share of items whose own caption gives the lower loss, the rival's mean loss increase relative to own's)."""
    return round((rival > own).float().mean().item(), 4), round(((rival - own).mean() / own.mean()).item(), 5)


def binding(ckpt: str, items: int = ITEMS) -> dict:
    model, info = load_checkpoint(ckpt)
    model.eval()
    pipe = Pipeline.from_model(model)
    row = {"ckpt": ckpt, "step": info.meta.get("step")}
    for category, (x, captions) in held_out(model.cfg.input_size, items).items():
        noise = torch.randn(len(T_GRID), *x.shape, generator=torch.Generator().manual_seed(7))
        own_t = per_item_loss(model, pipe, x, captions, noise)  # (t, n)
        swap_t = per_item_loss(model, pipe, x, [swapped(c, category) for c in captions], noise)
        other_t = per_item_loss(model, pipe, x, captions[1:] + captions[:1], noise)
        own, swap, other = own_t.mean(0), swap_t.mean(0), other_t.mean(0)  # (n,) the mean over t
        (binds, gap), (beaten, gap_other) = compare(own, swap), compare(own, other)
        row[category] = {"items": len(captions), "loss_own": round(own.mean().item(), 6),
                         "loss_swapped": round(swap.mean().item(), 6), "loss_other": round(other.mean().item(), 6),
                         "binding": binds, "rel_gap": gap, "other_beaten": beaten, "rel_gap_other": gap_other,
                         "by_t": {str(t): dict(zip(("binding", "rel_gap"), compare(own_t[j], swap_t[j]), strict=True))
                                  for j, t in enumerate(T_GRID)}}
    return row


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(binding(path)), flush=True)
