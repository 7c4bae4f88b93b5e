"""The README's figures from the shipped checkpoints: loss curves of the three runs and, for the sparse ones,
experts per token on objects vs background over training (from each run's routing probe).

    python scripts/shipped_figures.py      (after scripts/train_shipped.sh; writes docs/img/)
"""

from pathlib import Path

import xarray as xr

from ecviz.analysis import object_vs_background
from ecviz.plots import loss_curve, object_compute_curve

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"EC-DiT-small-8E": "ec-dit-small-shapes", "TC-small-8E (top-2)": "tc-small-shapes",
        "DENSE-small-matched": "dense-small-shapes"}


def main() -> None:
    img = ROOT / "docs" / "img"
    ck = ROOT / "checkpoints"
    have = {label: name for label, name in RUNS.items() if (ck / name / "metrics.jsonl").exists()}
    loss_curve([ck / name / "metrics.jsonl" for name in have.values()], img / "loss_curves.png",
               labels=list(have), title="Shapes 32x32, batch 32, same data and steps")
    for label, name in have.items():
        probe = ck / name / "routing.zarr"
        if probe.exists():
            split = object_vs_background(xr.open_zarr(probe, consolidated=False).load())
            object_compute_curve(split, img / f"objects_over_training_{name}.png", title=label)
    print(f"wrote {img}")


if __name__ == "__main__":
    main()
