"""The README's figures and checkpoint table from the shipped checkpoints: loss curves of the three runs and,
for the sparse ones, experts per token on objects vs background over training (from each run's routing probe);
for the EC model, one traced prompt per category beside its experts-per-token heatmap at the last denoising
step, and the tokens each expert took of one image (`figures.expert_grid`); which experts take each colour's
objects (`expert_words` on a trace of the evaluation prompts, one image each, noise seed 1: about 3 minutes);
then it prints the README's ShapesEval table, every number read from the checkpoint directories.

    python scripts/shipped_figures.py      (after scripts/train_shipped.sh; writes docs/img/)
"""

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

from ecviz.analysis import expert_words, object_vs_background, word_regions
from ecviz.checkpoint import read_checkpoint
from ecviz.data.shapes import COLORS
from ecviz.model import count_params
from ecviz.plots import loss_curve, object_compute_curve, read_metrics
from ecviz.plots.figures import expert_grid, expert_word_maps, image_heatmap_pairs, save
from ecviz.trace import open_trace
from ecviz.trace.run import TraceSettings, run_trace

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"EC-DiT-shapes-8E": "ec-dit-shapes", "TC-shapes-8E (top-2)": "tc-shapes",
        "DENSE-shapes-matched": "dense-shapes"}


def main() -> None:
    img = ROOT / "docs" / "img"
    ck = ROOT / "checkpoints"
    have = {label: name for label, name in RUNS.items() if (ck / name / "metrics.jsonl").exists()}
    loss_curve([ck / name / "metrics.jsonl" for name in have.values()], img / "loss_curves.png",
               labels=list(have), title="Shapes 32x32, batch 128, same data and steps")
    for label, name in have.items():
        probe = ck / name / "routing.zarr"
        if probe.exists():
            split = object_vs_background(xr.open_zarr(probe, consolidated=False).load())
            object_compute_curve(split, img / f"objects_over_training_{name}.png", title=label)
    ec = next((name for label, name in have.items() if label.startswith("EC")), None)
    if ec:
        heatmap_pairs(ck / ec, img / f"image_heatmaps_{ec}.png", img / f"expert_grid_{ec}.png")
        colour_experts(ck / ec, img / f"expert_colours_{ec}.png")
    print(f"wrote {img}\n")
    print(table(ck, have.values()))


GRID_PROMPT = "a cyan cross"  # the expert grid's image: a colour whose expert scripts/expert_removal.py found


def heatmap_pairs(ckpt: Path, png: Path, grid_png: Path) -> None:
    """Trace the bundled Shapes prompts (one image each, the defaults otherwise) and draw the first prompt of
    every category beside its experts-per-token heatmap, averaged over the sparse layers, at the last step;
    and which tokens each expert took of GRID_PROMPT's image in the last sparse layer at the last step."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "pairs.zarr"
        run_trace(TraceSettings(ckpt=ckpt, prompts="shapes", out=store, images_per_prompt=1, progress=False))
        ds = open_trace(store).load()
    categories = ds["category"].values
    firsts = [int(np.flatnonzero(categories == c)[0]) for c in dict.fromkeys(categories)]
    save(image_heatmap_pairs(ds, firsts, step=-1, layer="all"), png)
    sample = int(np.flatnonzero(ds["prompt"].values == GRID_PROMPT)[0])
    save(expert_grid(ds, sample, step=-1, layer=-1), grid_png)


def train_seconds(rows: list[dict]) -> tuple[float, float]:
    """(steps × a step time, wall time) of a run from its metrics rows. `time` restarts at 0 when a run resumes,
    so the rows fall into stretches; the step time is the median of the fastest stretch of 50 rows or more (the
    closest to a quiet CPU: the shipped runs shared the machine for parts of their time), and the wall time sums
    each stretch's last `time`, whatever else shared the machine then."""
    stretches, current = [], []
    for prev, row in zip([None, *rows[:-1]], rows, strict=True):
        if prev is not None and row["time"] < prev["time"]:
            stretches.append(current)
            current = []
        current.append(row)
    stretches.append(current)
    wall = sum(st[-1]["time"] for st in stretches)
    long = [st for st in stretches if len(st) >= 50] or [rows]
    step_s = min(statistics.median(1 / r["steps_per_s"] for r in st) for st in long)
    return rows[-1]["step"] * step_s, wall


def table(ck: Path, names) -> str:
    """The README's tables: per model, parameters (config.json), loss over the last 500 steps and training time
    (metrics.jsonl) and ShapesEval overall with its 95% interval (shapes_eval.json); then ShapesEval per category,
    each with its Wilson interval."""
    head = ["| checkpoint | params total / activated | loss, last 500 steps | train time (wall) | **ShapesEval** "
            "(95% interval) | images |", "|---|---|---|---|---|---|"]
    cats = ["| checkpoint | single obj. | two obj. | counting | colours | position | colour attr. |",
            "|---|---|---|---|---|---|---|"]
    for name in names:
        info = read_checkpoint(ck / name)
        n = count_params(info.config)
        rows = read_metrics(ck / name / "metrics.jsonl")
        last = [r["loss"] for r in rows if r["step"] > rows[-1]["step"] - 500]
        quiet, wall = train_seconds(rows)
        ev = json.loads((ck / name / "shapes_eval.json").read_text())
        lo, hi = ev["overall_interval"]
        head.append(f"| `{name}` ({info.preset}) | {n['total'] / 1e6:.2f}M / {n['activated'] / 1e6:.2f}M | "
                    f"{sum(last) / len(last):.4f} | {quiet / 60:.0f} min ({wall / 60:.0f}) | **{ev['overall']:.1%}** "
                    f"({lo:.1%}–{hi:.1%}) | {sum(ev['count'].values())} |")
        cats.append(f"| `{name}` | " + " | ".join(f"{a:.0%} ({ev['interval'][c][0]:.0%}–{ev['interval'][c][1]:.0%})"
                                                   for c, a in ev["accuracy"].items()) + " |")
    return "\n".join([*head, "", *cats])


def colour_experts(ckpt: Path, png: Path, store: Path | None = None) -> None:
    """Trace the evaluation prompts (one image each, noise seed 1, `--record dispatch`; or read `store` where it
    holds that trace) and draw, per sparse layer at the last step, the share of each colour's objects that
    each expert took (`expert_words` on the colour words, the colours in hue order); print the table."""
    with tempfile.TemporaryDirectory() as tmp:
        if store is None or not store.exists():
            store = Path(tmp) / "eval.zarr"
            run_trace(TraceSettings(ckpt=ckpt, prompts="shapes-eval", out=store, images_per_prompt=1, seed=1,
                                    record=("dispatch",), progress=False))
        ds = open_trace(store).load()
    regions = word_regions(ds)
    results = [expert_words(ds, step=-1, layer=int(b), regions=regions) for b in ds["layer"].values]
    save(expert_word_maps(results, words=list(COLORS)), png)
    for r in results:
        print(f"block {r.attrs['layer']}, step {r.attrs['step']}: % of each colour's object tokens per expert")
        print((100 * r["coverage"].sel(word=[c for c in COLORS if c in r["word"].values])).round()
              .to_pandas().astype(int).assign(n=r["n"].to_pandas()).to_string(), "\n")


if __name__ == "__main__":
    main()
