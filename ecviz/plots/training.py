"""Figures: training loss curves and routing over training (matplotlib, written as PNG files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ecviz.io import atomic_write


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_curve(metrics: list[str | Path], png: str | Path, labels: list[str] | None = None,
               title: str | None = None) -> None:
    """Flow loss against step for one or more runs (raw, faint; smoothed, solid) on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for i, path in enumerate(metrics):
        rows = read_metrics(path)
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        color = f"C{i}"
        ax.plot(steps, loss, lw=0.5, alpha=0.3, color=color)
        k = max(1, len(loss) // 40)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color=color, label=labels[i] if labels else None)
    ax.set_xlabel("step")
    ax.set_ylabel("flow loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if labels:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    atomic_write(Path(png), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def object_compute_curve(split, png: str | Path, title: str | None = None) -> None:
    """Experts per token on objects vs background over training, one panel per sparse layer.

    split: `ecviz.analysis.object_vs_background(probe)`, (region, train_step, t, layer); averaged over t.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    atomic_write(Path(png), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
