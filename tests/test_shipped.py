"""The shipped checkpoints and the main job: they load with today's code, sample shapes ShapesEval
recognises, and the README's demo runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import ecviz
from ecviz import analysis as A
from ecviz.checkpoint import load_checkpoint
from ecviz.data.shapes import CATEGORIES
from ecviz.shapes_eval import eval_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"ec-dit-shapes": "EC-DiT-shapes-8E", "tc-shapes": "TC-shapes-8E",
           "dense-shapes": "DENSE-shapes-matched"}
STEPS = 4700  # scripts/train_shipped.sh


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_checkpoint_is_complete_and_loads(name):
    ck = ROOT / "checkpoints" / name
    model, info = load_checkpoint(ck)
    assert info.preset == SHIPPED[name] and info.meta["step"] == STEPS and info.meta["weights"] == "ema"
    assert info.meta["command"].startswith(f"ecviz train --preset {SHIPPED[name]} ")
    assert model.cfg.tokens == 256 and info.meta["weights_dtype"] == "float16"  # the paper's 16x16 grid
    assert (ck / "model.safetensors").stat().st_size <= 12 * 2**20
    rows = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == STEPS and rows[-1]["loss"] < rows[0]["loss"] / 5
    result = json.loads((ck / "shapes_eval.json").read_text())  # the evaluation set, 4 images per prompt
    assert result["count"] == {c: 192 for c in CATEGORIES} and 0 < result["overall"] <= 1
    lo, hi = result["overall_interval"]
    assert lo < result["overall"] < hi and hi - lo < 0.1
    if model.cfg.routing != "dense":
        probe = xr.open_zarr(ck / "routing.zarr", consolidated=False)
        assert list(probe.train_step.values) == list(range(0, STEPS, 500))


def test_shipped_ec_checkpoint_draws_shapes():
    """One image per bundled prompt, 5 Euler steps (56% when written; 25 steps cost five times the time): well
    above what noise or a broken sampler scores (0)."""
    ev = eval_checkpoint(ROOT / "checkpoints" / "ec-dit-shapes", images_per_prompt=1, steps=5, guidance=4.0, seed=0)
    assert ev.images.shape == (36, 1, 32, 32, 3)
    assert ev.result["overall"] >= 0.3, ev.result


def test_demo_traces_the_shipped_checkpoint(demo_trace):
    out, r = demo_trace
    assert "traced 12 samples" in r.stdout and "block 1: objects" in r.stdout and "block 5: objects" in r.stdout
    assert "block 3: outline" in r.stdout  # the outline-over-inside split, when the 12 images have both
    assert "experts that seek the objects" in r.stdout and "  block 5: " in r.stdout.split("seek the objects")[1]
    report = out.parent.parent / "reports" / "demo"
    summary = json.loads((report / "summary.json").read_text())
    rho = summary["objects_draw_compute"]["rho"]["5"]  # images that shared a group, as the report has them
    assert f"  block 5: {rho:.2f} (95% interval" in r.stdout.split("images sharing a routing group")[1]
    assert (report / "fig6a_layers.png").is_file() and summary["allocation"]["mean"]["1"] == 2.0
    ds = ecviz.open_trace(out)
    assert ds.attrs["preset"] == "EC-DiT-shapes-8E" and bool(ds.done.all())
    assert {"dispatch", "cross_attn", "x0", "category", "word_object"} <= set(ds.data_vars)


def test_word_tables_and_bars_name_every_word_of_the_demo_trace(demo_trace):
    """by_word(by="word_object") names the objects (it showed the trace's codes -1, 0, -2, 1); word_bars keeps a
    word without a score in its place, marked "no score" (it dropped it: "a ring" showed one bar, "a")."""
    from ecviz.plots import figures as F

    ds = ecviz.open_trace(demo_trace[0])
    imp = A.text_importance(ds).compute()
    table = A.by_word(imp, ds, by="word_object")
    assert set(table.index) <= {"no object", "every object", "object 1", "object 2", "object 3"} and len(table)
    for s in range(ds.sizes["sample"]):
        words = [str(w) for w in imp["word_text"].isel(sample=s).values if str(w)]
        fig = F.word_bars(imp, s)
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == words
        row = imp["importance"].isel(sample=s).mean([d for d in imp["importance"].dims if d not in ("sample", "word")])
        unscored = int((~np.isfinite(row.values[[i for i, w in enumerate(imp["word_text"].isel(sample=s).values)
                                                  if str(w)]])).sum())
        assert sum(t.get_text() == "no score" for t in fig.axes[0].texts) == unscored
        F._plt().close(fig)
