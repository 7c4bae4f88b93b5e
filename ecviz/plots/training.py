"""Figures: training loss curves and routing over training (matplotlib, written as PNG files), and the image
grids of `ecviz sample` and `ecviz eval --grid` (Pillow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ecviz.io import atomic_write
from ecviz.plots.figures import _plt

GAP, GAP_FILL = 1, 96  # px (before upscaling) and grey level between images: black backgrounds never run together


def tile(images: np.ndarray, gap: int = GAP, fill: int = GAP_FILL) -> np.ndarray:
    """(rows, cols, H, W, 3) uint8 -> one (rows·H + (rows-1)·gap, cols·W + (cols-1)·gap, 3) image, `gap`
    pixels of grey `fill` between neighbours."""
    R, K, H, W, _ = images.shape
    out = np.full((R * H + (R - 1) * gap, K * W + (K - 1) * gap, 3), fill, np.uint8)
    for r in range(R):
        for k in range(K):
            out[r * (H + gap): r * (H + gap) + H, k * (W + gap): k * (W + gap) + W] = images[r, k]
    return out


LABEL_PX = 13  # row labels of sample grids


def sample_grid(images: np.ndarray, scale: int = 1, labels: list[str] | None = None):
    """A PIL image of (rows, cols, H, W, 3) uint8 images: tiled with gaps, upscaled `scale` times (nearest),
    each row's label (if given) written to its left."""
    from PIL import Image, ImageDraw, ImageFont

    grid = tile(images)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    if not labels:
        return img
    font = ImageFont.load_default(size=LABEL_PX)  # the default 10 px squeezes out the spaces
    draw = ImageDraw.Draw(img)
    width = 8 + max(int(draw.textlength(t, font=font)) for t in labels)
    out = Image.new("RGB", (img.width + width, img.height), (255, 255, 255))
    out.paste(img, (width, 0))
    draw = ImageDraw.Draw(out)
    row = (images.shape[2] + GAP) * scale  # label pitch: one image row and its gap
    for r, text in enumerate(labels):
        draw.text((4, r * row + images.shape[2] * scale // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return out


def parse_metrics_line(line: str) -> dict | None:
    """A metrics.jsonl line, or None for a blank or partial one (a run killed while writing its last line)."""
    try:
        row = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    ok = isinstance(row, dict) and type(row.get("step")) is int and type(row.get("loss")) in (int, float)
    return row if ok else None  # a hand-damaged row (no loss, a loss of text) failed the run's loss curve later


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (a partial line, from a run killed while writing it, is left out)."""
    rows = (parse_metrics_line(line) for line in Path(path).read_text(errors="replace").splitlines())
    return [row for row in rows if row is not None]


LINE_STYLES = ("-", "--", ":", "-.")  # runs whose curves overlap stay apart by style as well as colour


def _finish(fig, png: str | Path) -> None:
    """Lay out, write as PNG atomically and close."""
    fig.tight_layout()
    atomic_write(Path(png), lambda tmp: fig.savefig(tmp, format="png"))
    _plt().close(fig)


def loss_curve(metrics: list[str | Path], png: str | Path, labels: list[str] | None = None,
               title: str | None = None, raw: bool = True) -> None:
    """Flow loss against step for one or more runs (raw, faint; smoothed, a distinct line style per run, each
    narrower than and drawn over the one before) on a log scale."""
    plt = _plt()

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for i, path in enumerate(metrics):
        rows = read_metrics(path)
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        color, style, width = f"C{i}", LINE_STYLES[i % len(LINE_STYLES)], 2.4 - 0.6 * (i % 3)
        if raw:
            ax.plot(steps, loss, lw=0.5, alpha=0.2, color=color)
        k = max(1, len(loss) // 40)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color=color, ls=style, lw=width, label=labels[i] if labels else None,
                zorder=3 + i)  # later runs narrower and on top: where curves coincide, all stay visible
    ax.set_xlabel("step")
    ax.set_ylabel("flow loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if labels:
        ax.legend()
    if title:
        ax.set_title(title)
    _finish(fig, png)


def object_compute_curve(split, png: str | Path, title: str | None = None) -> None:
    """Experts per token on objects vs background over training, one panel per sparse layer.

    split: `ecviz.analysis.object_vs_background(probe)`, (region, train_step, t, layer); averaged over t.
    """
    plt = _plt()

    mean = split.mean("t")
    layers = mean["layer"].values
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers) + 0.6, 2.8), dpi=100, sharey=True,
                             squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for region, style in (("object", "-"), ("background", "--")):
            da = mean.sel(layer=layer, region=region)
            ax.plot(da["train_step"].values, da.values, style, label=region)
        ax.set_title(f"block {layer}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("experts per token")
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    _finish(fig, png)
